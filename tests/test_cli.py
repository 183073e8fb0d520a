"""The command line: help, lazy imports, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "aucli", *args], capture_output=True, text=True, **kw)


def test_help_lists_commands():
    out = _run("--help")
    assert out.returncode == 0
    for command in ("convert-official",):
        assert command in out.stdout


def test_root_help_imports_no_heavy_library():
    code = (
        "import sys; from aucli import cli; "
        "heavy = [m for m in ('torch', 'timm', 'av', 'cv2', 'facenet_pytorch', 'pandas') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == ""


def test_convert_help_documents_options():
    out = _run("convert-official", "--help")
    assert out.returncode == 0
    for option in ("--dataset", "--backbone", "--output", "--clip-length", "--force"):
        assert option in out.stdout


def test_errors_are_one_line_without_traceback(tmp_path):
    out = _run("convert-official", str(tmp_path / "missing.pth"), "-d", "bp4d", "-o", str(tmp_path / "m.pt"))
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "missing.pth" in out.stderr


def test_existing_output_is_not_overwritten(tmp_path):
    target = tmp_path / "m.pt"
    target.write_text("keep me")
    src = tmp_path / "x.pth"
    src.write_text("x")
    out = _run("convert-official", str(src), "-d", "bp4d", "-o", str(target))
    assert out.returncode == 2 and "already exists" in out.stderr
    assert target.read_text() == "keep me"


def test_version():
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.startswith("aucli ")


def test_unknown_option_is_a_usage_error_without_traceback():
    # typer may vendor its own click, whose exceptions are not click's own classes.
    out = _run("detect", "--no-such-option")
    assert out.returncode == 2
    assert "No such option" in out.stderr and "Traceback" not in out.stderr


def test_pretrain_bad_input_is_one_line_and_writes_nothing(tmp_path):
    out = _run("pretrain", cwd=tmp_path)
    assert out.returncode == 2 and "--data-root" in out.stderr and "Traceback" not in out.stderr
    out = _run("pretrain", "--data-root", str(tmp_path / "nothing"), "--project", str(tmp_path / "runs"))
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()
    junk = tmp_path / "last.pt"
    junk.write_bytes(b"not a checkpoint")
    out = _run("pretrain", "--resume", str(junk))
    assert out.returncode == 1 and "not the last.pt of an aucli pretrain run" in out.stderr
    assert out.stderr.strip().count("\n") == 0


def _kernel_thp_mode() -> str | None:
    """The kernel's transparent huge page mode (always, madvise or never), or None where unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            text = file.read()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("call, preset", [(True, None), (False, None), (True, "MALLOC_MMAP_THRESHOLD_"),
                                          (True, "GLIBC_TUNABLES")])
def test_detect_keeps_freed_memory_for_reuse_unless_malloc_is_tuned(call, preset):
    """Before torch loads, `aucli detect` has glibc's malloc serve blocks under 32 MiB from the heap
    and keep the heap's freed top (mallopt): a freed 16 MiB block stays in the process for the
    next batch. Without the call, or where the environment tunes malloc, it goes back at once."""
    code = (
        "import ctypes, os, sys; from aucli.cli import _before_torch_loads; "
        f"_before_torch_loads() if {call} else None; "
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; "
        "libc.malloc.argtypes = [ctypes.c_size_t]; libc.free.argtypes = [ctypes.c_void_p]; "
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'); "
        "block = libc.malloc(16 << 20); ctypes.memset(block, 1, 16 << 20); touched = rss(); libc.free(block); "
        "print((touched - rss()) >> 20)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    if preset is not None:  # glibc's own default threshold, set by the environment
        env[preset] = "glibc.malloc.mmap_threshold=131072" if preset == "GLIBC_TUNABLES" else "131072"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    returned_mib = int(out.stdout)
    assert returned_mib == (0 if call and preset is None else 16), returned_mib


@pytest.mark.parametrize("preset", [None, "0"])
def test_detect_asks_torch_for_huge_pages_unless_told_otherwise(preset):
    """Before torch loads, `aucli detect` sets THP_MEM_ALLOC_ENABLE=1 (torch's CPU allocator then
    asks the kernel for 2 MiB pages for tensors of 2 MiB and more) and OMP_WAIT_POLICY=PASSIVE,
    each unless the environment sets it; where the kernel gives huge pages on request (madvise),
    a large tensor then has them, and without the setting it has none."""
    code = (
        "import os; from aucli.cli import _before_torch_loads; _before_torch_loads(); import torch; "
        "x = torch.ones(16 * 2**20); x += 1; "  # 64 MiB, touched
        "rollup = '/proc/self/smaps_rollup'; lines = open(rollup).readlines() if os.path.exists(rollup) else []; "
        "huge = [int(l.split()[1]) for l in lines if l.startswith('AnonHugePages')]; "
        "print(os.environ['THP_MEM_ALLOC_ENABLE'], os.environ['OMP_WAIT_POLICY'], huge[0] if huge else -1)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "OMP_WAIT_POLICY")}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    setting, policy, huge_kib = out.stdout.split()
    assert (setting, policy) == ("1" if preset is None else preset, "PASSIVE")
    if _kernel_thp_mode() == "madvise" and int(huge_kib) >= 0:
        assert (int(huge_kib) >= 32 * 1024) == (preset is None), huge_kib
