"""`aucli prepare`: raw BP4D/DISFA or labelled videos -> the standard layout (aligned 256x256 crops + fold lists).

Faces are found, tracked, smoothed and aligned exactly as `aucli detect` does
(aucli.faces: MTCNN, the main-face tracker, landmark smoothing over each run of
detections, ``align_face``). Work is split into units of at most ``chunk``
frames of one video; a unit is finished when its marker file is written, so a
rerun after an interruption redoes only unfinished units. Frames where no face
is found take the landmarks of the nearest frame with a face in the same unit
(or are dropped with ``drop_missing``); every such frame is reported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from ..errors import AucliError, UsageError
from .layout import fold_subjects, get_format, write_dataset_info, write_split
from .raw import READERS, RawVideo, read_videos

MARKERS = ".prepare"  # folder of per-unit markers under the output root


@dataclass
class Unit:
    """Frames start..stop (positions in video.frames) of one video."""

    video: RawVideo
    start: int
    stop: int

    @property
    def marker(self) -> str:
        return f"{self.video.key.replace('/', '_')}.{self.start:06d}.json"


def read_parts(path: str | Path | None, default: tuple) -> list[list[str]]:
    """Three subject lists: the spec's (§7.5), or a JSON {subject: part 1-3} / a text file of three lines."""
    if path is None:
        return [list(p) for p in default]
    text = Path(path).read_text()
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError:
        lines = [line.split() for line in text.splitlines() if line.strip()]
        if len(lines) != 3:
            raise UsageError(f"{path}: expected three lines of subject ids (parts 1, 2, 3)") from None
        return lines
    if not isinstance(mapping, dict) or not all(v in (1, 2, 3) for v in mapping.values()):
        raise UsageError(f"{path}: expected a JSON object {{subject: part}} with parts 1, 2 or 3")
    return [[s for s, p in mapping.items() if p == part] for part in (1, 2, 3)]


def iter_frames(unit: Unit):
    """RGB frames of a unit in order; None for a frame that cannot be read."""
    video = unit.video
    if not video.is_video_file:
        for file in video.files[unit.start : unit.stop]:
            image = cv2.imread(str(file))
            yield None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return
    from ..video import open_video

    first, last = video.frames[unit.start], video.frames[unit.stop - 1]
    expected = first
    with open_video(video.source) as reader:
        for frame in reader:
            if frame.index > last:
                break
            if frame.index >= first:
                expected = frame.index + 1
                yield frame.image
    yield from [None] * (last + 1 - expected)  # the video ended before its labels did


_detector = None


def process_unit(unit: Unit, images: Path, markers: Path, drop_missing: bool, smoothing: int,
                 batch: int = 16) -> dict:
    """Detect, track, smooth and align one unit; write its crops, then its marker.

    Two passes over the frames (detect, then align) keep memory flat for long videos.
    """
    from ..faces import FaceDetector, FaceTracker, align_face, smooth_landmarks

    global _detector
    if _detector is None:
        _detector = FaceDetector("cpu")
    tracker = FaceTracker("largest")
    landmarks: list[np.ndarray | None] = []
    segments: list[int | None] = []
    frames = iter_frames(unit)
    while chunk := [f for _, f in zip(range(batch), frames)]:
        readable = [f for f in chunk if f is not None]
        found = iter(_detector.detect(readable) if readable else [])
        for image in chunk:
            tracked = tracker.update(next(found) if image is not None else [])
            landmarks.append(tracked[0].detection.landmarks if tracked else None)
            segments.append(tracked[0].segment if tracked else None)
    # Smooth within each run of one tracked face, as detect does.
    smoothed = list(landmarks)
    run_start = 0
    for i in range(1, len(landmarks) + 1):
        if i == len(landmarks) or segments[i] != segments[run_start]:
            if segments[run_start] is not None:
                smoothed[run_start:i] = list(smooth_landmarks(np.stack(landmarks[run_start:i]), smoothing))
            run_start = i
    found_at = np.array([i for i, lm in enumerate(smoothed) if lm is not None])
    missing, written = [], []
    for i, image in enumerate(iter_frames(unit)):
        position = unit.start + i
        lm = smoothed[i]
        if lm is None:
            missing.append(unit.video.frames[position])
            if drop_missing or not len(found_at) or image is None:
                continue
            lm = smoothed[int(found_at[np.abs(found_at - i).argmin()])]  # nearest face in this unit
        path = images / unit.video.out_paths[position]
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), align_face(image, lm)[..., ::-1]):
            raise AucliError(f"{path}: could not write the crop")
        written.append(position)
    result = {"marker": unit.marker, "frames": unit.stop - unit.start, "written": written, "missing": missing,
              "settings": {"drop_missing": drop_missing, "smoothing": smoothing}}
    markers.mkdir(parents=True, exist_ok=True)
    tmp = markers / (unit.marker + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(markers / unit.marker)  # the unit counts as done only once its marker exists
    return result


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: workers, not threads, give the parallelism


def _run(args: tuple) -> dict:
    return process_unit(*args)


def split_persons(persons: list[str], test_fraction: float | None, seed: int) -> list[list[str]]:
    """Person groups -> three parts, never splitting a person.

    With ``test_fraction``: part 1 trains, part 3 (that share of the persons, at least one)
    tests, part 2 is empty, so only fold 1 exists. Otherwise three parts of near-equal size.
    """
    import torch

    order = [persons[i] for i in torch.randperm(len(persons), generator=torch.Generator().manual_seed(seed))]
    if test_fraction is None:
        return [sorted(order[p::3]) for p in range(3)]
    count = max(1, math.ceil(test_fraction * len(order)))
    if count >= len(order):
        raise UsageError(f"--test-fraction {test_fraction} leaves no person to train on")
    return [sorted(order[count:]), [], sorted(order[:count])]


def _collect(dataset: str, source: Path, labels: Path, output: Path, parts, problems: list[str], *,
             index: Path | None, au_set: str | None, test_fraction: float | None, seed: int):
    """Raw videos of a dataset, its format (with the AU set) and the subjects of its three parts."""
    fmt = get_format(dataset)
    if dataset != "videos":
        return fmt, READERS[dataset](source, labels, problems), read_parts(parts, fmt.parts)
    cache = output / MARKERS / "frame_counts.json"
    counts = json.loads(cache.read_text()) if cache.is_file() else {}
    try:
        videos, au_set_name = read_videos(source, labels, problems, index=index, au_set=au_set, counts=counts)
    finally:
        if counts:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(counts))
    persons = sorted({v.subject for v in videos})
    subject_parts = read_parts(parts, ()) if parts else split_persons(persons, test_fraction, seed)
    return replace(fmt, au_set=au_set_name), videos, subject_parts


def prepare(dataset: str, *, source: str | Path, labels: str | Path, output: str | Path,
            parts: str | Path | None = None, workers: int = 1, chunk: int = 512, smoothing: int = 2,
            drop_missing: bool = False, index: str | Path | None = None, au_set: str | None = None,
            test_fraction: float | None = None, seed: int = 0, progress=None) -> dict:
    """Build the standard layout of `dataset` under `output`; returns a summary (also in prepare.json).

    ``videos``: any videos with per-frame label CSVs (``read_videos``); persons from ``index``
    are split into parts by ``seed`` (``test_fraction``: one train/test fold), never by clip.
    ``progress(done_frames, total_frames)`` is called as units finish.
    """
    if dataset not in READERS and dataset != "videos":
        raise UsageError(f"prepare supports {', '.join([*READERS, 'videos'])}, not {dataset}")
    source, labels, output = Path(source), Path(labels), Path(output)
    for what, path in (("frames/videos", source), ("labels", labels)):
        if not path.is_dir():
            raise AucliError(f"{path}: {what} folder not found")
    if index is not None and not Path(index).is_file():
        raise AucliError(f"{index}: index file not found")
    problems: list[str] = []
    fmt, videos, subject_parts = _collect(dataset, source, labels, output, parts, problems,
                                          index=Path(index) if index else None, au_set=au_set,
                                          test_fraction=test_fraction, seed=seed)
    assigned = {s for part in subject_parts for s in part}
    unassigned = sorted({v.subject for v in videos} - assigned)
    if unassigned:
        problems.append(f"subjects in no part, left out: {' '.join(unassigned)} (see --parts)")
    videos = [v for v in videos if v.subject in assigned and v.frames]
    if not videos:
        raise AucliError(f"{source}: no labelled video of a known subject found")
    units = [Unit(v, s, min(s + chunk, len(v.frames))) for v in videos for s in range(0, len(v.frames), chunk)]
    settings = {"drop_missing": drop_missing, "smoothing": smoothing}
    done = {u.marker: json.loads((output / MARKERS / u.marker).read_text())
            for u in units if (output / MARKERS / u.marker).is_file()}
    done = {m: r for m, r in done.items() if r.get("settings") == settings}  # other settings: redo
    todo = [u for u in units if u.marker not in done]
    total = sum(u.stop - u.start for u in units)
    finished = total - sum(u.stop - u.start for u in todo)
    if progress:
        progress(finished, total)
    args = [(u, output / fmt.images, output / MARKERS, drop_missing, smoothing) for u in todo]
    if workers <= 1 or len(todo) <= 1:
        results = map(_run, args)
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(min(workers, len(todo)), initializer=_worker_init)
        results = pool.imap_unordered(_run, args)
    try:
        for result in results:
            done[result["marker"]] = result
            finished += result["frames"]
            if progress:
                progress(finished, total)
    finally:
        if workers > 1 and len(todo) > 1:
            pool.terminate()

    # Lists: subjects in part order, videos in reader order, frames that have a crop.
    written = {}
    for u in units:
        written.setdefault(u.video.key, []).extend(done[u.marker]["written"])
    missing = {u.video.key: [] for u in units}
    for u in units:
        missing[u.video.key].extend(done[u.marker]["missing"])
    single = dataset == "videos" and test_fraction is not None and not parts  # one split (split_persons)
    folds = []
    for fold in (1,) if single else (1, 2, 3):
        for split, subjects in zip(("train", "test"), fold_subjects(subject_parts, fold)):
            paths, rows = [], []
            for subject in subjects:
                for v in (v for v in videos if v.subject == subject):
                    keep = sorted(written[v.key])
                    paths += [v.out_paths[i] for i in keep]
                    rows.append(v.labels[keep])
            if paths:
                write_split(output, fmt, split, fold, paths, np.concatenate(rows))
                if split == "test" and subjects:
                    folds.append(fold)
            else:
                problems.append(f"fold {fold} {split}: no frames (no subject of its parts was found)")
    if not fmt.parts:  # formats without standard folds say what they hold
        write_dataset_info(output, fmt, folds=folds, seed=seed, test_fraction=test_fraction)
    summary = {"dataset": fmt.name, "au_set": fmt.au_set, "folds": folds, "videos": len(videos), "frames": total,
               "frames_written": sum(len(w) for w in written.values()),
               "frames_without_face": sum(len(m) for m in missing.values()),
               "missing_by_video": {k: m for k, m in missing.items() if m},
               "filled_from_nearest_face": not drop_missing, "problems": problems, "parts": subject_parts}
    (output / "prepare.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
