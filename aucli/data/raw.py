"""Readers of the raw BP4D and DISFA releases (spec §7.7): which frames exist and their AU labels.

Each reader returns ``RawVideo`` records; ``prepare`` does the rest the same way
for both datasets. Copies of the datasets are laid out differently, so the
readers search the given folders rather than assume one exact tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..aus import get_au_set
from ..errors import AucliError
from .layout import UNKNOWN, get_format

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


@dataclass
class RawVideo:
    """One video of a raw dataset: where its frames are, their numbers and labels."""

    subject: str
    key: str  # the video's path prefix in the layout: "F001/T1" or "SN001"
    source: Path  # BP4D: folder of frame images; DISFA: video file
    frames: list[int]  # frame numbers (BP4D file numbers, DISFA 0-based decode indices)
    labels: np.ndarray  # (F, N) AU labels 0/1, 9 unknown
    out_paths: list[str]  # image path of each frame in the layout
    files: list[Path] | None = None  # BP4D: the image file of each frame

    @property
    def is_video_file(self) -> bool:
        return self.files is None


def _numbered_images(folder: Path) -> dict[int, Path]:
    out = {}
    for f in folder.iterdir():
        match = re.search(r"(\d+)$", f.stem)
        if f.suffix.lower() in IMAGE_SUFFIXES and match:
            out[int(match.group(1))] = f
    return out


def read_bp4d(frames_root: Path, labels_root: Path, problems: list[str]) -> list[RawVideo]:
    """BP4D: `<frames>/<subject>/<task>/<n>.jpg` and `<labels>/**/<subject>_<task>.csv` (codes 0/1/9)."""
    import pandas as pd

    au_set, fmt = get_au_set("bp4d"), get_format("bp4d")
    csvs = sorted(p for p in labels_root.rglob("*.csv") if re.fullmatch(r"[^_]+_T\d+", p.stem))
    if not csvs:
        raise AucliError(f"{labels_root}: no BP4D AU occurrence files <subject>_<task>.csv found")
    videos = []
    for csv in csvs:
        subject, task = csv.stem.split("_")
        folder = frames_root / subject / task
        if not folder.is_dir():
            problems.append(f"{csv.name}: no frame folder {folder}")
            continue
        table = pd.read_csv(csv, index_col=0)
        table.columns = [str(c).strip() for c in table.columns]
        absent = [str(au) for au in au_set.aus if str(au) not in table.columns]
        if absent:
            problems.append(f"{csv.name}: no column for AU {', '.join(absent)}; labelled unknown (9)")
        labels = np.stack([table[str(au)].fillna(UNKNOWN).to_numpy() if str(au) not in absent else
                           np.full(len(table), UNKNOWN) for au in au_set.aus], 1).astype(np.int64)
        images = _numbered_images(folder)
        keep = [i for i, n in enumerate(table.index) if int(n) in images]
        if len(keep) < len(table):
            problems.append(f"{csv.name}: {len(table) - len(keep)} coded frames have no image in {folder}")
        frames = [int(table.index[i]) for i in keep]
        videos.append(RawVideo(subject, f"{subject}/{task}", folder, frames, labels[keep],
                               [f"{subject}/{task}/{n}{fmt.image_ext}" for n in frames],
                               [images[n] for n in frames]))
    return videos


def read_disfa(videos_root: Path, labels_root: Path, problems: list[str]) -> list[RawVideo]:
    """DISFA: `<labels>/<SN>/<SN>_au<k>.txt` ("frame,intensity"; present if >= 2) and left-camera videos."""
    au_set, fmt = get_au_set("disfa"), get_format("disfa")
    folders = sorted(p for p in labels_root.rglob("SN*") if p.is_dir() and re.fullmatch(r"SN\d+", p.name))
    if not folders:
        raise AucliError(f"{labels_root}: no DISFA label folders SNxxx/ found")
    video_files = [p for p in videos_root.rglob("*") if p.is_file() and p.suffix.lower() in
                   {".avi", ".mp4", ".mov", ".mkv", ".wmv"}]
    videos = []
    for folder in folders:
        subject = folder.name
        columns, count = [], None
        for au in au_set.aus:
            file = folder / f"{subject}_au{au}.txt"
            if not file.is_file():
                problems.append(f"{subject}: no {file.name}; AU{au} labelled unknown (9)")
                columns.append(None)
                continue
            # Line order is frame order (spec §7.7): the frame column is ignored, as in the reference.
            rows = [line.split(",")[-1].strip() for line in file.read_text().splitlines() if line.strip()]
            if not all(r.lstrip("-").isdigit() for r in rows):
                raise AucliError(f"{file}: expected lines 'frame,intensity' with integer intensities")
            values = [int(r) for r in rows]
            columns.append(np.array(values) >= 2)
            count = len(values) if count is None else count
        if count is None:
            problems.append(f"{subject}: no label files")
            continue
        labels = np.full((count, au_set.num_aus), UNKNOWN, dtype=np.int64)
        for n, column in enumerate(columns):
            if column is not None:  # a file shorter than the first leaves the tail unknown
                labels[: min(len(column), count), n] = column[:count]
        matches = [p for p in video_files if subject.lower() in p.name.lower()]
        left = [p for p in matches if "left" in str(p).lower()]
        chosen = left or matches
        if len(chosen) != 1:
            problems.append(f"{subject}: {'no' if not chosen else len(chosen)} left-camera video(s) in {videos_root}"
                            + ("" if not chosen else f" ({', '.join(p.name for p in chosen)})"))
            continue
        frames = list(range(count))
        videos.append(RawVideo(subject, subject, chosen[0], frames, labels,
                               [f"{subject}/{subject}_{i}{fmt.image_ext}" for i in frames]))
    return videos


#: Raw reader of each dataset.
READERS = {"bp4d": read_bp4d, "disfa": read_disfa}


# ----- labelled videos of any source (`aucli prepare videos`) ------------------------------------

VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


def count_frames(path: Path) -> int:
    """Frames PyAV decodes from a video: the count OpenFace-style label files have one row each for."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def label_au_set(columns: list[str]) -> str:
    """The largest known AU set whose every AU has an occurrence column ``AUxx_c``."""
    from ..aus import AU_SETS

    have = {c.strip() for c in columns}
    fits = [s for s in AU_SETS.values() if all(f"{label}_c" in have for label in s.labels)]
    if not fits:
        raise AucliError("the label files code no known AU set completely (columns AUxx_c); "
                         f"known sets: {', '.join(AU_SETS)}")
    return max(fits, key=lambda s: s.num_aus).name


def read_index(index: Path | None) -> dict[str, str]:
    """clip (video file stem) -> person group, from an index CSV with columns clip_id (or video) and person."""
    if index is None:
        return {}
    import pandas as pd

    try:
        table = pd.read_csv(index, dtype=str)
    except (OSError, ValueError) as exc:
        raise AucliError(f"{index}: not a readable CSV ({exc})") from None
    key = next((c for c in ("clip_id", "video", "video_file") if c in table.columns), None)
    if key is None or "person" not in table.columns:
        raise AucliError(f"{index}: needs a person column and a clip_id (or video) column")
    return {Path(str(k)).stem: str(p) for k, p in zip(table[key], table["person"]) if isinstance(p, str) and p}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def read_videos(videos_root: Path, labels_root: Path, problems: list[str], *, index: Path | None = None,
                au_set: str | None = None, counts: dict[str, int] | None = None) -> tuple[list[RawVideo], str]:
    """Videos with OpenFace-style per-frame label CSVs, matched by file stem -> (videos, AU set name).

    Label files have one row per decoded frame (columns ``frame``, ``success``, ``AUxx_c``);
    ``success`` = 0 marks a frame whose labels are unknown (9). A row count that differs
    from the decoded frame count is an error naming the file. ``counts`` caches frame
    counts by video path (filled in as videos are counted).
    """
    import pandas as pd

    labels = {p.stem: p for p in sorted(labels_root.rglob("*.csv"))}
    videos = {p.stem: p for p in sorted(videos_root.rglob("*")) if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES}
    if not videos:
        raise AucliError(f"{videos_root}: no video files found")
    if not labels:
        raise AucliError(f"{labels_root}: no label files <video stem>.csv found")
    persons = read_index(index)
    for stem in sorted(set(videos) - set(labels)):
        problems.append(f"{videos[stem].name}: no label file {stem}.csv; left out")
    for stem in sorted(set(labels) - set(videos)):
        problems.append(f"{labels[stem].name}: no video with that name; left out")
    stems = sorted(set(videos) & set(labels))
    if not stems:
        raise AucliError(f"{videos_root}: no video has a label file of the same name in {labels_root}")
    if index is not None:
        unindexed = [s for s in stems if s not in persons]
        if unindexed:
            problems.append(f"{len(unindexed)} videos not in {index.name} get a person group of their own "
                            f"({', '.join(unindexed[:3])}{', ...' if len(unindexed) > 3 else ''})")
    tables = {}
    for stem in stems:
        try:
            table = pd.read_csv(labels[stem], skipinitialspace=True)
        except (OSError, ValueError) as exc:
            raise AucliError(f"{labels[stem]}: not a readable CSV ({exc})") from None
        table.columns = [str(c).strip() for c in table.columns]
        tables[stem] = table
    chosen = get_au_set(au_set) if au_set else get_au_set(label_au_set(list(tables[stems[0]].columns)))
    counts = {} if counts is None else counts
    out = []
    for stem in stems:
        table, file = tables[stem], labels[stem]
        missing = [f"{label}_c" for label in chosen.labels if f"{label}_c" not in table.columns]
        if missing:
            raise AucliError(f"{file}: no column {', '.join(missing)} for AU set {chosen.name}")
        key = str(videos[stem])
        if key not in counts:
            try:
                counts[key] = count_frames(videos[stem])
            except Exception as exc:  # PyAV raises many kinds
                raise AucliError(f"{videos[stem]}: not a readable video ({exc})") from None
        if counts[key] != len(table):
            raise AucliError(f"{file}: {len(table)} label rows, but {videos[stem].name} decodes to {counts[key]} "
                             "frames (one row per decoded frame expected)")
        values = table[[f"{label}_c" for label in chosen.labels]].to_numpy(dtype=np.float64)
        known = ~np.isnan(values)
        if "success" in table.columns:
            known &= (table["success"].to_numpy() == 1)[:, None]
        occ = np.where(known, (np.nan_to_num(values) >= 0.5).astype(np.int64), UNKNOWN)
        person = _safe(persons.get(stem, stem))
        key_path = f"{person}/{_safe(stem)}"
        frames = list(range(len(table)))
        out.append(RawVideo(person, key_path, videos[stem], frames, occ,
                            [f"{key_path}/{i:05d}.jpg" for i in frames]))
    return out, chosen.name
