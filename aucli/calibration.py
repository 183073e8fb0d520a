"""Per-video calibration: a linear head over each face track's frames, relative to the track.

OpenFace 2.0, the teacher of the starter model, decides AU occurrence from
appearance features minus their median over the whole video (person-specific
normalisation), so whether it calls an AU present depends on that person's
typical face. MDHR sees 16-frame windows and cannot know that. This head adds
it after MDHR, per face track:

* per frame: MDHR's probabilities (as log p), the backbone's final map
  averaged over space, a histogram of oriented gradients (HOG) of the
  grey 112-px face and, optionally, a Felzenszwalb HOG of the inner face (the
  kind of appearance feature OpenFace 2.0 itself uses), each projected on a
  fixed PCA basis;
* per track: the median of each of those over the track's frames;
* x = [log p, log p - median, backbone - median, HOG - median(, FHOG - median)
  (, the first FHOG components as they are)], standardised; one linear layer and a
  sigmoid give the calibrated probability of each AU.

OpenFace 2.0 itself uses person-specific ("dynamic") models for most AUs and
models without that normalisation ("static") for AU04, 06, 07, 10, 12 and 14,
which is why the head may also read FHOG components as they are.

OpenFace then smooths its occurrence decisions: each frame takes the majority of
the decisions of the 7 frames around it (``vote_decisions``). A head with
``vote`` does the same to its thresholded outputs, per track, and its
thresholds are tuned with the vote applied (``tune_voted_thresholds``).

MDHR itself is unchanged; a checkpoint either has the head (``video_head``)
or not. With it, a frame's output depends on every frame of its track, as
OpenFace's does. ``aucli calibrate`` fits it on a prepared dataset
(docs/models.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import AucliError

HOG_SIZE = 112  # the face is area-downscaled from 224 to this
HOG_CELL = 8  # pixels per cell side: 14 x 14 cells
HOG_BINS = 9  # unsigned orientations over 0..180 degrees
HOG_CLIP = 0.2  # block normalisation: L2, clip, L2 again
PROB_EPS = 1e-3  # log p with p clipped to [eps, 1 - eps]

# Felzenszwalb HOG ("FHOG": 18 signed and 9 unsigned orientations and 4 gradient energies per cell,
# each cell normalised by its four 2x2 blocks), on the inner face: this square of the aligned face
# (top, left and side as shares of its side; eyebrows to chin, cheek to cheek) area-resized to 112 px.
FHOG_CROP = (0.0859375, 0.109375, 0.78125)
FHOG_SIZE = 112
FHOG_CELL = 8  # 14 x 14 cells; the border cells only serve their neighbours' normalisation
FHOG_ORIENTATIONS = 18  # signed, over 0..360 degrees
FHOG_TRUNC = 0.2
DEFAULT_FHOG_ABSOLUTE = 128  # FHOG components the head also reads as they are (docs/models.md)
DEFAULT_VOTE = 7  # frames of OpenFace 2.0's majority vote over occurrence decisions (docs/models.md)


def _central_differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical central differences of (M, C, H, W), the border replicated
    (slices: a 3-tap convolution took 5x longer)."""
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2], padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]


def _halve(x: torch.Tensor) -> torch.Tensor:
    """(M, C, 2h, 2w) -> (M, C, h, w), each value the mean of its 2x2 block: the values of
    ``F.interpolate(mode="area")`` to the bit (the same four additions in the same order,
    and a quarter is exact), in a third of its time on CPU (16 model inputs: 1.7 ms
    instead of 5.4 on the 2-core Intel Xeon)."""
    v = x.view(*x.shape[:2], x.shape[2] // 2, 2, x.shape[3] // 2, 2)
    return (((v[:, :, :, 0, :, 0] + v[:, :, :, 0, :, 1]) + v[:, :, :, 1, :, 0]) + v[:, :, :, 1, :, 1]) * 0.25


def hog_dim(size: int = HOG_SIZE) -> int:
    blocks = size // HOG_CELL - 1
    return blocks * blocks * 4 * HOG_BINS


def hog(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Model-input frames (M, 3, H, W), normalised with mean/std -> HOG (M, hog_dim()) float32.

    The frames are de-normalised to [0, 1], averaged over the three channels, area-resized
    to 112 px; gradients by central differences, magnitudes voted into 9 orientation bins
    (linear between neighbouring bins) per 8-px cell, and each 2x2 block of cells
    normalised (L2, clipped at 0.2, L2 again).
    """
    x = frames.float()
    if x.shape[-2:] == (2 * HOG_SIZE, 2 * HOG_SIZE):  # the model's 224-px input
        x = _halve(x)
    elif x.shape[-1] != HOG_SIZE or x.shape[-2] != HOG_SIZE:
        x = F.interpolate(x, size=HOG_SIZE, mode="area")  # averaging commutes with de-normalising
    # The channel mean of the de-normalised frame, x * std + mean, as one weighted sum.
    weight = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 3
    gray = (x * weight).sum(1, keepdim=True) + sum(mean) / 3
    gx, gy = _central_differences(gray)
    magnitude = torch.sqrt(gx * gx + gy * gy)
    position = torch.remainder(torch.atan2(gy, gx), math.pi) * (HOG_BINS / math.pi)
    low = torch.floor(position)
    upper_share = position - low
    low = low.long() % HOG_BINS
    hist = torch.zeros(gray.shape[0], HOG_BINS, *gray.shape[2:], device=x.device)
    hist.scatter_add_(1, low, magnitude * (1 - upper_share))
    hist.scatter_add_(1, (low + 1) % HOG_BINS, magnitude * upper_share)
    cells = F.avg_pool2d(hist, HOG_CELL) * (HOG_CELL * HOG_CELL)
    h, w = cells.shape[2:]
    blocks = torch.cat([cells[:, :, i : h - 1 + i, j : w - 1 + j] for i in (0, 1) for j in (0, 1)], 1)
    blocks = blocks / (blocks.norm(dim=1, keepdim=True) + 1e-3)
    blocks = blocks.clamp(max=HOG_CLIP)
    blocks = blocks / (blocks.norm(dim=1, keepdim=True) + 1e-3)
    return blocks.flatten(1)


def fhog_dim() -> int:
    inner = FHOG_SIZE // FHOG_CELL - 2
    return inner * inner * (FHOG_ORIENTATIONS + FHOG_ORIENTATIONS // 2 + 4)


def _tent(device: torch.device) -> torch.Tensor:
    """(cells, pixels): each pixel's share in the cells whose centres are within one cell of it."""
    pixels = torch.arange(FHOG_SIZE, device=device, dtype=torch.float32) + 0.5
    centres = torch.arange(FHOG_SIZE // FHOG_CELL, device=device, dtype=torch.float32) * FHOG_CELL + FHOG_CELL / 2
    return (1 - (pixels[None] - centres[:, None]).abs() / FHOG_CELL).clamp(min=0)


def fhog(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Model-input frames (M, 3, H, W), normalised with mean/std -> FHOG (M, fhog_dim()) float32.

    The inner face (FHOG_CROP) is de-normalised to 0..255 and area-resized to 112 px. Per pixel,
    the colour channel with the strongest gradient (central differences) votes its magnitude
    for the nearest of 18 directions, shared between the four nearest 8-px cells (bilinear).
    Per inner cell, each of its four 2x2 blocks of cells gives a normaliser (the block's
    unsigned-orientation energy); the 18 signed and 9 unsigned histograms, normalised by each,
    truncated at 0.2 and summed over the four, and per normaliser the sum over the 18
    directions, make 31 values (Felzenszwalb et al., PAMI 2010).
    """
    x = frames.float()
    side = x.shape[-1]
    top, left, size = (int(round(share * side)) for share in FHOG_CROP)
    x = x[:, :, top : top + size, left : left + size]
    x = F.interpolate(x, size=FHOG_SIZE, mode="area")
    scale = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    gx, gy = _central_differences(x * scale)  # the offset (mean) cancels in the differences
    energy2 = gx * gx + gy * gy  # per channel; keep the strongest (comparisons: argmax over 3 is slow)
    best_x, best_y, best = gx[:, :1], gy[:, :1], energy2[:, :1]
    for c in (1, 2):
        stronger = energy2[:, c : c + 1] > best
        best_x = torch.where(stronger, gx[:, c : c + 1], best_x)
        best_y = torch.where(stronger, gy[:, c : c + 1], best_y)
        best = torch.maximum(best, energy2[:, c : c + 1])
    # Below a hundredth of a grey level a gradient is the rounding of the de-normalisation: none.
    gx, gy, magnitude = best_x, best_y, torch.where(best > 1e-4, torch.sqrt(best), 0.0)
    direction = torch.round(torch.atan2(gy, gx) * (FHOG_ORIENTATIONS / (2 * math.pi))).long() % FHOG_ORIENTATIONS
    votes = torch.zeros(x.shape[0], FHOG_ORIENTATIONS, FHOG_SIZE, FHOG_SIZE, device=x.device)
    votes.scatter_(1, direction, magnitude)
    tent = _tent(x.device)
    hist = tent @ votes @ tent.T  # (M, 18, 14, 14)
    half = FHOG_ORIENTATIONS // 2
    energy = (hist[:, :half] + hist[:, half:]).pow(2).sum(1)
    blocks = energy[:, :-1, :-1] + energy[:, 1:, :-1] + energy[:, :-1, 1:] + energy[:, 1:, 1:]
    inverse = torch.rsqrt(blocks + 1e-4)
    norms = [inverse[:, 1:, 1:], inverse[:, :-1, 1:], inverse[:, 1:, :-1], inverse[:, :-1, :-1]]
    signed = hist[:, :, 1:-1, 1:-1]
    unsigned = signed[:, :half] + signed[:, half:]
    parts_signed, parts_unsigned, texture = 0, 0, []
    for norm in norms:
        n = norm[:, None]
        cut = (signed * n).clamp(max=FHOG_TRUNC)
        parts_signed = parts_signed + cut
        parts_unsigned = parts_unsigned + (unsigned * n).clamp(max=FHOG_TRUNC)
        texture.append(cut.sum(1))
    out = torch.cat([0.5 * parts_signed, 0.5 * parts_unsigned, 0.2357 * torch.stack(texture, 1)], 1)
    return out.permute(0, 2, 3, 1).flatten(1)


def pooled(final_map: torch.Tensor) -> torch.Tensor:
    """The backbone's final map (M, C, h, w) averaged over space -> (M, C) float32."""
    return final_map.float().mean((2, 3))


def raw_frame_features(frames: torch.Tensor, final_map: torch.Tensor, mean, std, with_fhog: bool) -> torch.Tensor:
    """Un-projected per-frame features [pooled backbone, HOG(, FHOG)] (M, C + D(+ D2))."""
    parts = [pooled(final_map), hog(frames, mean, std)]
    if with_fhog:
        parts.append(fhog(frames, mean, std))
    return torch.cat(parts, 1)


CALIBRATE_ROWS = 2048  # frames per step of VideoHead.calibrate: its working memory does not grow with a track
MEDIAN_COLUMNS = 64  # columns per step of a track's medians, for the same reason


def log_probs(probs: np.ndarray) -> np.ndarray:
    """log p (float64) with p clipped to [PROB_EPS, 1 - PROB_EPS]."""
    return np.log(np.clip(probs.astype(np.float64), PROB_EPS, 1 - PROB_EPS))


def column_medians(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The per-column median (D,) float64 of ``x[rows]``, read a block of columns at a time."""
    return np.concatenate([np.median(x[rows, c : c + MEDIAN_COLUMNS].astype(np.float64), axis=0)
                           for c in range(0, x.shape[1], MEDIAN_COLUMNS)] or [np.zeros(0)])


def group_medians(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each row replaced by the per-column median of the rows of its group."""
    out = np.empty_like(x)
    for g in np.unique(groups):
        rows = groups == g
        out[rows] = column_medians(x, rows)
    return out


def vote_decisions(decisions: np.ndarray, groups: np.ndarray, window: int) -> np.ndarray:
    """OpenFace 2.0's smoothing of occurrence decisions (F, N): per track (``groups``), in row
    order, each row whose centred window of ``window`` rows lies inside the track takes the
    majority of that window's decisions (as they were before smoothing); the first and last
    ``window // 2`` rows of a track, and tracks shorter than the window, keep their own.
    ``window`` 0 leaves the decisions as they are."""
    decisions = np.asarray(decisions, bool)
    out = decisions.copy()
    if window == 0:
        return out
    half = window // 2
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        if len(rows) < window:
            continue
        counts = np.concatenate([np.zeros((1, decisions.shape[1]), np.int64),
                                 np.cumsum(decisions[rows], axis=0, dtype=np.int64)])
        out[rows[half : len(rows) - half]] = 2 * (counts[window:] - counts[:-window]) >= window
    return out


def _valid_vote(vote: int) -> bool:
    """A vote window is 0 (none) or an odd number of frames, 3 or more."""
    return vote == 0 or (vote >= 3 and vote % 2 == 1)


def _valid_absolute(fhog_absolute: int, fhog_components: int) -> bool:
    """The FHOG components given as they are must be some of those the head has."""
    return 0 <= fhog_absolute <= fhog_components


def check_vote(vote: int) -> None:
    """``_valid_vote``, as a one-line error naming the option."""
    if not _valid_vote(vote):
        raise AucliError(f"--vote {vote}: 0 (no vote) or an odd number of frames, 3 or more")


def tune_voted_thresholds(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, window: int,
                          grid: np.ndarray) -> list[float]:
    """Per-AU threshold maximising pooled F1 of the decisions after ``vote_decisions`` (the
    first best on ``grid``, as ``evaluate.tune_thresholds``; a validation split, never test)."""
    from .evaluate import confusion, scores

    grid = np.asarray(grid, np.float64)
    best = []
    for n in range(probs.shape[1]):
        voted = vote_decisions(probs[:, n : n + 1] >= grid, groups, window)  # (F, len(grid))
        known = labels[:, n : n + 1]
        f1s = scores(confusion(voted, np.broadcast_to(known, voted.shape), 0.5))[0]
        best.append(float(grid[int(np.argmax(f1s))]))
    return best


class VideoHead(nn.Module):
    """The calibration head: PCA bases for HOG (and FHOG), standardisation and one linear layer.

    ``fhog_components`` = 0 (heads fitted before FHOG was added) leaves FHOG out;
    ``fhog_absolute`` = K > 0 also gives the first K FHOG components as they are, not relative
    to the track (0 for heads fitted before that was added); ``vote`` = W > 0 smooths the
    thresholded outputs of each track by a majority of W frames (``decide``; 0 for heads
    fitted before that was added)."""

    def __init__(self, num_aus: int, backbone_channels: int, hog_components: int, fhog_components: int = 0,
                 fhog_absolute: int = 0, vote: int = 0) -> None:
        super().__init__()
        if not _valid_absolute(fhog_absolute, fhog_components):
            raise ValueError(f"fhog_absolute {fhog_absolute} not between 0 and fhog_components {fhog_components}")
        if not _valid_vote(vote):
            raise ValueError(f"vote {vote}: not 0 or an odd number of frames, 3 or more")
        self.num_aus, self.backbone_channels, self.hog_components = num_aus, backbone_channels, hog_components
        self.fhog_components, self.fhog_absolute, self.vote = fhog_components, fhog_absolute, vote
        width = 2 * num_aus + backbone_channels + hog_components + fhog_components + fhog_absolute
        self.register_buffer("hog_mean", torch.zeros(hog_dim()))
        self.register_buffer("hog_basis", torch.zeros(hog_components, hog_dim()))
        if fhog_components:
            self.register_buffer("fhog_mean", torch.zeros(fhog_dim()))
            self.register_buffer("fhog_basis", torch.zeros(fhog_components, fhog_dim()))
        self.register_buffer("x_mean", torch.zeros(width))
        self.register_buffer("x_std", torch.ones(width))
        self.linear = nn.Linear(width, num_aus)

    @property
    def config(self) -> dict[str, int]:
        config = {"num_aus": self.num_aus, "backbone_channels": self.backbone_channels,
                  "hog_components": self.hog_components}
        if self.fhog_components:
            config["fhog_components"] = self.fhog_components
        if self.fhog_absolute:
            config["fhog_absolute"] = self.fhog_absolute
        if self.vote:
            config["vote"] = self.vote
        return config

    @property
    def frame_width(self) -> int:
        return self.backbone_channels + self.hog_components + self.fhog_components

    def project_hog(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw HOG (M, hog_dim()) -> its (M, K) PCA components."""
        return (raw - self.hog_mean.to(raw.device)) @ self.hog_basis.to(raw.device).float().T

    def project_fhog(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw FHOG (M, fhog_dim()) -> its (M, K2) PCA components."""
        return (raw - self.fhog_mean.to(raw.device)) @ self.fhog_basis.to(raw.device).float().T

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw per-frame features [pooled backbone, HOG(, FHOG)] (M, C + D(+ D2)) -> (M, frame_width)."""
        c, d = self.backbone_channels, hog_dim()
        parts = [raw[:, :c], self.project_hog(raw[:, c : c + d])]
        if self.fhog_components:
            parts.append(self.project_fhog(raw[:, c + d :]))
        return torch.cat(parts, 1)

    def frame_features(self, frames: torch.Tensor, final_map: torch.Tensor, mean, std) -> torch.Tensor:
        """Per-frame inputs (M, frame_width) from the model-input frames and the backbone's final map."""
        return self.project(raw_frame_features(frames, final_map, mean, std, self.fhog_components > 0)).cpu()

    def _assemble(self, logp: np.ndarray, feats: np.ndarray, logp_median, feats_median) -> np.ndarray:
        """The head's input rows from float64 log p and features and their tracks' medians."""
        parts = [logp, logp - logp_median, feats - feats_median]
        if self.fhog_absolute:
            start = self.backbone_channels + self.hog_components
            parts.append(feats[:, start : start + self.fhog_absolute])
        return np.concatenate(parts, 1).astype(np.float32)

    def inputs(self, probs: np.ndarray, features: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """(F, N) MDHR probabilities and (F, C + K) frame features of tracks ``groups`` -> (F, width)."""
        logp, feats = log_probs(probs), features.astype(np.float64)
        return self._assemble(logp, feats, group_medians(logp, groups), group_medians(feats, groups))

    @torch.no_grad()
    def calibrate(self, probs: np.ndarray, features: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (F, N) for frames of one or more tracks: ``inputs`` and the linear
        layer, a track and CALIBRATE_ROWS frames at a time, so that long videos need no more memory."""
        out = np.empty(probs.shape, np.float32)
        for g in np.unique(groups):
            rows = np.flatnonzero(groups == g)
            logp_median = np.median(log_probs(probs[rows]), axis=0)
            feats_median = column_medians(features, rows)
            for start in range(0, len(rows), CALIBRATE_ROWS):
                part = rows[start : start + CALIBRATE_ROWS]
                x = torch.from_numpy(self._assemble(log_probs(probs[part]), features[part].astype(np.float64),
                                                    logp_median, feats_median))
                z = self.linear(((x - self.x_mean.float()) / self.x_std.float()).to(self.linear.weight.dtype))
                out[part] = torch.sigmoid(z.float()).numpy()
        return out

    def decide(self, probs: np.ndarray, thresholds, groups: np.ndarray) -> np.ndarray:
        """Occurrence decisions (F, N) bool from calibrated probabilities of tracks ``groups``
        (each track's rows in frame order): at or above the threshold, then the vote if any."""
        decisions = np.asarray(probs, np.float64) >= np.asarray(thresholds, np.float64)
        return vote_decisions(decisions, groups, self.vote)


def head_state(head: VideoHead) -> dict[str, Any]:
    """What a checkpoint stores under ``video_head``: the config and the tensors (basis in fp16)."""
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    for name in ("hog_basis", "fhog_basis"):
        if name in state:
            state[name] = state[name].half()
    return {"config": head.config, "state_dict": state}


def head_from_state(stored: Any, where: str) -> VideoHead:
    """Rebuild a VideoHead from a checkpoint's ``video_head`` entry, checking its shapes."""
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict) \
            or not isinstance(stored.get("state_dict"), dict):
        raise AucliError(f"{where}: malformed video_head entry")
    try:
        head = VideoHead(**{k: int(v) for k, v in stored["config"].items()})
        own = head.state_dict()
        state = stored["state_dict"]
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise AucliError(f"{where}: video_head tensors do not match its config")
        head.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    except (TypeError, ValueError) as exc:
        raise AucliError(f"{where}: malformed video_head config ({exc})") from None
    return head.eval()


def check_absolute(fhog_absolute: int, fhog_components: int) -> None:
    """``_valid_absolute``, as a one-line error naming the options."""
    if not _valid_absolute(fhog_absolute, fhog_components):
        raise AucliError(f"--fhog-absolute {fhog_absolute}: at most --fhog-components ({fhog_components})")


def fit_head(probs: np.ndarray, features: np.ndarray, hogs: np.ndarray, groups: np.ndarray,
             labels: np.ndarray, *, hog_components: int = 256, fhogs: np.ndarray | None = None,
             fhog_components: int = 0, fhog_absolute: int = 0, vote: int = 0, epochs: int = 60,
             lr: float = 1e-3, l2: float = 1e-3, seed: int = 0, progress=None) -> VideoHead:
    """Fit the head on training frames: MDHR probs (F, N), pooled backbone (F, C), raw HOG (F, D)
    and, with ``fhog_components``, raw FHOG ``fhogs`` (F, D2); ``fhog_absolute`` of its components
    are also given as they are; ``vote`` is stored for ``decide`` (it does not change the fit).

    PCA of HOG (and FHOG) on every 4th training frame; weighted logistic loss (positives and
    negatives of each AU weighted to equal shares, unknown labels masked), Adam in batches of 1024.
    """
    generator = torch.Generator().manual_seed(seed)
    num_aus, channels = probs.shape[1], features.shape[1]
    if not len(probs) == len(features) == len(hogs) == len(groups) == len(labels) or labels.shape[1] != num_aus:
        raise AucliError("calibration inputs disagree in frames or AUs")
    blocks = [("hog", hogs, hog_components)]
    if fhog_components:
        if fhogs is None or len(fhogs) != len(probs):
            raise AucliError("calibration inputs disagree in frames or AUs")
        blocks.append(("fhog", fhogs, fhog_components))
    check_absolute(fhog_absolute, fhog_components)
    check_vote(vote)
    for name, raw, k in blocks:
        if k > min(raw.shape[1], len(raw[::4])):
            raise AucliError(f"--{name}-components {k}: at most {min(raw.shape[1], len(raw[::4]))} "
                             "for this many frames")
    head = VideoHead(num_aus, channels, hog_components, fhog_components, fhog_absolute, vote)
    projected = [features]
    for name, raw, k in blocks:
        raw_mean = raw.mean(0)
        _, _, vt = np.linalg.svd(raw[::4] - raw_mean, full_matrices=False)
        basis = vt[:k].astype(np.float16)  # as stored: fit with the basis the checkpoint holds
        getattr(head, f"{name}_mean").copy_(torch.from_numpy(raw_mean))
        getattr(head, f"{name}_basis").copy_(torch.from_numpy(basis.astype(np.float32)))
        project = getattr(head, f"project_{name}")
        projected.append(project(torch.from_numpy(np.asarray(raw, np.float32))).numpy())
    x = head.inputs(probs, np.concatenate(projected, 1), groups)
    mean, std = x.mean(0), x.std(0) + 1e-4
    head.x_mean.copy_(torch.from_numpy(mean))
    head.x_std.copy_(torch.from_numpy(std))
    x = torch.from_numpy((x - mean) / std)
    known = torch.from_numpy((labels == 0) | (labels == 1)).float()
    y = torch.from_numpy(labels == 1).float()
    rate = (y.sum(0) / known.sum(0).clamp(min=1)).clamp(0.02, 0.98)
    w_pos, w_neg = 0.5 / rate, 0.5 / (1 - rate)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head.linear.reset_parameters()
    opt = torch.optim.Adam(head.linear.parameters(), lr)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 1024):
            rows = order[start : start + 1024]
            z = head.linear(x[rows])
            weight = (y[rows] * w_pos + (1 - y[rows]) * w_neg) * known[rows]
            loss = (F.binary_cross_entropy_with_logits(z, y[rows], reduction="none") * weight).sum()
            loss = loss / known[rows].sum().clamp(min=1) + l2 * head.linear.weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if progress is not None:
            progress()
    return head.eval()


def calibrate_checkpoint(checkpoint, output, *, data_root=None, dataset: str | None = None,
                         fold: int | None = None, val_fraction: float = 0.15, seed: int = 0,
                         hog_components: int = 256, fhog_components: int = 256, fhog_absolute: int | None = None,
                         vote: int = DEFAULT_VOTE, epochs: int = 60, lr: float = 1e-3, l2: float = 1e-3,
                         batch_size: int = 4, device: str = "cpu", workers: int = 0,
                         log=None) -> dict[str, Any]:
    """Fit a calibration head for ``checkpoint`` on the training people of its fold, tune the
    thresholds of its outputs on the held-out validation people, write ``output``.

    Validation people: the ones the checkpoint's training run held out (its ``val_subjects``),
    else a seeded ``val_fraction`` of the training people, as ``aucli train`` chooses them.
    """
    from pathlib import Path

    from .aus import get_au_set
    from .checkpoint import load_model, save_with_video_head
    from .data.layout import load_split
    from .evaluate import au_metrics, checkpoint_data, decision_metrics, predict_reference, video_groups
    from .inference import resolve_precision
    from .train import hold_out_subjects

    log = log or (lambda _line: None)
    if fhog_absolute is None:
        fhog_absolute = min(DEFAULT_FHOG_ABSOLUTE, fhog_components)
    check_absolute(fhog_absolute, fhog_components)
    check_vote(vote)
    output = Path(output)
    if output.exists() and Path(checkpoint).resolve() == output.resolve():
        raise AucliError(f"{output}: choose an output other than the checkpoint itself")
    model = load_model(checkpoint, device)
    meta = model.metadata
    source = meta.source or {}
    fmt, data_root, fold = checkpoint_data(model, checkpoint, data_root=data_root, dataset=dataset,
                                           fold=fold or source.get("fold") or 1)
    train = load_split(data_root, fmt, "train", fold)
    val_subjects = [s for s in source.get("val_subjects") or [] if s in set(train.subjects)]
    if not val_subjects:
        val_subjects = hold_out_subjects(train.subjects, val_fraction, seed)
    splits = {"train": train.subset([s for s in train.subjects if s not in set(val_subjects)]),
              "val": train.subset(val_subjects)}
    if len(splits["train"]) == 0:
        raise AucliError(f"{data_root}: no training frames left after holding out the validation people")
    dtype = torch.bfloat16 if resolve_precision("auto", torch.device(device)) == "bf16" else None

    def raw_features(frames, final_map):
        return raw_frame_features(frames, final_map, meta.mean, meta.std, fhog_components > 0).cpu()

    outputs = {}
    for name, split in splits.items():
        log(f"running the model over {len(split)} {name} frames ({len(split.subjects)} people)")
        outputs[name] = predict_reference(model, split, meta.clip_length, batch_size=batch_size, device=device,
                                          workers=workers, autocast_dtype=dtype, frame_features=raw_features)
    channels = int(model.backbone.token_channels)
    probs, feats = outputs["train"]
    log(f"fitting the head ({epochs} epochs)")
    end = channels + hog_dim()
    head = fit_head(probs, feats[:, :channels], feats[:, channels:end], video_groups(splits["train"]),
                    splits["train"].labels, hog_components=hog_components,
                    fhogs=feats[:, end:] if fhog_components else None, fhog_components=fhog_components,
                    fhog_absolute=fhog_absolute, vote=vote, epochs=epochs, lr=lr, l2=l2, seed=seed)

    def calibrated(name: str) -> np.ndarray:
        p, f = outputs[name]
        return head.calibrate(p, head.project(torch.from_numpy(f)).numpy(), video_groups(splits[name]))

    val_probs, val_groups = calibrated("val"), video_groups(splits["val"])
    # With vote 0 this is evaluate.tune_thresholds (tests/test_calibration.py).
    thresholds = tune_voted_thresholds(val_probs, splits["val"].labels, val_groups, vote,
                                       np.round(np.arange(0.02, 0.981, 0.02), 2))
    au_set = get_au_set(meta.au_set)
    val = decision_metrics(head, au_set, val_probs, splits["val"].labels, thresholds, val_groups)
    # What the checkpoint gave before: MDHR alone, or the head it already has (its thresholds are that
    # head's), the latter on the same frames if the features computed here cover what it reads.
    previous = getattr(model, "video_head", None)
    if previous is None:
        before = au_metrics(au_set, outputs["val"][0], splits["val"].labels, meta.thresholds)
    elif previous.fhog_components and not fhog_components:
        before = None
    else:
        p, f = outputs["val"]  # project() reads only the columns this head has
        before = decision_metrics(previous, au_set,
                                  previous.calibrate(p, previous.project(torch.from_numpy(f)).numpy(), val_groups),
                                  splits["val"].labels, meta.thresholds, val_groups)
    record = {"video_head": {"fitted_on": "training people", "train_frames": len(splits["train"]),
                             "val_subjects": sorted(val_subjects), "hog_components": hog_components,
                             "fhog_components": fhog_components, "fhog_absolute": fhog_absolute,
                             "vote": vote, "epochs": epochs, "lr": lr, "l2": l2, "seed": seed,
                             "val_mean_f1": val.mean_f1}}
    if before is not None:
        key = "val_mean_f1_without" if previous is None else "val_mean_f1_previous_head"
        record["video_head"][key] = before.mean_f1
    save_with_video_head(checkpoint, output, head_state(head), thresholds, record)
    return {"output": str(output), "val": val, "before": before, "replaced_head": previous is not None,
            "val_subjects": sorted(val_subjects)}
