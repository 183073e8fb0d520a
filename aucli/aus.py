"""AU sets as data: BP4D, DISFA and OpenFace differ only in these tables (spec §0, §3).

Everything dataset-specific — the cross-region adjacency, the auxiliary class
counts, the regional combination labels, the activation mask and the per-AU
loss weights — is derived here from one table per AU set.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

#: FACS names of the AUs aucli knows about.
FACS_NAMES: dict[int, str] = {
    1: "Inner brow raiser",
    2: "Outer brow raiser",
    4: "Brow lowerer",
    5: "Upper lid raiser",
    6: "Cheek raiser",
    7: "Lid tightener",
    9: "Nose wrinkler",
    10: "Upper lip raiser",
    12: "Lip corner puller",
    14: "Dimpler",
    15: "Lip corner depressor",
    17: "Chin raiser",
    20: "Lip stretcher",
    23: "Lip tightener",
    24: "Lip pressor",
    25: "Lips part",
    26: "Jaw drop",
    28: "Lip suck",
    45: "Blink",
}

#: Rows of the 7x7 token map that each facial region sees (inclusive start, exclusive end).
REGION_ROWS: dict[str, tuple[int, int]] = {"up": (0, 3), "mid": (2, 5), "low": (4, 7)}


@dataclass(frozen=True)
class Branch:
    """One regional branch: its auxiliary head classifies the combination of its AUs."""

    name: str
    region: str  # key of REGION_ROWS
    aus: tuple[int, ...]  # AU numbers, most significant bit first (spec §3.5)

    @property
    def rows(self) -> tuple[int, int]:
        return REGION_ROWS[self.region]

    @property
    def num_classes(self) -> int:
        return 2 ** len(self.aus)


@dataclass(frozen=True)
class AUSet:
    """An ordered set of AUs with its regional branches."""

    name: str
    aus: tuple[int, ...]  # AU numbers in output order (spec §0.1)
    branches: tuple[Branch, ...]
    # The reference BP4D model puts a LinearBlock per branch before the AU
    # extractors; the DISFA model reads the raw region tokens (spec §3.2-3.3).
    branch_blocks: bool

    def __post_init__(self) -> None:
        listed = sorted(au for b in self.branches for au in b.aus)
        if listed != sorted(self.aus) or len(set(listed)) != len(listed):
            raise ValueError(f"AU set {self.name}: every AU must belong to exactly one branch")

    # ----- names -------------------------------------------------------------
    @property
    def num_aus(self) -> int:
        return len(self.aus)

    @property
    def labels(self) -> list[str]:
        """Zero-padded AU labels in output order: AU01, AU02, ..."""
        return [f"AU{au:02d}" for au in self.aus]

    @property
    def names(self) -> list[str]:
        return [FACS_NAMES[au] for au in self.aus]

    @property
    def branch_names(self) -> list[str]:
        return [b.name for b in self.branches]

    # ----- derived structure ---------------------------------------------------
    @cached_property
    def branch_index(self) -> np.ndarray:
        """(N,) index of the branch each AU (in output order) belongs to."""
        owner = {au: i for i, b in enumerate(self.branches) for au in b.aus}
        return np.array([owner[au] for au in self.aus], dtype=np.int64)

    @cached_property
    def adjacency(self) -> np.ndarray:
        """(N, N) cross-region graph: 1 where two AUs sit in different branches (spec §3.7)."""
        g = self.branch_index
        return (g[:, None] != g[None, :]).astype(np.float32)

    @property
    def aux_classes(self) -> list[int]:
        return [b.num_classes for b in self.branches]

    @cached_property
    def bit_positions(self) -> list[np.ndarray]:
        """For each branch, the output-order AU indices of its bits, MSB first."""
        pos = {au: i for i, au in enumerate(self.aus)}
        return [np.array([pos[au] for au in b.aus], dtype=np.int64) for b in self.branches]

    # ----- regional combination classes (spec §3.5, §3.6) ----------------------
    def encode_regions(self, labels: np.ndarray) -> np.ndarray:
        """AU labels (..., N) in {0,1} -> regional class indices (..., n_branches), MSB-first.

        Values other than 1 (0, unknown 9, padding -1) count as 0 bits.
        """
        labels = np.asarray(labels)
        bits = (labels == 1).astype(np.int64)
        out = []
        for idx in self.bit_positions:
            weights = 2 ** np.arange(len(idx) - 1, -1, -1)
            out.append((bits[..., idx] * weights).sum(-1))
        return np.stack(out, axis=-1)

    def decode_regions(self, classes: np.ndarray) -> np.ndarray:
        """Regional class indices (..., n_branches) -> AU bits (..., N) in output order."""
        classes = np.asarray(classes)
        out = np.zeros(classes.shape[:-1] + (self.num_aus,), dtype=np.int64)
        for b, idx in enumerate(self.bit_positions):
            n = len(idx)
            for i, au_index in enumerate(idx):
                out[..., au_index] = (classes[..., b] >> (n - 1 - i)) & 1
        return out

    # ----- loss weights (spec §5.4) ------------------------------------------------
    def loss_weights(self, labels: np.ndarray) -> np.ndarray:
        """Per-AU weights from training labels (frames, N): inverse positive rate, mean 1.

        Only 0/1 labels are counted, so unknown (9) and padding (-1) entries are ignored.
        An AU that is never positive gets the largest finite weight of the others.
        """
        labels = np.asarray(labels)
        known = (labels == 0) | (labels == 1)
        pos = ((labels == 1) & known).sum(0).astype(np.float64)
        total = known.sum(0).astype(np.float64)
        rate = np.divide(pos, total, out=np.zeros_like(pos), where=total > 0)
        inv = np.divide(1.0, rate, out=np.full_like(rate, np.nan), where=rate > 0)
        if np.isnan(inv).all():
            return np.ones(self.num_aus)
        inv = np.where(np.isnan(inv), np.nanmax(inv), inv)
        return inv / inv.sum() * self.num_aus


BP4D = AUSet(
    name="bp4d",
    aus=(1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24),
    branches=(
        Branch("up", "up", (1, 2, 4, 7)),
        Branch("mid", "mid", (6,)),
        Branch("down1", "low", (12, 14, 15)),
        Branch("down2", "low", (10, 17, 23, 24)),
    ),
    branch_blocks=True,
)

DISFA = AUSet(
    name="disfa",
    aus=(1, 2, 4, 6, 9, 12, 25, 26),
    branches=(
        Branch("up", "up", (1, 2, 4)),
        Branch("mid", "mid", (6, 9)),
        Branch("down", "low", (12, 25, 26)),
    ),
    branch_blocks=False,
)

# The 17 AUs OpenFace 2.0 codes with enough positives to learn from (its AU28 is present in
# 0.5 % of the teacher's frames and is left out). Branches follow FACS anatomy: brows and
# eyes, cheeks and nose, then the mouth split in two as BP4D's lower face is — lip corners
# (pulled, dimpled, depressed, stretched) and the lips and jaw (raised, chin, tightened,
# parted, dropped). Branches with several AUs get BP4D's regional LinearBlocks.
OPENFACE = AUSet(
    name="openface",
    aus=(1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 45),
    branches=(
        Branch("up", "up", (1, 2, 4, 5, 7, 45)),
        Branch("mid", "mid", (6, 9)),
        Branch("down1", "low", (12, 14, 15, 20)),
        Branch("down2", "low", (10, 17, 23, 25, 26)),
    ),
    branch_blocks=True,
)

AU_SETS: dict[str, AUSet] = {s.name: s for s in (BP4D, DISFA, OPENFACE)}


def get_au_set(name: str | AUSet) -> AUSet:
    """Look up an AU set by name (case-insensitive)."""
    if isinstance(name, AUSet):
        return name
    try:
        return AU_SETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown AU set {name!r}; choose one of: {', '.join(AU_SETS)}") from None
