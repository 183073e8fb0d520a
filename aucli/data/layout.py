"""The standard dataset layout of the reference implementation and ME-GraphAU (spec §7.1-§7.4).

A layout is an image root plus per-fold list files::

    <root>/<PREFIX>_<split>_<paths>_fold<f>.txt      one image path per line (relative to <root>/<images>/)
    <root>/<PREFIX>_<split>_label_fold<f>.txt        N labels per line, AU order (0/1; 9 = unknown)
    <root>/<PREFIX>_<split>_sub_label_fold<f>.txt    regional combination classes (optional: derived)
    <root>/<PREFIX>_train_weight_fold<f>.txt         per-AU loss weights (optional: derived)

List files are also found in ``<root>/list/`` (ME-GraphAU's place for them).
BP4D and DISFA differ only in the values of a ``DatasetFormat`` record.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from ..aus import AUSet, get_au_set
from ..errors import AucliError

#: Labels outside {0, 1} are ignored by losses and metrics: 9 = unknown, -1 = padding.
UNKNOWN = 9
PADDING = -1


@dataclass(frozen=True)
class DatasetFormat:
    """Naming and video-splitting rules of one dataset's layout (spec §7.1-§7.4)."""

    name: str
    au_set: str
    prefix: str  # list-file prefix, e.g. "BP4D"
    paths_kind: str  # "img_path" (BP4D) or "path" (DISFA) in the image-list file name
    images: str  # image folder under the root
    image_ext: str  # what `prepare` writes
    # A video is identified by the first `video_depth` path components
    # (BP4D: subject/task, DISFA: subject), spec §7.3.
    video_depth: int
    # BP4D test clips also break where frame numbers jump (spec §7.4); DISFA's do not.
    split_on_gap: bool
    # Subject lists of the three parts (spec §7.5); fold f tests on TEST_PART[f].
    parts: tuple[tuple[str, ...], ...] = field(default=(), repr=False)

    def list_name(self, split: str, kind: str, fold: int) -> str:
        if kind == "paths":
            kind = self.paths_kind
        return f"{self.prefix}_{split}_{kind}_fold{fold}.txt"

    def weight_name(self, fold: int) -> str:
        return f"{self.prefix}_train_weight_fold{fold}.txt"


BP4D_PARTS = (
    "F001 M007 F018 F008 F002 M004 F010 F009 M012 M001 F016 M014 F023 M008".split(),
    "M011 F003 M010 M002 F005 F022 M018 M017 F013 M016 F020 F011 M013 M005".split(),
    "F007 F015 F006 F019 M006 M009 F012 M003 F004 F021 F017 M015 F014".split(),
)
DISFA_PARTS = (
    "SN002 SN010 SN001 SN026 SN027 SN032 SN030 SN009 SN016".split(),
    "SN013 SN018 SN011 SN028 SN012 SN006 SN031 SN021 SN024".split(),
    "SN003 SN029 SN023 SN025 SN008 SN005 SN007 SN017 SN004".split(),
)

FORMATS: dict[str, DatasetFormat] = {
    "bp4d": DatasetFormat("bp4d", "bp4d", "BP4D", "img_path", "img", ".jpg", 2, True,
                          tuple(map(tuple, BP4D_PARTS))),
    "disfa": DatasetFormat("disfa", "disfa", "DISFA", "path", "img_o", ".png", 1, False,
                           tuple(map(tuple, DISFA_PARTS))),
    # Generated data (aucli.data.synthetic) uses the BP4D AU set and BP4D-like paths.
    "synthetic": DatasetFormat("synthetic", "bp4d", "SYNTH", "img_path", "img", ".jpg", 2, True),
    # Labelled videos of any source (`aucli prepare videos`): <person>/<clip>/<frame>.jpg. The AU
    # set is whatever the labels code; it is read from the data root's DATASET_INFO.
    "videos": DatasetFormat("videos", "", "VIDEOS", "img_path", "img", ".jpg", 2, True),
}

#: File in a data root that names its AU set, for formats whose AU set is not fixed.
DATASET_INFO = "aucli_dataset.json"

#: Fold f trains on two parts and tests on the third, in the order of spec §7.5 (0-based parts).
FOLD_PARTS: dict[int, tuple[tuple[int, int], int]] = {1: ((0, 1), 2), 2: ((0, 2), 1), 3: ((1, 2), 0)}


def get_format(name: str | DatasetFormat) -> DatasetFormat:
    if isinstance(name, DatasetFormat):
        return name
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise AucliError(f"unknown dataset {name!r}; choose one of: {', '.join(FORMATS)}") from None


def resolve_format(dataset: str | DatasetFormat, root: str | Path) -> DatasetFormat:
    """The format of `dataset` with its AU set; for ``videos`` the AU set is read from the data root."""
    fmt = get_format(dataset)
    if fmt.au_set:
        return fmt
    info = Path(root) / DATASET_INFO
    try:
        name = json.loads(info.read_text())["au_set"]
    except (OSError, ValueError, KeyError, TypeError):
        raise AucliError(f"{info}: missing or unreadable; prepare the data with `aucli prepare {fmt.name}`") from None
    try:
        return replace(fmt, au_set=get_au_set(name).name)
    except ValueError as exc:
        raise AucliError(f"{info}: {exc}") from None


def write_dataset_info(root: str | Path, fmt: DatasetFormat, **details) -> None:
    path = Path(root) / DATASET_INFO
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"format": fmt.name, "au_set": fmt.au_set, **details}, indent=1) + "\n")
    tmp.replace(path)


def check_fold(fold: int) -> int:
    if fold not in FOLD_PARTS:
        raise AucliError(f"fold must be 1, 2 or 3, got {fold}")
    return fold


# ----- derived labels -------------------------------------------------------------------------


def derive_sub_labels(au_set: AUSet, labels: np.ndarray) -> np.ndarray:
    """Regional combination classes (F, n_branches); -1 where any AU of the branch is not 0/1."""
    labels = np.asarray(labels)
    classes = au_set.encode_regions(labels)
    known = (labels == 0) | (labels == 1)
    for b, idx in enumerate(au_set.bit_positions):
        classes[~known[:, idx].all(1), b] = PADDING
    return classes


def frame_number(path: str) -> int:
    """The trailing integer of a file name: BP4D `F007/T1/643.jpg` -> 643, DISFA `SN003/SN003_0.png` -> 0."""
    match = re.search(r"(\d+)$", Path(path).stem)
    return int(match.group(1)) if match else -1


def subject_of(path: str) -> str:
    """Both layouts start every path with the subject id."""
    return path.replace("\\", "/").split("/", 1)[0]


# ----- one split of one fold ------------------------------------------------------------------


@dataclass
class Split:
    """The frames of one list (train or test) with their labels, in list order."""

    fmt: DatasetFormat
    root: Path
    paths: list[str]
    labels: np.ndarray  # (F, N) int64: 0/1, 9 unknown
    sub_labels: np.ndarray  # (F, n_branches) int64, -1 where unknown
    weights: np.ndarray | None = None  # (N,) from the weight file; None -> derived from labels

    @property
    def au_set(self) -> AUSet:
        return get_au_set(self.fmt.au_set)

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, i: int) -> Path:
        return self.root / self.fmt.images / self.paths[i]

    def loss_weights(self) -> np.ndarray:
        """Per-AU weights of spec §5.4: the weight file if given, else derived from these labels."""
        if self.weights is not None:
            return self.weights
        return self.au_set.loss_weights(self.labels)

    @cached_property
    def video_keys(self) -> list[str]:
        depth = self.fmt.video_depth
        return ["/".join(p.replace("\\", "/").split("/")[:depth]) for p in self.paths]

    @property
    def subjects(self) -> list[str]:
        """Subjects in order of first appearance."""
        return list(dict.fromkeys(subject_of(p) for p in self.paths))

    def videos(self, split_on_gap: bool = False) -> list[range]:
        """Consecutive frame ranges of one video each (spec §7.3; with gaps, §7.4)."""
        keys = self.video_keys
        numbers = [frame_number(p) for p in self.paths] if split_on_gap else None
        starts = [0]
        for i in range(1, len(keys)):
            if keys[i] != keys[i - 1] or (numbers is not None and numbers[i] != numbers[i - 1] + 1):
                starts.append(i)
        ends = starts[1:] + [len(keys)]
        return [range(s, e) for s, e in zip(starts, ends) if e > s]

    def subset(self, subjects: set[str] | list[str]) -> Split:
        """Only the frames of these subjects; weights are then derived from what remains."""
        wanted = set(subjects)
        keep = np.array([subject_of(p) in wanted for p in self.paths], dtype=bool)
        return Split(self.fmt, self.root, [p for p, k in zip(self.paths, keep) if k],
                     self.labels[keep], self.sub_labels[keep], None)


def find_list(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / "list" / name):
        if candidate.is_file():
            return candidate
    return None


def _read_ints(path: Path, columns: int, what: str) -> np.ndarray:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            values = [int(float(v)) for v in line.split()]
        except ValueError:
            raise AucliError(f"{path}: line {n} is not a row of integers") from None
        if len(values) != columns:
            raise AucliError(f"{path}: line {n} has {len(values)} {what}, expected {columns}")
        rows.append(values)
    return np.array(rows, dtype=np.int64).reshape(-1, columns)


def load_split(root: str | Path, dataset: str | DatasetFormat, split: str, fold: int) -> Split:
    """Read one list of the standard layout; missing sub-labels and weights are derived."""
    root = Path(root)
    check_fold(fold)
    if not root.is_dir():
        raise AucliError(f"{root}: data root not found")
    fmt = resolve_format(dataset, root)
    au_set = get_au_set(fmt.au_set)
    paths_file = find_list(root, fmt.list_name(split, "paths", fold))
    labels_file = find_list(root, fmt.list_name(split, "label", fold))
    for name, found in ((fmt.list_name(split, "paths", fold), paths_file),
                        (fmt.list_name(split, "label", fold), labels_file)):
        if found is None:
            raise AucliError(f"{root}: {name} not found (expected the {fmt.name} list layout, spec §7.1)")
    paths = [line.strip() for line in paths_file.read_text().splitlines() if line.strip()]
    labels = _read_ints(labels_file, au_set.num_aus, "labels")
    if len(labels) != len(paths):
        raise AucliError(f"{labels_file}: {len(labels)} label rows for {len(paths)} image paths in {paths_file.name}")
    sub_file = find_list(root, fmt.list_name(split, "sub_label", fold))
    if sub_file is not None:
        sub_labels = _read_ints(sub_file, len(au_set.branches), "sub-labels")
        if len(sub_labels) != len(paths):
            raise AucliError(f"{sub_file}: {len(sub_labels)} rows for {len(paths)} image paths")
    else:
        sub_labels = derive_sub_labels(au_set, labels)
    weights = None
    weight_file = find_list(root, fmt.weight_name(fold)) if split == "train" else None
    if weight_file is not None:
        weights = np.array(weight_file.read_text().split(), dtype=np.float64)
        if len(weights) != au_set.num_aus:
            raise AucliError(f"{weight_file}: {len(weights)} weights, expected {au_set.num_aus}")
    if not paths:
        raise AucliError(f"{paths_file}: no image paths")
    first = root / fmt.images / paths[0]
    if not first.is_file():
        raise AucliError(f"{first}: image not found (images live under {root / fmt.images})")
    return Split(fmt, root, paths, labels, sub_labels, weights)


def write_split(root: str | Path, dataset: str | DatasetFormat, split: str, fold: int,
                paths: list[str], labels: np.ndarray) -> None:
    """Write the image list, labels, sub-labels and (for train) weights of one fold."""
    fmt, root = get_format(dataset), Path(root)
    au_set = get_au_set(fmt.au_set)
    labels = np.asarray(labels, dtype=np.int64).reshape(len(paths), au_set.num_aus)
    root.mkdir(parents=True, exist_ok=True)

    def write(name: str, lines: list[str]) -> None:
        tmp = root / f".{name}.tmp"
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(root / name)

    write(fmt.list_name(split, "paths", fold), list(paths))
    write(fmt.list_name(split, "label", fold), [" ".join(map(str, row)) for row in labels])
    sub = derive_sub_labels(au_set, labels)
    write(fmt.list_name(split, "sub_label", fold), [" ".join(map(str, row)) for row in sub])
    if split == "train":
        write(fmt.weight_name(fold), ["\t".join(f"{w:f}" for w in au_set.loss_weights(labels))])


def fold_subjects(parts: list[list[str]] | tuple, fold: int) -> tuple[list[str], list[str]]:
    """(train subjects, test subjects) of a fold, in list order (spec §7.5)."""
    (a, b), test = FOLD_PARTS[check_fold(fold)]
    return list(parts[a]) + list(parts[b]), list(parts[test])
