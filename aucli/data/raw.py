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
