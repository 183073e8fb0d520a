"""Ctrl-C: one line saying what stopped and what was (not) written, exit status 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from media_fixtures import VIDEOS, tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def interrupt_when(command: list[str], ready, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group and send the whole group SIGINT, as a
    terminal's Ctrl-C does, once ``ready()`` is true.

    The child gets SIGINT's default disposition back: a shell starts background jobs with
    SIGINT ignored, children inherit that, and Python then never raises KeyboardInterrupt,
    so a suite run from such a job would otherwise see the command finish undisturbed.
    """
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, f"ended before it could be interrupted: {process.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_ctrl_c_during_detect_says_what_was_not_written(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    out.mkdir()
    video = VIDEOS / "WolfgangLanger_Pexels.mp4"  # 472 frames: long enough to be caught mid-run
    done = interrupt_when(
        [sys.executable, "-m", "aucli", "detect", str(video), "-o", str(out / "aus.csv"), "--overlay",
         str(out / "seen.mp4"), "--checkpoint", str(checkpoint), "--device", "cpu"],
        ready=lambda: any(out.iterdir()))  # the overlay's temporary file: the video is being processed
    assert done.returncode == 130
    assert done.stderr == (f"aucli: interrupted: detect stopped while processing {video}; "
                           f"{out / 'aus.csv'} and {out / 'seen.mp4'} not written\n")
    assert list(out.iterdir()) == []  # no table, no video, no temporary file
