"""The training loop (spec §5, §6): one function, the steps in the order they happen.

Single process::

    aucli train --dataset bp4d --fold 1 --data-root /data/BP4D

Data parallel on one or more machines (gloo on CPU, NCCL on CUDA)::

    torchrun --nproc_per_node 4 -m aucli train --dataset bp4d --fold 1 --data-root /data/BP4D
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .errors import AucliError, Interrupted, UsageError


@dataclass
class TrainConfig:
    """Every training option; the defaults are the reference recipe (spec §6.1)."""

    dataset: str = "bp4d"
    fold: int = 1
    data_root: str | None = None  # synthetic: defaults to a cache folder
    backbone: str = "resnet50"
    pretrained: bool = False
    backbone_weights: str | None = None
    init_checkpoint: str | None = None  # fine-tuning: start MDHR from this aucli checkpoint
    drop_path_rate: float | None = None
    feature_dim: int = 512
    k: int = 5
    clip_length: int = 16
    batch_size: int = 8
    epochs: int = 200
    clips_per_video: int = 1  # the reference draws one window per video per epoch (spec §7.3)
    lr: float = 1e-4
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: int = 0
    lambda_sub: float = 0.01
    resize: int = 256  # crop offsets are drawn from 0..resize-224
    flip: bool = True
    color_jitter: float = 0.4  # brightness/contrast/saturation factors in [1-j, 1+j]
    val_interval: int = 25
    select_on_test: bool = False  # the reference protocol: pick the best epoch on the test fold
    val_fraction: float = 0.15  # share of training subjects held out for model selection
    tune_thresholds: bool = False
    seed: int = 0
    workers: int = 4
    eval_batch_size: int = 8
    device: str | None = None
    amp: bool = True  # bf16 autocast where the GPU supports it
    cpu_amp: bool = False  # bf16 autocast on the CPU too (fast where it has AVX512-BF16 or AMX)
    project: str = "runs/train"
    name: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        cfg.betas = tuple(cfg.betas)
        return cfg


# ----- loss (spec §5) ---------------------------------------------------------------------------


def au_loss(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted asymmetric loss: probs, labels (M, N); labels other than 0/1 are masked (spec §5.1)."""
    known = ((labels == 0) | (labels == 1)).float()
    y = (labels == 1).float()
    p = probs.float()
    positive = y * torch.log(p.clamp(min=1e-8))
    # The negative term is weighted by the prediction itself, without gradient (reference code).
    negative = p.detach() * (1 - y) * torch.log((1 - p).clamp(min=1e-8))
    return -(weights * (positive + negative) * known).sum() / known.sum().clamp(min=1)


def region_loss(aux: dict[str, torch.Tensor], sub_labels: torch.Tensor) -> torch.Tensor:
    """Mean over branches of the cross-entropy on regional combination classes (spec §5.2); -1 ignored."""
    losses = []
    for b, logits in enumerate(aux.values()):
        target = sub_labels[:, b]
        valid = (target >= 0).sum().clamp(min=1)
        losses.append(F.cross_entropy(logits.float(), target, ignore_index=-1, reduction="sum") / valid)
    return torch.stack(losses).mean()


def lr_at(it: int, iters_per_epoch: int, cfg: TrainConfig) -> float:
    """Per-iteration linear warm-up then cosine decay to 0 (spec §6.1)."""
    warm = cfg.warmup_epochs * iters_per_epoch
    if it < warm:
        return cfg.lr * it / warm
    return cfg.lr * (1 + math.cos(math.pi * (it - warm) / (cfg.epochs * iters_per_epoch - warm))) / 2


# ----- helpers the loop calls ------------------------------------------------------------------


def new_run_dir(project: str | Path, name: str) -> Path:
    """runs/train/<name>, then <name>-2, <name>-3, ...: never reuses a folder."""
    project = Path(project)
    project.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100_000):
        path = project / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AucliError(f"{project}: no free run name for {name!r}")


def hold_out_subjects(subjects: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded choice of training subjects kept aside for model selection."""
    count = max(1, round(fraction * len(subjects)))
    if count >= len(subjects):
        raise UsageError(f"cannot hold out {count} of {len(subjects)} training subjects; lower --val-fraction")
    order = torch.randperm(len(subjects), generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(subjects[i] for i in order[:count])


def rng_state() -> dict[str, Any]:
    """Random state as plain values and tensors, loadable with weights_only=True."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def resolve_data_root(cfg: TrainConfig, is_main: bool) -> str:
    if cfg.dataset != "synthetic":
        if not cfg.data_root:
            raise UsageError(f"--data-root is required for {cfg.dataset} (the image root with the fold lists)")
        return cfg.data_root
    from .data.synthetic import ensure_synthetic

    if is_main:  # one process generates, the others wait for it
        root = ensure_synthetic(cfg.data_root)
    if dist.is_initialized():
        dist.barrier()
    return str(ensure_synthetic(cfg.data_root) if not is_main else root)


def _logged_epoch(line: str) -> float:
    """The epoch of a metrics.jsonl line; a line cut short by a kill counts as after every epoch."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def run_name(cfg: TrainConfig) -> str:
    return cfg.name or f"{cfg.dataset}_fold{cfg.fold}_{cfg.backbone}"


# ----- the loop ----------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, resume: str | Path | None = None, stop_after: int | None = None,
          quiet: bool = False) -> dict[str, Any]:
    """Train MDHR on one fold; returns the run folder, the best epoch and its metrics.

    ``stop_after`` ends the process after that many epochs, as if it were killed (for
    testing resume); ``resume`` continues a run from its ``last.pt``. Ctrl-C raises
    ``Interrupted``, saying which epoch was running and what ``last.pt`` holds.
    """
    where: dict[str, Any] = {}  # how far the run got, for that message
    try:
        return _train(cfg, where, resume=resume, stop_after=stop_after, quiet=quiet)
    except KeyboardInterrupt:
        if "display" in where:
            where["display"].close()
        raise Interrupted(interrupted_line(where)) from None


def interrupted_line(where: dict[str, Any]) -> str:
    """One line: what Ctrl-C stopped, and whether and how the run can continue."""
    run_dir = where.get("run_dir")
    if run_dir is None:
        return "training stopped before its run folder was made; nothing was written"
    doing, saved = where.get("doing", "before the first epoch"), where.get("saved", 0)
    if saved:
        last = Path(run_dir) / "last.pt"
        return f"training stopped {doing}; {last} holds epoch {saved}; continue with: aucli train --resume {last}"
    return f"training stopped {doing}; no epoch finished, so {run_dir} holds nothing to resume"


#: Parts of MDHR that do not depend on the AU set: a checkpoint of another AU set can start them.
AU_SET_FREE = ("backbone.", "static_proj.", "mfd.")


def check_init_fits(theirs: dict[str, Any], mine: dict[str, Any], path: str | Path) -> None:
    """--init-checkpoint: its backbone, feature width and k (``model_config``) must be this run's."""
    for key, option in (("backbone", "--backbone"), ("feature_dim", "--feature-dim"), ("k", "--k")):
        if theirs[key] != mine[key]:
            raise UsageError(f"--init-checkpoint {path}: it has {key} {theirs[key]}, this run {mine[key]}; "
                             f"set {option} {theirs[key]}")


def init_from_checkpoint(model: torch.nn.Module, ckpt, path: str | Path) -> str:
    """Fill a new MDHR from a loaded aucli checkpoint (fine-tuning); a one-line summary.

    The backbone, feature width and k must match. With the same AU set every tensor is taken;
    with another, those of the backbone, static projection and MFD (the AU-specific HSR,
    temporal convolutions and classifier keep their random start). A calibration head in the
    checkpoint is not carried over: it belongs to the checkpoint's own MDHR.
    """
    theirs, mine = ckpt.metadata.model_config, model.config
    check_init_fits(theirs, mine, path)
    same_aus = theirs["au_set"] == mine["au_set"]
    own = model.state_dict()
    wanted = [k for k in own if same_aus or k.startswith(AU_SET_FREE)]
    absent = [k for k in wanted if k not in ckpt.state_dict]
    misfit = [k for k in wanted if k in ckpt.state_dict and ckpt.state_dict[k].shape != own[k].shape]
    if absent or misfit:
        k = (absent or misfit)[0]
        raise AucliError(f"--init-checkpoint {path}: its tensors do not fit this model "
                         f"({len(absent)} absent, {len(misfit)} of another shape, e.g. {k})")
    model.load_state_dict({k: ckpt.state_dict[k].to(own[k].dtype) for k in wanted}, strict=False)
    if same_aus:
        return f"started from {path}: all of MDHR ({len(wanted)} tensors)"
    return (f"started from {path}: backbone, static projection and MFD ({len(wanted)} tensors); its AU set "
            f"{theirs['au_set']} is not this run's {mine['au_set']}, so the AU-specific parts start at random")


def _train(cfg: TrainConfig, where: dict[str, Any], *, resume: str | Path | None, stop_after: int | None,
           quiet: bool) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from .checkpoint import load_checkpoint, save_checkpoint
    from .data.clips import TrainClips, VideoClipSampler
    from .data.layout import load_split
    from .data.transforms import ClipAugment
    from .evaluate import au_metrics, predict_reference, tune_thresholds
    from .model import MDHR

    # 1. Resume: the stored configuration wins; the run continues in its own folder.
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        if "config" not in ckpt.extra or "optimizer" not in ckpt.extra:
            raise AucliError(f"{resume}: not a training checkpoint (no optimiser state); use last.pt of a run")
        cfg = TrainConfig.from_dict(ckpt.extra["config"])
    if cfg.select_on_test and cfg.tune_thresholds:
        raise UsageError("--tune-thresholds with --select-on-test would tune on the test fold; use one")
    init = None
    if ckpt is None and cfg.init_checkpoint:  # read and checked before any data or process work
        if cfg.pretrained or cfg.backbone_weights:
            raise UsageError("--init-checkpoint already gives the backbone its weights; "
                             "leave out --pretrained and --backbone-weights")
        init = load_checkpoint(cfg.init_checkpoint)
        check_init_fits(init.metadata.model_config, {"backbone": cfg.backbone, "feature_dim": cfg.feature_dim,
                                                     "k": cfg.k}, cfg.init_checkpoint)

    # 2. Processes and device. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        device = torch.device(f"cuda:{local_rank}" if world_size > 1 else (cfg.device or "cuda"))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    is_main = rank == 0
    if use_cuda:
        amp_dtype = torch.bfloat16 if cfg.amp and torch.cuda.is_bf16_supported() else None
    else:
        amp_dtype = torch.bfloat16 if cfg.cpu_amp else None
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # as the reference

    # 3. Data: training subjects minus a held-out validation set, unless selecting on test (spec §6.5).
    data_root = resolve_data_root(cfg, is_main)
    train_split = load_split(data_root, cfg.dataset, "train", cfg.fold)
    test_split = load_split(data_root, cfg.dataset, "test", cfg.fold)
    if cfg.select_on_test:
        val_split, val_subjects = test_split, []
    else:
        val_subjects = hold_out_subjects(train_split.subjects, cfg.val_fraction, cfg.seed)
        val_split = train_split.subset(val_subjects)
        train_split = train_split.subset([s for s in train_split.subjects if s not in val_subjects])
    au_set = train_split.au_set
    weights = torch.tensor(train_split.loss_weights(), dtype=torch.float32, device=device)
    augment = ClipAugment(resize=cfg.resize, flip=cfg.flip, jitter=(1 - cfg.color_jitter, 1 + cfg.color_jitter))
    dataset = TrainClips(train_split, cfg.clip_length, augment)
    sampler = VideoClipSampler([len(v) for v in dataset.videos], cfg.clip_length, cfg.seed, rank, world_size,
                               clips_per_video=cfg.clips_per_video)
    # Its own generator keeps worker seeding off the global RNG, which then only the model uses.
    # More loader processes than cores only thrashes; clips do not depend on the count (data/clips.py).
    workers = min(cfg.workers, os.cpu_count() or 1)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=use_cuda, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    iters_per_epoch = len(loader)

    # 4. Model and optimiser: AdamW over all parameters in one group (spec §6.1).
    # Seeded here, just before the model draws its initial weights, and not at the start: preparing
    # the data may draw from the global generators too (generating the synthetic set builds MTCNN,
    # whose layers initialise randomly before loading their weights), and whether it does depends
    # on what is already cached, so a run that generated the data would start from other weights.
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    raw_model = MDHR(au_set, backbone=cfg.backbone, k=cfg.k, feature_dim=cfg.feature_dim,
                     pretrained=cfg.pretrained and ckpt is None, backbone_weights=None if ckpt else cfg.backbone_weights,
                     drop_path_rate=cfg.drop_path_rate).to(device)
    if init is not None:
        note = init_from_checkpoint(raw_model, init, cfg.init_checkpoint)
        del init  # its tensors are in the model now
        if is_main and not quiet:
            print(note, file=sys.stderr)
    # Channels-last convolutions are faster on GPUs and on CPUs alike (an MDHR-ResNet-18 bf16 step
    # of 2 x 16 frames: 26.9 -> 31.6 frames/s on a 2-core Intel Xeon with AMX-BF16).
    raw_model = raw_model.to(memory_format=torch.channels_last)
    if cfg.clip_length < raw_model.clip_min:
        raise UsageError(f"--clip-length {cfg.clip_length} is too short for k={cfg.k}; need {raw_model.clip_min}")
    model = DistributedDataParallel(raw_model, device_ids=[device] if use_cuda else None) if world_size > 1 else raw_model
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    # 5. Run folder (main process picks it, everyone learns it) and restored state.
    start_epoch, best = 0, {"mean_f1": -1.0, "epoch": 0, "thresholds": [0.5] * au_set.num_aus}
    best_state = None
    if ckpt is not None:
        run_dir = Path(resume).parent
        raw_model.load_state_dict(ckpt.state_dict)
        optimizer.load_state_dict(ckpt.extra["optimizer"])
        start_epoch, best = ckpt.extra["epoch"], ckpt.extra["best"]
        set_rng_state(ckpt.extra["rng"][rank] if rank < len(ckpt.extra["rng"]) else ckpt.extra["rng"][0])
        if not use_cuda and ckpt.extra.get("threads"):
            # CPU kernels split their sums by thread, so the count changes the last bits of every
            # step: continue with the count the run was started with, to end where it would have.
            torch.set_num_threads(ckpt.extra["threads"])
        if (run_dir / "best.pt").is_file():
            best_state = load_checkpoint(run_dir / "best.pt").state_dict
        log = run_dir / "metrics.jsonl"
        if is_main and log.is_file():  # drop epochs logged after the checkpoint we resume from
            kept = [line for line in log.read_text().splitlines() if _logged_epoch(line) <= start_epoch]
            log.write_text("".join(line + "\n" for line in kept))
    else:
        holder = [str(new_run_dir(cfg.project, run_name(cfg))) if is_main else None]
        if world_size > 1:
            dist.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
        if is_main:
            (run_dir / "config.json").write_text(json.dumps(
                {**asdict(cfg), "data_root": data_root, "world_size": world_size,
                 "val_subjects": val_subjects, "iters_per_epoch": iters_per_epoch,
                 "threads": torch.get_num_threads()}, indent=2) + "\n")
    source = {"kind": "trained", "dataset": cfg.dataset, "fold": cfg.fold, "data_root": str(Path(data_root).resolve()),
              "selection": "test fold" if cfg.select_on_test else "held-out training subjects",
              "val_subjects": val_subjects}
    if cfg.init_checkpoint:
        source["init_checkpoint"] = str(cfg.init_checkpoint)
    display = TrainDisplay(cfg.epochs, iters_per_epoch, enabled=is_main and not quiet)
    where.update(run_dir=run_dir, saved=start_epoch, display=display)

    def evaluate(split, thresholds) -> tuple[dict, list[float]]:
        if world_size > 1:  # BN running statistics drift apart per process; evaluate rank 0's, as saved
            for buffer in raw_model.buffers():
                dist.broadcast(buffer, src=0)
        probs = predict_reference(raw_model, split, cfg.clip_length, batch_size=cfg.eval_batch_size, device=device,
                                  rank=rank, world_size=world_size, autocast_dtype=amp_dtype)
        if thresholds is None:
            thresholds = tune_thresholds(probs, split.labels) if cfg.tune_thresholds else [0.5] * au_set.num_aus
        return au_metrics(au_set, probs, split.labels, thresholds).to_dict(), thresholds

    def save(path: Path, epoch: int, metrics: dict, thresholds: list[float], resumable: bool) -> None:
        extra: dict[str, Any] = {"config": {**asdict(cfg), "data_root": data_root}, "epoch": epoch}
        if resumable:
            states = [rng_state()] if world_size == 1 else [None] * world_size
            if world_size > 1:
                dist.all_gather_object(states, rng_state())
            extra.update(optimizer=optimizer.state_dict(), best=best, rng=states, threads=torch.get_num_threads())
        if is_main:
            save_checkpoint(path, raw_model, clip_length=cfg.clip_length, thresholds=thresholds,
                            source={**source, "epoch": epoch, "metrics": metrics}, extra=extra)

    # 6. The loop.
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0, totals, frames = time.time(), torch.zeros(3, dtype=torch.float64), 0
        display.start_epoch(epoch)
        where["doing"] = f"in epoch {epoch + 1} of {cfg.epochs}"
        for step, batch in enumerate(loader):
            lr = lr_at(epoch * iters_per_epoch + step, iters_per_epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            clips = batch["clips"].to(device, non_blocking=True)  # (B, T, 3, 224, 224)
            labels = batch["labels"].to(device).flatten(0, 1)  # (B*T, N), clip-major rows (spec §0)
            sub_labels = batch["sub_labels"].to(device).flatten(0, 1)  # (B*T, branches)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                probs, aux = model(clips, return_aux=True)
            loss_au = au_loss(probs.flatten(0, 1), labels, weights)
            loss_sub = region_loss({k: v.flatten(0, 1) for k, v in aux.items()}, sub_labels)
            loss = loss_au + cfg.lambda_sub * loss_sub
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses = torch.stack([loss, loss_au, loss_sub]).detach().double().cpu()  # one device sync per step
            totals += losses
            frames += clips.shape[0] * clips.shape[1] * world_size
            display.step(step + 1, losses[0].item(), lr, frames)
        if world_size > 1:
            dist.all_reduce(totals)
        totals /= max(iters_per_epoch * world_size, 1)
        done = epoch + 1
        record = {"epoch": done, "iterations": done * iters_per_epoch, "lr": lr, "loss": totals[0].item(),
                  "loss_au": totals[1].item(), "loss_sub": totals[2].item(), "seconds": round(time.time() - t0, 2),
                  "frames_per_s": round(frames / max(time.time() - t0, 1e-9), 2)}

        # Validate every val_interval epochs and at the end; keep the best mean F1 (strictly better).
        if done % cfg.val_interval == 0 or done == cfg.epochs:
            metrics, thresholds = evaluate(val_split, None)
            record["val"] = metrics
            if metrics["mean_f1"] > best["mean_f1"]:
                best = {"mean_f1": metrics["mean_f1"], "epoch": done, "thresholds": thresholds, "val": metrics}
                best_state = {k: v.detach().cpu().clone() for k, v in raw_model.state_dict().items()}
                save(run_dir / "best.pt", done, {"val": metrics}, thresholds, resumable=False)
        if is_main:
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
        save(run_dir / "last.pt", done, {"val": record.get("val"), "loss": record["loss"]}, best["thresholds"],
             resumable=True)
        where["saved"] = done
        display.end_epoch(record)
        if stop_after is not None and done - start_epoch >= stop_after and done < cfg.epochs:
            display.close()
            if world_size > 1:
                dist.destroy_process_group()
            return {"run_dir": str(run_dir), "stopped_at": done, "best": best}

    # 7. Test the selected epoch on the test fold (with --select-on-test, that is what selected it).
    where["doing"] = "while testing the selected epoch"
    display.close()
    raw_model.load_state_dict(best_state)
    if cfg.select_on_test:
        test_metrics = best["val"]
    else:
        test_metrics, _ = evaluate(test_split, best["thresholds"])
    save(run_dir / "best.pt", best["epoch"], {"val": best["val"], "test": test_metrics}, best["thresholds"],
         resumable=False)
    result = {"run_dir": str(run_dir), "best_epoch": best["epoch"], "val": best["val"], "test": test_metrics}
    if is_main:
        (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        display.summary(result)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


class TrainDisplay:
    """A rich progress bar (epoch, step, loss, lr, throughput) and one summary line per epoch."""

    def __init__(self, epochs: int, iters_per_epoch: int, enabled: bool = True) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.enabled, self.epochs, self.iters = enabled, epochs, iters_per_epoch
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn(f"epoch {{task.fields[epoch]}}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[fps]:.1f} frames/s"),
            TimeElapsedColumn(), console=self.console, transient=True,
            disable=not (enabled and self.console.is_terminal))
        self.task = None
        self.t0 = time.time()

    def start_epoch(self, epoch: int) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.iters, epoch=epoch + 1, loss=0.0, lr=0.0, fps=0.0)
        # reset() replaces every field it is given fields for, so give it all of them.
        self.progress.reset(self.task, total=self.iters, epoch=epoch + 1, loss=0.0, lr=0.0, fps=0.0)
        self.t0 = time.time()

    def step(self, step: int, loss: float, lr: float, frames: int) -> None:
        fps = frames / max(time.time() - self.t0, 1e-9)
        self.progress.update(self.task, completed=step, loss=loss, lr=lr, fps=fps)

    def end_epoch(self, r: dict[str, Any]) -> None:
        if not self.enabled:
            return
        val = f"  val F1 {r['val']['mean_f1']:.1f} acc {r['val']['mean_accuracy']:.1f}" if "val" in r else ""
        self.console.print(f"epoch {r['epoch']}/{self.epochs}  loss {r['loss']:.4f} (AU {r['loss_au']:.4f}, "
                           f"regions {r['loss_sub']:.3f})  lr {r['lr']:.2e}  {r['frames_per_s']:.1f} frames/s  "
                           f"{r['seconds']:.0f} s{val}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        self.progress.stop()

    def summary(self, result: dict[str, Any]) -> None:
        if self.enabled:
            self.console.print(f"best epoch {result['best_epoch']}: val F1 {result['val']['mean_f1']:.1f}, "
                               f"test F1 {result['test']['mean_f1']:.1f} acc {result['test']['mean_accuracy']:.1f}; "
                               f"run in {result['run_dir']}", highlight=False, soft_wrap=True)
