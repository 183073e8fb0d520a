"""The work behind ``aucli detect``: expand inputs, name outputs, run each input,
show progress and summaries, collect failures. ``cli.py`` only parses options.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .errors import AucliError, Interrupted, UsageError
from .video import VideoInfo, expand_input
from .writers import WRITERS, check_writable, get_writer


@dataclass
class Job:
    source: Path
    output: Path


def plan_outputs(
    sources: list[Path], output: Path | None, format: str | None
) -> tuple[list[Job], str, Path | None, list[str]]:
    """Decide where each input's table goes -> (jobs, format, folder to create, notes).

    One input: ``-o`` may name the file (its suffix picks the format); a new path with
    another suffix is refused, not made a folder. Several: ``-o`` is a folder. Without
    ``-o``: ``<stem>.<ext>`` in the current folder.
    Two inputs with the same stem get their parent folder's name as a prefix,
    never one overwriting the other.
    """
    suffix = output.suffix.lower().lstrip(".") if output is not None else ""
    to_file = output is not None and suffix in WRITERS and not output.is_dir()
    if output is not None and suffix and not to_file and len(sources) == 1 and not output.exists():
        raise UsageError(f"-o {output}: .{suffix} is not a table format; name a .csv or .json file, "
                         "or a folder (one without a suffix, or one that exists)")
    if to_file and len(sources) > 1:
        raise UsageError(f"-o {output}: with {len(sources)} inputs, -o must be a folder")
    if to_file and format and format != suffix:
        raise UsageError(f"-o {output} does not match --format {format}")
    format = format or (suffix if to_file else "csv")
    if to_file:
        return [Job(sources[0], output)], format, None, []
    folder = output or Path(".")
    names, notes = _unique_names(sources)
    jobs = [Job(s, folder / f"{n}.{format}") for s, n in zip(sources, names)]
    return jobs, format, output, notes


def _unique_names(sources: list[Path]) -> tuple[list[str], list[str]]:
    names = [s.stem for s in sources]
    notes = []
    for stem in sorted({n for n in names if names.count(n) > 1}):
        clashing = [i for i, n in enumerate(names) if n == stem]
        for i in clashing:
            names[i] = f"{sources[i].resolve().parent.name}_{stem}"
        notes.append(f"inputs share the name {stem!r}; writing {', '.join(names[i] for i in clashing)}")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # still equal (same parent name): number them
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}-{seen[n]}"
    return names, notes


class _Bar:
    """A rich progress bar on stderr: frames, frames/s, ETA."""

    def __init__(self, console: Console, label: str) -> None:
        self._progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("frames"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._label = label
        self._task = None
        self._start = time.perf_counter()
        self._done = 0

    def start(self, info: VideoInfo) -> None:
        self._progress.start()
        self._task = self._progress.add_task(self._label, total=info.frame_count, rate="")

    def advance(self, frames: int) -> None:
        self._done += frames
        rate = self._done / max(time.perf_counter() - self._start, 1e-9)
        self._progress.update(self._task, advance=frames, rate=f"{rate:.1f} frames/s")

    def stop(self) -> None:
        self._progress.stop()


def summary_line(name: str, table: Any, write_seconds: float, output: Path, overlay: Path | None = None) -> str:
    summary = table.attrs["summary"]
    frames = summary["frames"]
    share = summary["frames_with_face"] / frames if frames else 0.0
    stages = dict(summary["stages"], write=write_seconds)
    total = summary["seconds"] + write_seconds
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
    # The stages' times are each stage's own; with the face stage beside the model they overlap,
    # so they may add up to more than the total.
    return (
        f"{name}: {frames} frames, {share:.0%} with a face, {frames / max(total, 1e-9):.1f} frames/s "
        f"in {total:.1f} s ({timing}) -> {output}" + (f", {overlay}" if overlay else "")
    )


def plan_overlays(jobs: list[Job], overlay: Path | None) -> list[Path | None]:
    """Where each input's annotated video goes: ``overlay`` itself for one input,
    ``<overlay>/<table stem>.mp4`` for several (the folder is created)."""
    from .overlay import CONTAINERS, check_overlay_path

    if overlay is None:
        return [None] * len(jobs)
    if len(jobs) == 1 and not overlay.is_dir():
        paths = [check_overlay_path(overlay)]
    elif overlay.suffix.lower() in CONTAINERS:
        raise UsageError(f"--overlay {overlay}: with {len(jobs)} inputs, --overlay must be a folder")
    else:
        try:
            overlay.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise AucliError(f"--overlay {overlay}: cannot create folder ({error.strerror})") from None
        paths = [overlay / f"{job.output.stem}.mp4" for job in jobs]
    for job, path in zip(jobs, paths):
        if path.resolve() == job.source.resolve():
            raise UsageError(f"--overlay {path}: would replace the input video")
    return paths


def interrupted_line(name: str, output: Path, overlay: Path | None, kept: list[Path]) -> str:
    """What Ctrl-C stopped and what it left: the current outputs are never half-written."""
    lost = f"{output} and {overlay} not written" if overlay else f"{output} not written"
    if not kept:
        return f"detect stopped while processing {name}; {lost}"
    shown = ", ".join(map(str, kept[:3])) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
    return f"detect stopped while processing {name}; {lost}; kept the finished {shown}"


def run_detect(
    inputs: list[str],
    output: Path | None = None,
    format: str | None = None,
    quiet: bool = False,
    overlay: Path | None = None,
    **options: Any,
) -> int:
    """Run detection on every input; returns the exit status (0, or 1 if any failed).

    Under ``torchrun`` each process runs its share of the inputs
    (aucli/distributed.py) and rank 0 prints what all of them report.
    """
    from .distributed import Processes

    processes = Processes.from_environment()
    try:
        return _run_detect(processes, inputs, output, format, quiet, overlay, **options)
    except AucliError as error:
        if not processes.leader:
            # Every process meets the same error (same inputs and options): rank 0 says it.
            raise SystemExit(error.exit_code) from None
        raise
    finally:
        processes.close()


def _run_detect(
    processes, inputs: list[str], output: Path | None, format: str | None, quiet: bool, overlay: Path | None,
    **options: Any
) -> int:
    from .checkpoint import describe
    from .distributed import share
    from .pipeline import Detector

    console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)
    alone = processes.world == 1
    failures: list[str] = []
    sources: list[Path] = []
    for spec in inputs:
        try:
            sources.extend(expand_input(spec))
        except AucliError as error:
            failures.append(str(error))
    if not sources:
        raise AucliError("; ".join(failures) or "no inputs")
    missing_inputs = len(failures)
    jobs, format, folder, notes = plan_outputs(sources, output, format)
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise AucliError(f"-o {folder}: cannot create folder ({error.strerror})") from None
    overlays = plan_overlays(jobs, overlay)
    if processes.leader:
        for note in notes:
            console.print(f"aucli: note: {note}")
    options["device"] = processes.device(options.get("device", "auto"))
    if options.get("face_device") is not None:
        options["face_device"] = processes.device(options["face_device"])
    try:
        detector = Detector(**options)
        setup_error = None
    except AucliError as error:
        setup_error = error
    except KeyboardInterrupt:
        raise Interrupted("detect stopped while loading the model; nothing was written") from None
    if not alone:  # a model that fails to load on one process stops them all
        errors = [e for e in processes.gather(setup_error) if e is not None]
        setup_error = setup_error or (errors[0] if errors else None)
    if setup_error is not None:
        raise setup_error
    # Said once, with the first result, so that a failing run still ends in one error line.
    model_line = f"model {detector.checkpoint}: {describe(detector.model.metadata)}"

    def show(kind: str, text: str) -> None:
        """Print a warning, error or (unless quiet) summary; the model line before the first summary."""
        nonlocal model_line
        if kind != "summary":
            console.print(f"aucli: {kind}: {text}")
        elif not quiet:
            if model_line:
                console.print(f"aucli: {model_line}")
                model_line = ""
            console.print(text)
    writer = get_writer(format)
    owners = share([_size(job.source) for job in jobs], processes.world)
    # What this process reports, by job: ("error" | "warning" | "summary", text).
    reports: list[tuple[int, str, str]] = []
    kept: list[Path] = []
    frames = 0
    started = time.perf_counter()
    for index, (job, drawn) in enumerate(zip(jobs, overlays)):
        if owners[index] != processes.rank:
            continue
        name = str(job.source)
        # A bar only on a terminal and for one process: redirected to a log it would be noise.
        bar = _Bar(console, job.source.name) if alone and console.is_terminal and not quiet else None
        try:
            check_writable(job.output, name)
            table = detector.run(job.source, bar, overlay=drawn)
            if bar:
                bar.stop()
            start = time.perf_counter()
            writer.write(table, job.output)
            written = time.perf_counter() - start
        except KeyboardInterrupt:
            if bar:
                bar.stop()
            raise Interrupted(interrupted_line(name, job.output, drawn, kept)) from None
        except (AucliError, OSError, RuntimeError, ValueError) as error:
            if bar:
                bar.stop()
            message = str(error) if isinstance(error, AucliError) else f"{name}: {error}"
            failure = message.splitlines()[0] if message else f"{name}: {type(error).__name__}"
            if alone and len(jobs) == 1 and not missing_inputs:
                raise AucliError(failure) from None
            reports.append((index, "error", failure))
            if alone:
                console.print(f"aucli: error: {failure}")
            continue
        kept += [job.output] + ([drawn] if drawn else [])
        frames += table.attrs["summary"]["frames"]
        lines = [(index, "warning", w) for w in table.attrs.get("warnings", [])]
        lines.append((index, "summary", summary_line(name, table, written, job.output, drawn)))
        reports.extend(lines)
        if alone:
            for _, kind, text in lines:
                show(kind, text)
    if not alone:
        gathered = processes.gather((reports, frames, time.perf_counter() - started))
        reports = sorted(r for part, _, _ in gathered for r in part)
        if processes.leader:
            for _, kind, text in reports:
                show(kind, text)
            if not quiet:
                total = sum(f for _, f, _ in gathered)
                seconds = max(s for _, _, s in gathered)
                console.print(
                    f"aucli: {len(jobs)} input(s) on {processes.world} processes: {total} frames in "
                    f"{seconds:.1f} s ({total / max(seconds, 1e-9):.1f} frames/s)"
                )
    failures += [text for _, kind, text in reports if kind == "error"]
    if failures and not alone and len(jobs) == 1 and not missing_inputs:
        raise AucliError(failures[-1])
    if failures:
        if processes.leader:
            total = len(jobs) + missing_inputs
            console.print(f"aucli: {len(failures)} of {total} input(s) failed:")
            for failure in failures:
                console.print(f"  {failure}")
        return 1
    return 0


def _size(path: Path) -> int:
    """Bytes of a video, or of an image folder's files: how the processes share the work."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0
