"""End-to-end speed of `aucli detect` on the sample videos (a benchmark, not a test).

Prints the machine it ran on, then per device and video: frames, frames/s end
to end, seconds per stage (decode, faces, model, write) and peak memory (host
RSS; CUDA: peak allocated). Without --checkpoint it times a randomly
initialised model with the chosen backbone: speed does not depend on weights.

    python benchmarks/detect_speed.py [--device cpu|cuda|all] [--backbone resnet50] [--batch-size 16]
                                      [--threads N] [--videos NAME ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aucli.checkpoint import save_checkpoint  # noqa: E402
from aucli.model import MDHR  # noqa: E402
from aucli.pipeline import Detector  # noqa: E402
from aucli.writers import get_writer  # noqa: E402

SAMPLES = ["WolfgangLanger_Pexels.mp4", "single_face.mp4", "face_noface.mov", "no_face.mp4"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    parts = [
        f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, RAM {memory:.0f} GiB",
        f"Python {platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.release()}",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    else:
        parts.append("GPU: none")
    return "\n".join(parts)


class PeakRSS:
    """Samples this process's resident memory in the background; ``peak`` in MiB."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    @staticmethod
    def current() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def random_checkpoint(path: Path, backbone: str) -> Path:
    # In a function, so the model is freed before the timed runs load their own copy.
    save_checkpoint(path, MDHR("bp4d", backbone=backbone), clip_length=16, source={"kind": "random"})
    return path


def bench(detector: Detector, video: Path, out_dir: Path) -> dict:
    cuda = detector.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(detector.device)
    start = time.perf_counter()
    with PeakRSS() as rss:
        table = detector.run(video)
        if cuda:
            torch.cuda.synchronize()
        write_start = time.perf_counter()
        get_writer("csv").write(table, out_dir / f"{video.stem}.csv")
        write = time.perf_counter() - write_start
    total = time.perf_counter() - start
    summary = table.attrs["summary"]
    return {
        "video": video.name,
        "frames": summary["frames"],
        "face": summary["frames_with_face"] / max(summary["frames"], 1),
        "fps": summary["frames"] / total,
        **summary["stages"],
        "write": write,
        "rss": rss.peak,
        "cuda": torch.cuda.max_memory_allocated(detector.device) / 2**20 if cuda else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="all", help="cpu, cuda or all (cuda only when present)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--checkpoint", type=Path, help="time this checkpoint instead of a random one")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--videos", nargs="*", default=SAMPLES, help="names in sample_videos/videos or paths")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    videos = [p if p.exists() else ROOT / "sample_videos" / "videos" / p.name for p in map(Path, args.videos)]

    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = random_checkpoint(tmp / f"random_{args.backbone}.pt", args.backbone)
        for device in devices:
            detector = Detector(checkpoint, device=device, batch_size=args.batch_size)
            meta = detector.model.metadata
            print(f"\ndevice {device}: {meta.backbone}, T={meta.clip_length}, k={meta.k}, "
                  f"batch size {args.batch_size}")
            print("| video | frames | with face | frames/s | decode s | faces s | model s | write s "
                  "| peak RSS MiB | peak CUDA MiB |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for video in videos:
                r = bench(detector, video, tmp)
                cuda = f"{r['cuda']:.0f}" if r["cuda"] is not None else "-"
                print(f"| {r['video']} | {r['frames']} | {r['face']:.0%} | {r['fps']:.1f} | {r['decode']:.1f} "
                      f"| {r['faces']:.1f} | {r['model']:.1f} | {r['write']:.2f} | {r['rss']:.0f} | {cuda} |",
                      flush=True)


if __name__ == "__main__":
    main()
