"""Speed, memory and agreement of `aucli detect` (a benchmark, not a test).

Speed: each video goes through the command line in a fresh process (`python -m
aucli detect VIDEO -o OUT`), timed from process start to file written, so
start-up and model load count. Between those runs, this process times the
reference workload: a plain timm ResNet-50, fp32, batch 16, forward only, in
images/s. Every figure is also given as a ratio to the reference timed next to
it, which stays comparable across machines and under other load. Per stage:
frames per second of decode, faces, model and write (frames / stage seconds,
from the summary line; each stage's own time, so with the face stage beside
the model they may add up to more than the run) and start-up (what the run,
decode to written file, leaves of the end-to-end time: imports, model load,
exit), and frames/s after start-up (frames / the run's own time: what a long
video approaches). Peak RSS: the process's own maximum resident memory.

    python benchmarks/detect_speed.py [--checkpoint CKPT | --backbone resnet50] [--precision auto]
        [--device cpu] [--face-device cpu] [--overlap auto|on|off] [--videos NAME ...] [--repeat N]
        [--loop-minutes 3] [--agreement] [--threads N]

Without --checkpoint it times a randomly initialised BP4D model with the chosen
backbone (speed does not depend on the weights). --loop-minutes M also runs
the first video looped to at least M minutes and compares peak memory (goal:
flat in video length). --repeat N runs each video N times and prints the
median ratio per video: on a shared machine one run can land on a busy
moment. --agreement runs the sample videos with --precision fp32 and with the
chosen precision and compares the AU outputs (share of equal decisions, mean
|delta p|) instead of timing.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aucli.inference import cpu_flags, resolve_precision  # noqa: E402
from aucli.pipeline import REDETECT  # noqa: E402

SAMPLES = ["WolfgangLanger_Pexels.mp4", "single_face.mp4", "face_noface.mov", "no_face.mp4"]
STAGES = ("decode", "faces", "model", "write")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in cpu_flags()]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    parts = [
        f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, "
        f"RAM {memory:.0f} GiB, bf16 flags: {', '.join(bf16) or 'none'}, "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"Python {platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.release()}",
        "GPU: " + (f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if torch.cuda.is_available()
                   else "none"),
    ]
    return "\n".join(parts)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


# ----- the reference workload ------------------------------------------------------
class Reference:
    """A plain timm ResNet-50, fp32, batch 16, forward only: images per second."""

    def __init__(self, device: str) -> None:
        import timm

        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = timm.create_model("resnet50", num_classes=0).eval().to(self.device)
        self.batch = torch.randn(16, 3, 224, 224, device=self.device)
        self.figures: list[float] = []
        self.measure(repeats=1)  # warm-up, not recorded
        self.figures.clear()

    @torch.inference_mode()
    def measure(self, repeats: int = 3) -> float:
        self.model(self.batch)
        self._sync()
        start = time.perf_counter()
        for _ in range(repeats):
            self.model(self.batch)
        self._sync()
        rate = repeats * len(self.batch) / (time.perf_counter() - start)
        self.figures.append(rate)
        return rate

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ----- inputs ----------------------------------------------------------------------
def random_checkpoint(path: Path, backbone: str) -> Path:
    from aucli.checkpoint import save_checkpoint
    from aucli.model import MDHR

    torch.manual_seed(0)
    save_checkpoint(path, MDHR("bp4d", backbone=backbone), clip_length=16, source={"kind": "random"})
    return path


def looped_video(source: Path, target: Path, minutes: float) -> Path:
    """``source`` repeated (packets copied, timestamps shifted) until it lasts ``minutes``."""
    import av

    with av.open(str(source)) as probe:
        stream = probe.streams.video[0]
        duration = float(stream.duration * stream.time_base)
    loops = max(1, int(-(-minutes * 60 // duration)))
    with av.open(str(target), "w") as out:
        out_stream = None
        offset = 0
        for _ in range(loops):
            with av.open(str(source)) as src:
                stream = src.streams.video[0]
                if out_stream is None:
                    out_stream = out.add_stream_from_template(stream)
                last = 0
                for packet in src.demux(stream):
                    if packet.pts is None:
                        continue
                    last = max(last, packet.pts + (packet.duration or 0))
                    packet.pts += offset
                    if packet.dts is not None:
                        packet.dts += offset
                    packet.stream = out_stream
                    out.mux(packet)
                offset += last
    return target


def resolve_videos(names: list[str]) -> list[Path]:
    return [p if p.exists() else ROOT / "sample_videos" / "videos" / p.name for p in map(Path, names)]


# ----- one end-to-end run ------------------------------------------------------------
SUMMARY = re.compile(r": (\d+) frames, .*?([\d.]+) frames/s in ([\d.]+) s \((.*)\) -> ")


def run_cli(video: Path, out: Path, args: argparse.Namespace, checkpoint: Path, precision: str) -> dict:
    command = [
        sys.executable, "-m", "aucli", "detect", str(video), "-o", str(out), "--checkpoint", str(checkpoint),
        "--device", args.device, "--batch-size", str(args.batch_size), "--precision", precision,
    ]
    if args.redetect:
        command += ["--redetect", str(args.redetect)]
    if args.face_device:
        command += ["--face-device", args.face_device]
    if args.overlap != "auto":
        command += ["--overlap" if args.overlap == "on" else "--no-overlap"]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    log = out.with_suffix(".log")
    with open(log, "w") as sink:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        # wait4 gives this child's own resource usage, peak RSS included (KiB on Linux).
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = log.read_text()
    if process.returncode != 0 or not out.exists():
        raise SystemExit(f"aucli detect failed on {video} ({process.returncode}):\n{stderr}")
    found = SUMMARY.search(stderr)
    if not found:
        raise SystemExit(f"no summary line from aucli detect:\n{stderr}")
    frames = int(found.group(1))
    run_seconds = float(found.group(3))  # the run itself, decode to written file (the summary's total)
    stages = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", found.group(4))}
    share = re.search(r"(\d+)% with a face", stderr)
    return {
        "video": video.name,
        "frames": frames,
        "face": int(share.group(1)) if share else 0,
        "seconds": seconds,
        "fps": frames / seconds,
        "stages": stages,
        # The stages may overlap (the face stage beside the model): start-up is what the run itself
        # (decode to written file, the summary's total) leaves of the end-to-end time.
        "startup": max(seconds - run_seconds, 0.0),
        # frames/s of the run itself: the figure a long video approaches.
        "fps_run": frames / max(run_seconds, 1e-9),
        "rss": usage.ru_maxrss / 1024,
    }


def stage_fps(frames: int, seconds: float) -> str:
    return f"{frames / seconds:.0f}" if seconds > 0.05 else "-"


def stage_figures(r: dict) -> str:
    return " | ".join(stage_fps(r["frames"], r["stages"].get(k, 0.0)) for k in STAGES)


def speed(args: argparse.Namespace, checkpoint: Path, precision: str, videos: list[Path], tmp: Path) -> None:
    reference = Reference(args.device)
    before = reference.measure()
    print(f"\nreference: timm ResNet-50 fp32, batch 16, forward: {before:.2f} img/s ({load()})")
    print("| video | frames | with face | end to end s | frames/s | x reference | start-up s "
          "| frames/s after start-up | decode fps | faces fps | model fps | write fps | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for video in [v for _ in range(args.repeat) for v in videos]:  # rounds over all videos
        r = run_cli(video, tmp / f"{video.stem}.csv", args, checkpoint, precision)
        after = reference.measure()
        r["reference"] = (before + after) / 2  # the reference just before and just after this run
        before = after
        results.append(r)
        print(f"| {r['video']} | {r['frames']} | {r['face']}% | {r['seconds']:.1f} | {r['fps']:.1f} "
              f"| {r['fps'] / r['reference']:.2f} | {r['startup']:.1f} | {r['fps_run']:.1f} | "
              + stage_figures(r) + f" | {r['rss']:.0f} |", flush=True)
    if args.repeat > 1:
        # On a shared machine one run can land on a busy moment: the median of the runs of a
        # video, each against the reference timed around it, ranks code and machines better.
        print()
        for video in videos:
            ratios = sorted(r["fps"] / r["reference"] for r in results if r["video"] == video.name)
            print(f"{video.name}: median {statistics.median(ratios):.2f} x the reference over {len(ratios)} runs "
                  f"({ratios[0]:.2f}-{ratios[-1]:.2f})")
    frames = sum(r["frames"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    mean_reference = sum(reference.figures) / len(reference.figures)
    print(f"\nall videos: {frames} frames in {seconds:.1f} s = {frames / seconds:.1f} frames/s = "
          f"{frames / seconds / mean_reference:.2f} x the reference "
          f"(reference {min(reference.figures):.2f}-{max(reference.figures):.2f} img/s over "
          f"{len(reference.figures)} timings, {load()})")
    if args.loop_minutes:
        source = videos[0]
        looped = looped_video(source, tmp / f"{source.stem}_looped{source.suffix}", args.loop_minutes)
        long = run_cli(looped, tmp / "looped.csv", args, checkpoint, precision)
        short = next(r for r in results if r["video"] == source.name)
        after = reference.measure()
        print(f"\nmemory: {source.name} ({short['frames']} frames) peak RSS {short['rss']:.0f} MiB; looped to "
              f"{long['frames']} frames ({args.loop_minutes:g} min): peak RSS {long['rss']:.0f} MiB "
              f"({long['rss'] / short['rss'] - 1:+.1%}); looped run {long['fps']:.1f} frames/s = "
              f"{long['fps'] / after:.2f} x the reference timed after it ({after:.2f} img/s)")
        print(f"looped run: {long['seconds']:.1f} s end to end, start-up {long['startup']:.1f} s, "
              f"{long['fps_run']:.1f} frames/s after start-up; stage frames/s (decode | faces | model | write): "
              f"{stage_figures(long)}")


def agreement(args: argparse.Namespace, checkpoint: Path, precision: str, videos: list[Path]) -> None:
    """Share of equal AU decisions and mean |delta p| between --precision fp32 and ``precision``."""
    import numpy as np

    from aucli.pipeline import Detector

    tables = {}
    for name in ("fp32", precision):
        detector = Detector(checkpoint, device=args.device, batch_size=args.batch_size, precision=name,
                            redetect=args.redetect or REDETECT, face_device=args.face_device,
                            overlap=None if args.overlap == "auto" else args.overlap == "on")
        tables[name] = [detector.run(video) for video in videos]
        del detector
    print(f"\nagreement of --precision {precision} with fp32 (checkpoint {checkpoint}):")
    print("| video | frames with a face | equal AU decisions | mean abs delta p | max abs delta p |")
    print("|---|---:|---:|---:|---:|")
    equal_all, delta_all = [], []
    for video, a, b in zip(videos, tables["fp32"], tables[precision]):
        assert len(a) == len(b) and (a["success"] == b["success"]).all(), "faces must not depend on precision"
        found = a["success"] == 1
        c_cols = [c for c in a.columns if c.endswith("_c")]
        p_cols = [c for c in a.columns if c.endswith("_p")]
        equal = (a.loc[found, c_cols].to_numpy() == b.loc[found, c_cols].to_numpy()).ravel()
        delta = np.abs(a.loc[found, p_cols].to_numpy(float) - b.loc[found, p_cols].to_numpy(float)).ravel()
        equal_all.append(equal)
        delta_all.append(delta)
        if len(delta):
            print(f"| {video.name} | {int(found.sum())} | {equal.mean():.2%} | {delta.mean():.4f} | {delta.max():.4f} |")
        else:
            print(f"| {video.name} | 0 | - | - | - |")
    equal, delta = np.concatenate(equal_all), np.concatenate(delta_all)
    print(f"all: {equal.mean():.2%} of {len(equal)} AU decisions equal, mean |delta p| {delta.mean():.4f}, "
          f"max {delta.max():.4f} (goal: >= 99.5 % and <= 0.01)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backbone", default="resnet50", help="backbone of the random model (no --checkpoint)")
    parser.add_argument("--checkpoint", type=Path, help="time this checkpoint instead of a random one")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--redetect", type=int, help="aucli detect --redetect (default: aucli's)")
    parser.add_argument("--face-device", help="aucli detect --face-device (default: the model's device)")
    parser.add_argument("--overlap", choices=["auto", "on", "off"], default="auto",
                        help="aucli detect --overlap / --no-overlap (auto: aucli's default)")
    parser.add_argument("--videos", nargs="*", default=SAMPLES, help="names in sample_videos/videos or paths")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the videos this many rounds (each run between two reference timings); "
                             "prints the median ratio per video")
    parser.add_argument("--loop-minutes", type=float, help="also run the first video looped to this length")
    parser.add_argument("--agreement", action="store_true", help="compare with --precision fp32 instead of timing")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(machine())
    print(load())
    precision = resolve_precision(args.precision, torch.device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or random_checkpoint(tmp / f"random_{args.backbone}.pt", args.backbone)
        print(f"checkpoint: {args.checkpoint or f'random BP4D MDHR, {args.backbone}, T=16, k=5'}; "
              f"--precision {args.precision} -> {precision}; batch size {args.batch_size}; device {args.device}; "
              f"face device {args.face_device or args.device}; overlap {args.overlap}")
        videos = resolve_videos(args.videos)
        if args.agreement:
            agreement(args, checkpoint, precision, videos)
        else:
            speed(args, checkpoint, precision, videos, tmp)
    print(load())


if __name__ == "__main__":
    main()
