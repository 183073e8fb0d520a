"""`aucli pretrain`: a backbone start learned from single frames, for `aucli train --backbone-weights`.

Why it exists: MDHR trained from a random start learns slowly where compute is
scarce (a CPU, or one small GPU). Each training step sees a few 16-frame clips,
and neighbouring frames of a clip are near copies, so a step of 32 frames holds
only a couple of independent faces. Here the backbone learns the AUs frame by
frame instead: every batch is frames drawn independently from all training
videos, at a reduced input size (the backbone is fully convolutional, so its
weights carry over to 224 px), with a linear head on the pooled final map.
`aucli train` then starts MDHR from the result and learns the temporal and
relational parts at 224 px. This is not part of the reference recipe (spec §6),
which starts from ImageNet weights; it is a way to a usable start without them.

Validation persons are held out exactly as `aucli train` holds them out (same
``--val-fraction`` and ``--seed``), so the later stage never tunes on a person
this stage trained on.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import AucliError, UsageError


@dataclass
class PretrainConfig:
    """Every option of `aucli pretrain`."""

    data_root: str
    dataset: str = "videos"
    fold: int = 1
    backbone: str = "resnet18"
    size: int = 112  # input side while pretraining; MDHR later runs at 224
    batch_size: int = 64
    epochs: int = 10
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    val_fraction: float = 0.15
    seed: int = 0
    workers: int = 1
    cpu_amp: bool = True  # bf16 autocast on the CPU
    device: str | None = None
    project: str = "runs/pretrain"
    name: str | None = None


class FrameClassifier(nn.Module):
    """The backbone and a linear AU head on its average-pooled final map (N logits per frame)."""

    def __init__(self, backbone: str, num_aus: int) -> None:
        super().__init__()
        from .model.backbone import Backbone

        self.backbone = Backbone(backbone, False, None, None)
        self.head = nn.Linear(self.backbone.token_channels, num_aus)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        final = self.backbone(images).maps[-1]  # (M, C, h, w)
        return self.head(final.float().mean((2, 3)))  # (M, N)


class TrainFrames(Dataset):
    """Items (frame, seed) -> an augmented frame at ``size`` px and its labels."""

    def __init__(self, split, size: int) -> None:
        from .data.transforms import ClipAugment

        self.split, self.size = split, size
        self.augment = ClipAugment()  # the training augmentation of `aucli train` (spec §6.3), one frame

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        from .data.clips import read_image
        from .data.transforms import to_tensor

        index, seed = item
        frame = to_tensor([read_image(self.split.image_path(index))])
        frame = self.augment(frame, self.augment.draw(torch.Generator().manual_seed(seed)))
        frame = TF.resize(frame, [self.size, self.size], antialias=True)[0]
        return frame, torch.from_numpy(self.split.labels[index])


def epoch_items(frames: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    """Every training frame once, in an order and with augmentation seeds fixed by (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(frames, generator=gen).tolist()
    seeds = torch.randint(0, 2**31 - 1, (frames,), generator=gen).tolist()
    return list(zip(order, seeds))


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-AU weighted binary cross-entropy over known labels (0/1); others are masked."""
    known = ((labels == 0) | (labels == 1)).float()
    loss = F.binary_cross_entropy_with_logits(logits.float(), (labels == 1).float(), reduction="none")
    return (weights * loss * known).sum() / known.sum().clamp(min=1)


@torch.no_grad()
def predict_frames(model: FrameClassifier, split, size: int, device, amp_dtype, batch: int = 64) -> np.ndarray:
    """Probabilities (F, N) for every frame: the whole aligned face resized to ``size`` (no crop)."""
    from .data.clips import read_image
    from .data.transforms import normalize, to_tensor

    model.eval()
    out = []
    for start in range(0, len(split), batch):
        images = to_tensor([read_image(split.image_path(i)) for i in range(start, min(start + batch, len(split)))])
        x = normalize(TF.resize(images, [size, size], antialias=True).float().div_(255))
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(torch.sigmoid(model(x)).float().cpu())
    model.train()
    return torch.cat(out).numpy()


def pretrain(cfg: PretrainConfig, *, resume: str | Path | None = None, stop_after: int | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Pretrain a backbone on single frames; writes backbone.pt (best validation epoch) in the run folder.

    ``resume`` continues from a run's last.pt (its stored options win), to the same result as
    an uninterrupted run on the same machine and thread count. ``stop_after`` ends after that
    many epochs as if killed (for testing resume).
    """
    from .checkpoint import load_tensors
    from .data.layout import load_split
    from .evaluate import au_metrics, tune_thresholds
    from .train import TrainDisplay, hold_out_subjects, new_run_dir

    state = None
    if resume is not None:
        try:
            state = load_tensors(resume)
            cfg = PretrainConfig(**state["config"])
        except Exception:
            raise AucliError(f"{resume}: not the last.pt of an aucli pretrain run") from None
    if cfg.size < 32:
        raise UsageError(f"--size {cfg.size}: too small for a ResNet (at least 32)")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_dtype = torch.bfloat16 if (device.type == "cuda" or cfg.cpu_amp) else None

    split = load_split(cfg.data_root, cfg.dataset, "train", cfg.fold)
    val_subjects = hold_out_subjects(split.subjects, cfg.val_fraction, cfg.seed)
    val_split = split.subset(val_subjects)
    train_split = split.subset([s for s in split.subjects if s not in val_subjects])
    au_set = train_split.au_set
    weights = torch.tensor(train_split.loss_weights(), dtype=torch.float32, device=device)
    dataset = TrainFrames(train_split, cfg.size)
    steps_per_epoch = math.ceil(len(dataset) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch

    torch.manual_seed(cfg.seed)
    model = FrameClassifier(cfg.backbone, au_set.num_aus).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, best = 0, {"mean_f1": -1.0, "epoch": 0}
    if state is not None:
        run_dir = Path(resume).parent
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"], state["best"]
        torch.set_num_threads(state["threads"])
    else:
        run_dir = new_run_dir(cfg.project, cfg.name or f"{cfg.backbone}_{cfg.size}px")
        (run_dir / "config.json").write_text(json.dumps(
            {**asdict(cfg), "val_subjects": val_subjects, "threads": torch.get_num_threads()}, indent=2) + "\n")

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1))) / 2

    display = TrainDisplay(cfg.epochs, steps_per_epoch, enabled=not quiet)
    for epoch in range(start_epoch, cfg.epochs):
        items = epoch_items(len(dataset), cfg.seed, epoch)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=items, num_workers=cfg.workers)
        display.start_epoch(epoch)
        t0, total, frames = time.time(), 0.0, 0
        for step, (images, labels) in enumerate(loader):
            lr = lr_at(epoch * steps_per_epoch + step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(images)
            loss = masked_bce(logits, labels.to(device), weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()  # one read of the loss per step
            total += value
            frames += len(images)
            display.step(step + 1, value, lr, frames)
        probs = predict_frames(model, val_split, cfg.size, device, amp_dtype)
        # Thresholds tuned on the validation persons themselves: a progress signal, not a test figure.
        metrics = au_metrics(au_set, probs, val_split.labels, tune_thresholds(probs, val_split.labels)).to_dict()
        done = epoch + 1
        seconds = time.time() - t0
        record = {"epoch": done, "loss": total / steps_per_epoch, "lr": lr, "seconds": round(seconds, 1),
                  "frames_per_s": round(frames / max(seconds, 1e-9), 1), "val": metrics}
        if metrics["mean_f1"] > best["mean_f1"]:
            best = {"mean_f1": metrics["mean_f1"], "epoch": done}
            torch.save({"model": model.backbone.model.state_dict(), "source": {
                "kind": "aucli pretrain", "epoch": done, "size": cfg.size, "val_mean_f1": metrics["mean_f1"]}},
                run_dir / "backbone.pt")
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        tmp = run_dir / "last.pt.tmp"
        torch.save({"config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": done, "best": best, "threads": torch.get_num_threads()}, tmp)
        tmp.replace(run_dir / "last.pt")
        if not quiet:
            display.console.print(
                f"epoch {done}/{cfg.epochs}  loss {record['loss']:.4f}  lr {lr:.2e}  {record['frames_per_s']:.1f} "
                f"frames/s  {record['seconds']:.0f} s  val F1 {metrics['mean_f1']:.1f} (thresholds tuned on val)",
                highlight=False, soft_wrap=True)
        if stop_after is not None and done - start_epoch >= stop_after and done < cfg.epochs:
            display.close()
            return {"run_dir": str(run_dir), "stopped_at": done, "best": best}
    display.close()
    result = {"run_dir": str(run_dir), "backbone": str(run_dir / "backbone.pt"), "best": best}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
