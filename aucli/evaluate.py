"""Metrics and the two evaluation protocols (spec §6.4, §7.4).

``reference``: non-overlapping T-frame clips of each test video, the tail clip
padded with its last frame; padded frames are excluded and F1 is pooled over
all frames of the fold. Frames near a clip's edges see little temporal context.
``detect``: the frames of each test video go through the sliding windows
``aucli detect`` uses (aucli.windows), so every frame sits at the centre of a
window and video borders repeat the first/last face.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .aus import AUSet, get_au_set
from .errors import AucliError

PROTOCOLS = ("reference", "detect")


# ----- metrics (spec §6.4) ------------------------------------------------------------------


def confusion(probs: np.ndarray, labels: np.ndarray, thresholds) -> np.ndarray:
    """Per-AU [TP, FP, FN, TN] (N, 4), pooled over frames; labels other than 0/1 are ignored."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    pred = probs >= np.asarray(thresholds, dtype=np.float64)
    pos, neg = labels == 1, labels == 0
    return np.stack([(pred & pos).sum(0), (pred & neg).sum(0),
                     (~pred & pos).sum(0), (~pred & neg).sum(0)], axis=1).astype(np.int64)


def scores(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) counts -> per-AU F1 and accuracy in [0, 1], with the reference's 1e-20 guards."""
    tp, fp, fn, tn = (counts[:, i].astype(np.float64) for i in range(4))
    precision = tp / (tp + fp + 1e-20)
    recall = tp / (tp + fn + 1e-20)
    f1 = 2 * precision * recall / (precision + recall + 1e-20)
    total = tp + fp + fn + tn
    accuracy = np.divide(tp + tn, total, out=np.zeros_like(tp), where=total > 0)
    return f1, accuracy


@dataclass
class AUMetrics:
    """Per-AU F1 and accuracy (percent) and their means, as reported by the reference."""

    aus: list[str]
    f1: list[float]
    accuracy: list[float]
    frames: int
    thresholds: list[float] = field(default_factory=list)

    @property
    def mean_f1(self) -> float:
        return float(np.mean(self.f1))

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean(self.accuracy))

    def to_dict(self) -> dict[str, Any]:
        return {"mean_f1": self.mean_f1, "mean_accuracy": self.mean_accuracy, "frames": self.frames,
                "f1": dict(zip(self.aus, self.f1)), "accuracy": dict(zip(self.aus, self.accuracy)),
                "thresholds": dict(zip(self.aus, self.thresholds))}

    def table(self):
        """A DataFrame with one row per AU and a final "mean" row."""
        import pandas as pd

        df = pd.DataFrame({"AU": self.aus, "F1": self.f1, "accuracy": self.accuracy, "threshold": self.thresholds})
        mean = pd.DataFrame({"AU": ["mean"], "F1": [self.mean_f1], "accuracy": [self.mean_accuracy],
                             "threshold": [float("nan")]})
        return pd.concat([df, mean], ignore_index=True)


def au_metrics(au_set: AUSet, probs: np.ndarray, labels: np.ndarray, thresholds=0.5) -> AUMetrics:
    """Pooled per-AU F1 and accuracy over frames (F, N), ×100 (spec §6.4)."""
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (au_set.num_aus,))
    f1, acc = scores(confusion(probs, labels, thresholds))
    known = ((np.asarray(labels) == 0) | (np.asarray(labels) == 1)).any(1).sum()
    return AUMetrics(au_set.labels, (100 * f1).tolist(), (100 * acc).tolist(), int(known),
                     [float(t) for t in thresholds])


def decision_metrics(head, au_set: AUSet, probs: np.ndarray, labels: np.ndarray, thresholds,
                     groups: np.ndarray) -> AUMetrics:
    """``au_metrics`` of the decisions a model makes: with a calibration head that votes
    (aucli/calibration.py), of its thresholded probabilities after the vote over each video
    (``groups``, rows in frame order); else of the probabilities at the thresholds."""
    if head is None or not head.vote:
        return au_metrics(au_set, probs, labels, thresholds)
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (au_set.num_aus,))
    metrics = au_metrics(au_set, head.decide(probs, thresholds, groups), labels, 0.5)
    metrics.thresholds = [float(t) for t in thresholds]
    return metrics


def tune_thresholds(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray | None = None) -> list[float]:
    """Per-AU threshold maximising pooled F1 on these frames (use a validation split, never test)."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2) if grid is None else grid
    best = []
    for n in range(probs.shape[1]):
        f1s = [scores(confusion(probs[:, n : n + 1], labels[:, n : n + 1], [t]))[0][0] for t in grid]
        best.append(float(grid[int(np.argmax(f1s))]))
    return best


# ----- running a model over a split -----------------------------------------------------------


def _gather(obj: Any) -> list[Any]:
    """Objects of every process (or just this one without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def predict_reference(model: torch.nn.Module, split, clip_length: int, *, batch_size: int = 8,
                      device: str | torch.device = "cpu", workers: int = 0, rank: int = 0,
                      world_size: int = 1, autocast_dtype: torch.dtype | None = None,
                      frame_features=None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Probabilities (F, N) for every frame of `split` from non-overlapping T-frame clips (spec §7.4).

    With several processes each takes every world_size-th clip; all get the full result.
    ``frame_features(frames, final_map) -> (M, D)``: also return those per frame (F, D),
    from the same backbone pass (the calibration head's inputs, aucli/calibration.py).
    """
    from torch.utils.data import DataLoader, Subset

    from .data.clips import EvalClips

    data = EvalClips(split, clip_length)
    shard = Subset(data, list(range(rank, len(data), world_size)))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, shuffle=False)
    was_training = model.training
    model.eval()
    index, values, extras = [], [], []
    device = torch.device(device)
    final_maps: list[torch.Tensor] = []
    hook = None
    if frame_features is not None:
        hook = model.backbone.register_forward_hook(lambda _m, _i, out: final_maps.append(out.maps[-1]))
    try:
        for batch in loader:
            clips = batch["clips"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                probs = model(clips)
            real = batch["real"]
            index.append(batch["frames"][real].numpy())
            values.append(probs.float().cpu()[real].numpy())
            if frame_features is not None:
                feats = frame_features(clips.flatten(0, 1), final_maps.pop()).float()
                extras.append(feats.view(*real.shape, -1)[real].numpy())
    finally:
        if hook is not None:
            hook.remove()
    model.train(was_training)
    n = split.au_set.num_aus
    width = extras[0].shape[1] if extras else 0
    parts = _gather((np.concatenate(index) if index else np.zeros(0, np.int64),
                     np.concatenate(values) if values else np.zeros((0, n), np.float32),
                     np.concatenate(extras) if extras else np.zeros((0, width), np.float32)))
    out = np.full((len(split), n), np.nan, dtype=np.float32)
    feats = np.full((len(split), max(p[2].shape[1] for p in parts)), np.nan, dtype=np.float32)
    for idx, val, extra in parts:
        out[idx] = val
        if extra.shape[1]:
            feats[idx] = extra
    return (out, feats) if frame_features is not None else out


@torch.no_grad()
def predict_detect(model: torch.nn.Module, split, clip_length: int, *, batch_size: int = 8,
                   device: str | torch.device = "cpu", frame_features=None,
                   **_: Any) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Probabilities (F, N) from detect's sliding windows (aucli.windows) over each test video's crops.

    Each video (split as for test clips, spec §7.4) is one track segment; every frame is
    predicted at the centre of its own window, borders repeat the first/last face.
    """
    from .data.clips import read_image
    from .faces import face_to_tensor
    from .windows import WindowPredictor

    model.eval()
    predictor = WindowPredictor(model, clip_length, face_to_tensor, batch_size=batch_size * clip_length,
                                device=device, frame_features=frame_features)
    out = np.full((len(split), split.au_set.num_aus), np.nan, dtype=np.float32)
    feats: list[tuple[int, np.ndarray]] = []

    def collect() -> None:
        for i, probs in predictor.pop_results():
            out[i] = probs
            if frame_features is not None:
                feats.append((i, predictor.features.pop(i)))

    for v, video in enumerate(split.videos(split_on_gap=split.fmt.split_on_gap)):
        for i in video:
            predictor.add(v, i, read_image(split.image_path(i)))
        predictor.end(v)
        collect()
    predictor.flush()
    collect()
    if frame_features is None:
        return out
    table = np.full((len(split), feats[0][1].shape[0] if feats else 0), np.nan, dtype=np.float32)
    for i, row in feats:
        table[i] = row
    return out, table


PREDICTORS = {"reference": predict_reference, "detect": predict_detect}


def video_groups(split) -> np.ndarray:
    """One group id per frame: its video (the calibration head's unit, as a face track in detect)."""
    return np.unique(np.asarray(split.video_keys), return_inverse=True)[1]


def predict_calibrated(model: torch.nn.Module, split, protocol: str = "reference",
                       **options: Any) -> np.ndarray:
    """The model's final probabilities (F, N): with a calibration head (``model.video_head``),
    MDHR's probabilities calibrated per video (aucli/calibration.py); else MDHR's own."""
    head = getattr(model, "video_head", None)
    meta = model.metadata
    if head is None:
        return PREDICTORS[protocol](model, split, meta.clip_length, **options)

    def frame_features(frames, final_map):
        return head.frame_features(frames, final_map, meta.mean, meta.std)

    probs, feats = PREDICTORS[protocol](model, split, meta.clip_length, frame_features=frame_features, **options)
    return head.calibrate(probs, feats, video_groups(split))


# ----- evaluating a checkpoint ----------------------------------------------------------------


@dataclass
class EvalResult:
    metrics: AUMetrics
    dataset: str
    fold: int
    split: str
    protocol: str
    data_root: str
    checkpoint: str

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "dataset": self.dataset, "fold": self.fold, "split": self.split,
                "protocol": self.protocol, "data_root": self.data_root, **self.metrics.to_dict()}


def checkpoint_data(model: torch.nn.Module, checkpoint: str | Path, *, data_root: str | Path | None = None,
                    dataset: str | None = None, fold: int | None = None):
    """(format, data root, fold) a loaded checkpoint was trained on, each overridable; checked
    to exist and to use the checkpoint's AU set."""
    from .data.layout import resolve_format

    meta = model.metadata
    source = meta.source or {}
    dataset = dataset or source.get("dataset")
    fold = fold or source.get("fold")
    data_root = data_root or source.get("data_root")
    if dataset is None or fold is None:
        raise AucliError(f"{checkpoint}: the checkpoint names no dataset/fold; pass --dataset and --fold")
    if data_root is None:
        raise AucliError(f"{checkpoint}: the checkpoint names no data root; pass --data-root")
    if not Path(data_root).is_dir():
        raise AucliError(f"{data_root}: data root not found; pass --data-root")
    fmt = resolve_format(dataset, data_root)
    if get_au_set(fmt.au_set).aus != get_au_set(meta.au_set).aus:
        raise AucliError(f"{checkpoint}: checkpoint is for AU set {meta.au_set}, but {dataset} uses {fmt.au_set}")
    return fmt, data_root, int(fold)


def evaluate_checkpoint(checkpoint: str | Path, *, data_root: str | Path | None = None,
                        dataset: str | None = None, fold: int | None = None, split: str = "test",
                        protocol: str = "reference", thresholds: float | list[float] | None = None,
                        batch_size: int = 8, device: str = "cpu", workers: int = 0) -> EvalResult:
    """Evaluate a trained checkpoint on its fold; dataset, fold and data root default to the checkpoint's."""
    from .checkpoint import load_model
    from .data.layout import load_split

    if protocol not in PREDICTORS:
        raise AucliError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PREDICTORS)}")
    model = load_model(checkpoint, device)
    meta = model.metadata
    fmt, data_root, fold = checkpoint_data(model, checkpoint, data_root=data_root, dataset=dataset, fold=fold)
    data = load_split(data_root, fmt, split, fold)
    probs = predict_calibrated(model, data, protocol, batch_size=batch_size, device=device, workers=workers)
    thresholds = meta.thresholds if thresholds is None else thresholds
    metrics = decision_metrics(getattr(model, "video_head", None), data.au_set, probs, data.labels, thresholds,
                               video_groups(data))
    return EvalResult(metrics, fmt.name, int(fold), split, protocol, str(data_root), str(checkpoint))


def print_metrics(result: EvalResult) -> None:
    """The per-AU table and the means, on stdout."""
    from rich.console import Console
    from rich.table import Table

    m = result.metrics
    table = Table(title=f"{result.dataset} fold {result.fold} ({result.split}, {result.protocol} protocol, "
                        f"{m.frames} frames)")
    for column in ("AU", "F1", "accuracy", "threshold"):
        table.add_column(column, justify="left" if column == "AU" else "right")
    for au, f1, acc, thr in zip(m.aus, m.f1, m.accuracy, m.thresholds):
        table.add_row(au, f"{f1:.1f}", f"{acc:.1f}", f"{thr:.2f}")
    table.add_row("mean", f"{m.mean_f1:.1f}", f"{m.mean_accuracy:.1f}", "", style="bold")
    Console().print(table)
