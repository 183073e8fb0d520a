"""Many videos over many processes: torchrun shares the inputs, rank 0 reports for all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from media_fixtures import ROOT, VIDEOS, make_video, tiny_checkpoint

from aucli.distributed import Processes, share


def test_share_is_deterministic_complete_and_balanced():
    sizes = [100, 5, 70, 30, 30, 1, 0, 64]
    owners = share(sizes, 3)
    assert owners == share(sizes, 3) and set(owners) == {0, 1, 2}
    loads = [sum(s for s, o in zip(sizes, owners) if o == p) for p in range(3)]
    assert max(loads) - min(loads) <= max(sizes)
    assert share(sizes, 1) == [0] * len(sizes)
    assert sorted(share([10, 10], 4)) == [0, 1]  # more processes than inputs: some stay idle


def test_alone_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    alone = Processes.from_environment()
    assert (alone.rank, alone.world, alone.leader) == (0, 1, True)
    assert alone.device("auto") == "auto" and alone.gather("x") == ["x"]


def _detect(args: list[str], launcher: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # torchrun's default per process; alike for both runs
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, *launcher, "-m", "aucli", "detect", *map(str, args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def test_two_gloo_processes_give_the_outputs_of_one(tmp_path):
    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(VIDEOS / "single_face.mp4", folder / "single_face.mp4")
    make_video(folder / "grey.mp4")
    make_video(folder / "sub" / "short.mp4", pts_ms=[i * 40 for i in range(6)])
    (folder / "broken.mp4").write_text("not a video")
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    many = _detect([folder, "-o", tmp_path / "many", "--checkpoint", checkpoint, "--format", "json"], torchrun, tmp_path)
    one = _detect([folder, "-o", tmp_path / "one", "--checkpoint", checkpoint, "--format", "json"], [], tmp_path)
    assert many.returncode == one.returncode == 1, many.stderr  # broken.mp4 fails in both
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["grey.json", "short.json", "single_face.json"]
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == names
    for name in names:  # the same bytes: nothing in a result depends on the process
        assert (tmp_path / "many" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    # One combined report, from rank 0 only: each input once, then the total.
    err = many.stderr
    for name in ("single_face.mp4", "grey.mp4", "short.mp4"):
        assert sum(f"{name}: " in line and "frames/s" in line for line in err.splitlines()) == 1, err
    assert err.count("broken.mp4") == 2  # its error line and the failure list
    assert "3 of 4 input(s)" not in err and "1 of 4 input(s) failed" in err
    assert "4 input(s) on 2 processes: 88 frames" in err
    # torchrun adds its own report of the workers' exit status 1; no worker shows a traceback.
    assert "/aucli/" not in err


def test_a_bad_checkpoint_is_reported_once(tmp_path):
    clip = make_video(tmp_path / "clip.mp4")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = _detect([clip, "-o", tmp_path / "out", "--checkpoint", bad], torchrun, tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("aucli: error:")]
    assert len(lines) == 1 and "bad.pt" in lines[0], result.stderr
    assert "/aucli/" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
