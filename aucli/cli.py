"""The command line: parse options, then call one library function per command.

Heavy libraries (torch, timm, PyAV, MTCNN) are imported inside the commands so
that ``aucli --help`` answers at once.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from . import __version__
from .errors import AucliError

app = typer.Typer(
    name="aucli",
    help="Find facial Action Units (FACS) in video with MDHR (Wang et al., CVPR 2024).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aucli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Find facial Action Units (FACS) in video with MDHR (Wang et al., CVPR 2024)."""


class DatasetName(str, Enum):
    bp4d = "bp4d"
    disfa = "disfa"


class ReferenceBackbone(str, Enum):
    resnet50 = "resnet50"
    swin_base = "swin_base"


@app.command("convert-official")
def convert_official(
    source: Path = typer.Argument(
        ..., help="Checkpoint written by the reference implementation (CVI-SZU/MDHR), e.g. best_model.pth."
    ),
    dataset: DatasetName = typer.Option(..., "--dataset", "-d", help="AU set the checkpoint was trained on."),
    backbone: ReferenceBackbone = typer.Option(
        ReferenceBackbone.resnet50, "--backbone", "-b", help="Backbone of the reference model."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the aucli checkpoint (.pt)."),
    clip_length: int = typer.Option(16, "--clip-length", "-T", help="Clip length T the model was trained with."),
    k: int = typer.Option(5, "--k", help="Temporal pooling half-window k the model was trained with."),
    threshold: float = typer.Option(0.5, "--threshold", help="Decision threshold stored for every AU."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Turn a reference MDHR checkpoint (.pth) into a self-describing aucli checkpoint.

    Accepts a bare state dict or one wrapped in {"state_dict": ...}, with or without
    DataParallel "module." prefixes. Every source key must be used and every model
    tensor filled, or nothing is written and the offending keys are named.
    """
    from .convert import convert_official_checkpoint

    meta = convert_official_checkpoint(
        source, output, dataset.value, backbone.value, clip_length=clip_length, k=k,
        threshold=threshold, overwrite=force,
    )
    typer.echo(
        f"wrote {output}: {meta.au_set} ({len(meta.aus)} AUs), {meta.backbone}, T={meta.clip_length}, k={meta.k}",
        err=True,
    )


@app.command("export")
def export_command(
    source: Path = typer.Argument(..., help="An aucli checkpoint, e.g. runs/train/NAME/best.pt "
                                  "('starter': the shipped one)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the slim checkpoint (.pt)."),
    half: bool = typer.Option(True, "--fp16/--fp32", help="Store floating tensors as fp16 (upcast on load)."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Provenance kind to record, e.g. distilled."),
    description: Optional[str] = typer.Option(None, "--description", help="One line on what the model is; "
                                              "`aucli detect` prints it."),
    keep_data_root: bool = typer.Option(False, "--keep-data-root", help="Keep the local data root in the metadata."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Write a checkpoint for sharing: no optimiser or training state, fp16 tensors by default."""
    from .checkpoint import export_checkpoint, named_checkpoint
    from .errors import UsageError

    if output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")
    update = {k: v for k, v in (("kind", kind), ("description", description)) if v is not None}
    if not keep_data_root:
        update["data_root"] = None
    meta = export_checkpoint(named_checkpoint(source), output, half=half, source_update=update)
    typer.echo(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): MDHR-{meta.backbone}, {meta.au_set}",
               err=True)


def main() -> None:
    """Entry point: run the app, turning aucli errors into one line and an exit status."""
    try:
        # Without standalone mode click returns (rather than raises) a command's exit code.
        status = app(standalone_mode=False)
        if status == 130:  # typer turns a Ctrl-C the command did not handle into a silent 130
            typer.echo("aucli: interrupted", err=True)
        sys.exit(status if isinstance(status, int) else 0)
    except AucliError as exc:
        typer.echo(f"aucli: {exc.label}: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("aucli: interrupted", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aucli: aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        # Recognised by shape: typer may bring its own copy of click, whose classes differ.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise


# Set by a command whose work is complete and whose files are all closed: the process may
# then end without Python's shutdown, which frees torch's modules one by one.
_finished = False


def entry() -> None:
    """The ``aucli`` program (console script and ``python -m aucli``): ``main``, and after a
    finished ``detect`` an immediate exit. Tearing down the interpreter once torch is imported
    took 0.46 s of every run on the 2-core development machine; output is flushed first.
    """
    try:
        main()
    except SystemExit as done:
        if not _finished:
            raise
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# Commands added by other modules of the CLI go below this line.


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class OutputFormat(str, Enum):
    csv = "csv"
    json = "json"


class FaceMode(str, Enum):
    largest = "largest"
    all = "all"


@app.command("detect")
def detect(
    inputs: list[str] = typer.Argument(
        ..., metavar="INPUT...", help="Video files, folders (searched recursively) or globs; "
        "a folder of numbered images is one image sequence."
    ),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o",
        help="Output file for one input (.csv or .json picks the format), else a folder. "
        "Default: <stem>.csv in the current folder.",
    ),
    format: Optional[OutputFormat] = typer.Option(None, "--format", help="Output format: csv (the default) or json."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="aucli checkpoint ('starter': the shipped one); else $AUCLI_CHECKPOINT, "
        "else the one .pt in ./weights/, else the shipped starter."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    face_device: Optional[str] = typer.Option(
        None, "--face-device", help="Device of the face detector (auto, cpu, cuda or cuda:N). Default: --device's.",
    ),
    overlap: Optional[bool] = typer.Option(
        None, "--overlap/--no-overlap", help="Decode and find faces on a thread of their own beside the model. "
        "Default: on a CPU with more than one torch thread. The results do not change.",
        show_default=False,
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Frames per batch (results do not depend on it)."),
    faces: FaceMode = typer.Option(
        FaceMode.largest, "--faces",
        help="Follow the main face (face_id 0), or track every face (an id per face; -1 on frames without one).",
    ),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", min=0.0, max=1.0, help="Decision threshold for every AU, instead of the checkpoint's."
    ),
    fps: float = typer.Option(30.0, "--fps", min=0.001, help="Frame rate of image sequences."),
    overlay: Optional[Path] = typer.Option(
        None, "--overlay", help="Also write the video with each face's box, landmarks, id and AU bars "
        "(.mp4, .mov or .mkv; a folder with several inputs). The AU results do not change.",
    ),
    precision: Precision = typer.Option(
        Precision.auto, "--precision",
        help="Model arithmetic: fp32, bf16, or auto (bf16 where the CPU or GPU has native bf16, else fp32).",
    ),
    redetect: int = typer.Option(
        16, "--redetect", min=1,  # pipeline.REDETECT (not imported here: it would import torch)
        help="Full face detection every N frames; in between, faces are followed from their landmarks "
        "(1: full detection on every frame).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no summary."),
) -> None:
    """Find Action Units in videos: one row per frame (per face with --faces all)."""
    _before_torch_loads()
    from .detect_cli import run_detect

    status = run_detect(
        inputs, output, format.value if format else None, quiet, overlay,
        checkpoint=checkpoint, device=device, batch_size=batch_size, faces=faces.value,
        threshold=threshold, fps=fps, precision=precision.value, redetect=redetect,
        face_device=face_device, overlap=overlap,
    )
    global _finished
    _finished = True  # every table and overlay is written and closed (detect_cli.run_detect)
    # SystemExit, not typer.Exit: in non-standalone mode click returns Exit's code instead of exiting.
    raise SystemExit(status)


def _before_torch_loads() -> None:
    """Process settings of `aucli detect` that torch reads as it loads, each unless the
    environment sets it (nothing once torch is loaded):

    * ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP threads sleep rather than spin, so that the
      face stage can run on a thread of its own beside the model (pipeline.overlap_default).
    * ``THP_MEM_ALLOC_ENABLE=1``: torch's CPU allocator asks the kernel for transparent huge
      pages (2 MiB) for tensors of 2 MiB and more; fewer page faults and TLB misses on the
      model's large activations (docs/speed.md). The results do not change.
    * glibc's malloc keeps freed memory for reuse (``_keep_freed_memory``), unless the
      environment tunes malloc itself.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
        _keep_freed_memory()


MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")


def _keep_freed_memory() -> None:
    """glibc's malloc: blocks under 32 MiB from the heap, and the heap's free top kept up to
    1 GiB instead of being handed back to the kernel (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD).

    By default glibc raises its mmap threshold as large blocks are freed (to 32 MiB at most),
    but also trims the heap whenever its free top exceeds twice that: the model's activations,
    freed and allocated again for every batch, then cost fresh page faults each time. With
    both thresholds fixed, that memory is reused instead (docs/speed.md: about a third fewer
    minor page faults and half the system time for a ResNet-50 model on the 472-frame sample;
    its peak memory rose by about 5 %, as the heap keeps what it freed). Nothing changes where
    the environment tunes malloc (one of glibc's MALLOC_* variables, or malloc tunables in
    GLIBC_TUNABLES), or where the C library has no ``mallopt``."""
    tuned = any(name in os.environ for name in MALLOC_VARIABLES)
    if not sys.platform.startswith("linux") or tuned or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)


@app.command("plot")
def plot_command(
    table: Path = typer.Argument(..., help="A table written by aucli detect (.csv or .json)."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Image file; .png, .svg or .pdf picks the format. Default: TABLE with .png."),
    face_id: Optional[int] = typer.Option(
        None, "--face-id", help="Draw only this face of a --faces all table (default: one figure per face)."),
) -> None:
    """Draw each AU's probability over time, its active spans and the gaps without a face."""
    from .plot import plot_table

    for path in plot_table(table, output, face_id):
        typer.echo(f"wrote {path}", err=True)


# ----- training, evaluation and dataset preparation (aucli.train, aucli.evaluate, aucli.data) -----


class DatasetLayout(str, Enum):
    bp4d = "bp4d"
    disfa = "disfa"
    videos = "videos"
    synthetic = "synthetic"


class Protocol(str, Enum):
    reference = "reference"
    detect = "detect"


def _device_option(device: str) -> Optional[str]:
    return None if device == "auto" else device


def _init_checkpoint(value: Optional[str]) -> Optional[str]:
    """--init-checkpoint: a path, or 'starter' for the checkpoint shipped in the package."""
    from .checkpoint import named_checkpoint

    return None if value is None else str(named_checkpoint(value))


@app.command("train")
def train_command(
    dataset: DatasetLayout = typer.Option(DatasetLayout.bp4d, "--dataset", "-d", help="Dataset (AU set and list layout)."),
    fold: int = typer.Option(1, "--fold", "-f", min=1, max=3, help="Test fold 1-3 (spec §7.5)."),
    data_root: Optional[Path] = typer.Option(
        None, "--data-root", help="Image root with the fold lists (required for bp4d/disfa; "
        "synthetic: where to generate, default a cache folder)."),
    backbone: str = typer.Option("resnet50", "--backbone", "-b",
                                 help="resnet50, swin_base, or for experiments resnet18, swin_tiny, resnet_tiny."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Start from timm's ImageNet weights (downloaded unless cached)."),
    backbone_weights: Optional[Path] = typer.Option(None, "--backbone-weights", help="Start the backbone from this file."),
    init_checkpoint: Optional[str] = typer.Option(
        None, "--init-checkpoint", help="Fine-tune: start MDHR from this aucli checkpoint ('starter': the shipped "
        "one). Same AU set: all of it; another: backbone, static projection and MFD. Not its calibration head."),
    drop_path_rate: Optional[float] = typer.Option(None, "--drop-path-rate", help="Swin drop-path (default 0.5 for swin_base)."),
    feature_dim: int = typer.Option(512, "--feature-dim", help="Common feature width d."),
    k: int = typer.Option(5, "--k", min=1, help="MFD temporal pooling half-window."),
    clip_length: int = typer.Option(16, "--clip-length", "-T", help="Frames per clip T."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Clips per step, per process."),
    epochs: int = typer.Option(200, "--epochs", min=1, help="Epochs (--clips-per-video random clips per video each)."),
    clips_per_video: int = typer.Option(1, "--clips-per-video", min=1,
                                        help="Random clips drawn from each video per epoch (the reference: 1)."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", help="AdamW decoupled weight decay."),
    beta1: float = typer.Option(0.9, "--beta1"),
    beta2: float = typer.Option(0.999, "--beta2"),
    warmup_epochs: int = typer.Option(0, "--warmup-epochs", min=0, help="Linear warm-up before the cosine decay."),
    lambda_sub: float = typer.Option(0.01, "--lambda", help="Weight of the regional cross-entropy."),
    resize: int = typer.Option(256, "--resize", min=224, help="Training resize before the random 224 crop."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Random horizontal flip."),
    color_jitter: float = typer.Option(0.4, "--color-jitter", min=0.0, max=1.0,
                                       help="Brightness/contrast/saturation factors in [1-j, 1+j]."),
    val_interval: int = typer.Option(25, "--val-interval", min=1, help="Validate every N epochs (and at the end)."),
    select_on_test: bool = typer.Option(
        False, "--select-on-test", help="Reference protocol: pick the best epoch on the test fold "
        "(inflates scores). Default: on training subjects held out for validation."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", min=0.0, max=0.9,
                                       help="Share of training subjects held out for model selection."),
    tune_thresholds: bool = typer.Option(False, "--tune-thresholds", help="Per-AU thresholds maximising validation F1."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(4, "--workers", min=0, help="Data-loading processes per training process."),
    eval_batch_size: int = typer.Option(8, "--eval-batch-size", min=1, help="Clips per validation batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (torchrun: one GPU per process)."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on GPUs that support it."),
    cpu_amp: bool = typer.Option(False, "--cpu-amp", help="bf16 autocast when training on the CPU "
                                 "(faster on CPUs with AVX512-BF16 or AMX)."),
    project: Path = typer.Option(Path("runs/train"), "--project", help="Folder of runs."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default <dataset>_fold<f>_<backbone>); never overwritten."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run from its last.pt (other options ignored)."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after-epochs", hidden=True,
                                             help="Exit after N epochs as if killed (for testing --resume)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display or summaries."),
) -> None:
    """Train MDHR on one fold: runs/train/<name>/ gets config.json, metrics.jsonl, last.pt and best.pt."""
    from .train import TrainConfig, train

    cfg = TrainConfig(
        dataset=dataset.value, fold=fold, data_root=str(data_root) if data_root else None, backbone=backbone,
        pretrained=pretrained, backbone_weights=str(backbone_weights) if backbone_weights else None,
        init_checkpoint=_init_checkpoint(init_checkpoint),
        drop_path_rate=drop_path_rate, feature_dim=feature_dim, k=k, clip_length=clip_length,
        batch_size=batch_size, epochs=epochs, clips_per_video=clips_per_video, lr=lr, weight_decay=weight_decay,
        betas=(beta1, beta2),
        warmup_epochs=warmup_epochs, lambda_sub=lambda_sub, resize=resize, flip=flip, color_jitter=color_jitter,
        val_interval=val_interval, select_on_test=select_on_test, val_fraction=val_fraction,
        tune_thresholds=tune_thresholds, seed=seed, workers=workers, eval_batch_size=eval_batch_size,
        device=_device_option(device), amp=amp, cpu_amp=cpu_amp, project=str(project), name=name,
    )
    train(cfg, resume=resume, stop_after=stop_after, quiet=quiet)


@app.command("pretrain")
def pretrain_command(
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Prepared data (aucli prepare)."),
    dataset: DatasetLayout = typer.Option(DatasetLayout.videos, "--dataset", "-d", help="Dataset layout."),
    fold: int = typer.Option(1, "--fold", "-f", min=1, max=3, help="Fold whose training list is used."),
    backbone: str = typer.Option("resnet18", "--backbone", "-b", help="Backbone to pretrain (as for train)."),
    size: int = typer.Option(112, "--size", min=32, help="Input side in pixels while pretraining."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Frames per step."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Passes over every training frame."),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (AdamW; warm-up, then cosine to 0)."),
    weight_decay: float = typer.Option(0.05, "--weight-decay", help="AdamW decoupled weight decay."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", min=0.0, max=0.9,
                                       help="Share of training subjects held out (as aucli train holds them out)."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers", min=0, help="Data-loading processes."),
    cpu_amp: bool = typer.Option(True, "--cpu-amp/--no-cpu-amp", help="bf16 autocast on the CPU."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    project: Path = typer.Option(Path("runs/pretrain"), "--project", help="Folder of runs."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (default <backbone>_<size>px); never overwritten."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run from its last.pt (other options ignored)."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after-epochs", min=1,
                                             help="End after N epochs of this invocation, resumable from last.pt "
                                             "(the schedule stays that of --epochs)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Pretrain a backbone on single frames (no ImageNet needed); start `train` from it with --backbone-weights."""
    from .errors import UsageError
    from .pretrain import PretrainConfig, pretrain

    if resume is None and data_root is None:
        raise UsageError("--data-root is required (a folder written by aucli prepare)")
    cfg = PretrainConfig(
        data_root=str(data_root), dataset=dataset.value, fold=fold, backbone=backbone, size=size,
        batch_size=batch_size, epochs=epochs, lr=lr, weight_decay=weight_decay, val_fraction=val_fraction,
        seed=seed, workers=workers, cpu_amp=cpu_amp, device=_device_option(device), project=str(project), name=name,
    )
    result = pretrain(cfg, resume=resume, stop_after=stop_after, quiet=quiet)
    if "stopped_at" in result:
        if not quiet:
            typer.echo(f"stopped after epoch {result['stopped_at']}; best so far: epoch {result['best']['epoch']} "
                       f"in {result['run_dir']}/backbone.pt; continue with: aucli pretrain --resume "
                       f"{result['run_dir']}/last.pt", err=True)
        return
    if not quiet:
        typer.echo(f"best epoch {result['best']['epoch']} (val F1 {result['best']['mean_f1']:.1f}); start MDHR from it "
                   f"with: aucli train --backbone-weights {result['backbone']} ...", err=True)


@app.command("calibrate")
def calibrate_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A checkpoint written by aucli train (best.pt), "
                                    "or 'starter' (the shipped one)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the checkpoint with the head."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Override the checkpoint's data root."),
    dataset: Optional[DatasetLayout] = typer.Option(None, "--dataset", "-d", help="Override the checkpoint's dataset."),
    fold: Optional[int] = typer.Option(None, "--fold", "-f", min=1, max=3, help="Override the checkpoint's fold."),
    hog_components: int = typer.Option(256, "--hog-components", min=1, help="PCA components of the HOG features."),
    fhog_components: int = typer.Option(256, "--fhog-components", min=0,
                                         help="PCA components of the inner face's Felzenszwalb HOG (0: none)."),
    fhog_absolute: Optional[int] = typer.Option(None, "--fhog-absolute", min=0,
                                                help="How many of those components the head also reads as they "
                                                     "are, not relative to the face track (0: none; default 128, "
                                                     "or --fhog-components if fewer)."),
    vote: int = typer.Option(7, "--vote", min=0,
                             help="Smooth each face track's occurrence decisions by a majority vote over this "
                                  "many frames, as OpenFace 2.0 does (odd; 0: no vote). Thresholds are tuned "
                                  "with it."),
    epochs: int = typer.Option(60, "--epochs", min=1, help="Passes over the training frames (Adam)."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    l2: float = typer.Option(1e-3, "--l2", min=0.0, help="L2 penalty on the head's weights."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", min=0.0, max=0.9,
                                       help="Share of training people held out if the checkpoint names none."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Clips per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    workers: int = typer.Option(1, "--workers", min=0, help="Data-loading processes."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Add a per-video calibration head (relative to each face track, as OpenFace calibrates per person)."""
    import torch

    from .calibration import calibrate_checkpoint
    from .checkpoint import named_checkpoint
    from .errors import UsageError

    if output.exists():
        raise UsageError(f"{output}: already exists; choose another --output or remove it")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    log = (lambda line: None) if quiet else (lambda line: typer.echo(line, err=True))
    result = calibrate_checkpoint(
        named_checkpoint(checkpoint), output, data_root=data_root, dataset=dataset.value if dataset else None,
        fold=fold, val_fraction=val_fraction, seed=seed, hog_components=hog_components,
        fhog_components=fhog_components, fhog_absolute=fhog_absolute, vote=vote, epochs=epochs, lr=lr, l2=l2,
        batch_size=batch_size, device=device, workers=workers, log=log)
    if not quiet:
        before = result["before"]
        if before is None:  # the checkpoint's own head needs features this head does not compute
            than = "the checkpoint's previous head not compared"
        elif result["replaced_head"]:
            than = f"{before.mean_f1:.1f} with the checkpoint's previous head"
        else:
            than = f"{before.mean_f1:.1f} without"
        typer.echo(f"validation mean F1 {result['val'].mean_f1:.1f} with the head, {than} "
                   f"({len(result['val_subjects'])} people); wrote {result['output']}", err=True)


@app.command("eval")
def eval_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A checkpoint written by aucli train (best.pt), "
                                    "or 'starter' (the shipped one)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Override the checkpoint's data root."),
    dataset: Optional[DatasetLayout] = typer.Option(None, "--dataset", "-d", help="Override the checkpoint's dataset."),
    fold: Optional[int] = typer.Option(None, "--fold", "-f", min=1, max=3, help="Override the checkpoint's fold."),
    split: str = typer.Option("test", "--split", help="test or train list of the fold."),
    protocol: Protocol = typer.Option(
        Protocol.reference, "--protocol",
        help="reference: non-overlapping T-frame clips (spec §7.4); detect: detect's sliding windows."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0,
                                              help="One threshold for every AU instead of the checkpoint's."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Clips per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    workers: int = typer.Option(2, "--workers", min=0, help="Data-loading processes."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table."),
) -> None:
    """Per-AU F1 and accuracy of a trained checkpoint on its test fold."""
    import json

    import torch

    from .checkpoint import named_checkpoint
    from .errors import UsageError
    from .evaluate import evaluate_checkpoint, print_metrics

    if split not in ("test", "train"):
        raise UsageError(f"--split {split}: expected test or train")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate_checkpoint(
        named_checkpoint(checkpoint), data_root=data_root, dataset=dataset.value if dataset else None, fold=fold,
        split=split, protocol=protocol.value, thresholds=threshold, batch_size=batch_size, device=device,
        workers=workers,
    )
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if not quiet:
        print_metrics(result)


@app.command("prepare")
def prepare_command(
    dataset: DatasetLayout = typer.Argument(
        ..., help="bp4d, disfa, videos (any videos with per-frame label CSVs), or synthetic (generated)."),
    output: Path = typer.Option(..., "--output", "-o", help="Data root to write (images + fold lists)."),
    frames: Optional[Path] = typer.Option(None, "--frames", help="BP4D: frame root <subject>/<task>/<frame>.jpg."),
    videos: Optional[Path] = typer.Option(None, "--videos", help="DISFA: folder with the left-camera videos; "
                                          "videos: folder of videos (searched recursively)."),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="BP4D: folder of <subject>_<task>.csv AU occurrence files; "
        "DISFA: ActionUnit_Labels folder (<SN>/<SN>_au<k>.txt); videos: OpenFace-style per-frame CSVs "
        "(frame, success, AUxx_c), one per video, named by the video's file stem."),
    index: Optional[Path] = typer.Option(None, "--index", help="videos: CSV with clip_id (video stem) and person "
                                         "columns; clips of one person stay on one side of every split. "
                                         "Without it each video is its own person."),
    au_set: Optional[str] = typer.Option(None, "--au-set", help="videos: AU set of the labels (default: the "
                                         "largest known set the label columns cover, e.g. openface)."),
    test_fraction: Optional[float] = typer.Option(
        None, "--test-fraction", min=0.01, max=0.9, help="videos: hold out this share of the persons as the "
        "test list of a single fold 1 (default: three person-independent folds)."),
    parts: Optional[Path] = typer.Option(None, "--parts", help="Subject parts: JSON {subject: 1|2|3} or three lines "
                                         "of subject ids (default: the standard folds, spec §7.5)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Parallel processes (one core each)."),
    chunk: int = typer.Option(512, "--chunk", min=16, help="Frames per unit of work (the unit of resuming)."),
    drop_missing: bool = typer.Option(False, "--drop-missing",
                                      help="Leave frames without a face out of the lists, instead of aligning them "
                                      "with the nearest frame's face."),
    seed: int = typer.Option(0, "--seed", help="synthetic: the seed the data is generated from; "
                             "videos: the seed of the person split."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display or summary."),
) -> None:
    """Detect and align every frame of raw BP4D/DISFA or labelled videos, write the standard layout; resumable."""
    from .errors import UsageError

    if dataset is DatasetLayout.synthetic:
        from .data.synthetic import SyntheticSpec, ensure_synthetic

        root = ensure_synthetic(output, SyntheticSpec(seed=seed), quiet=quiet)
        if not quiet:
            typer.echo(f"synthetic data (seed {seed}) in {root}; train with --dataset synthetic --data-root {root}",
                       err=True)
        return
    from .data.prepare import prepare

    source = frames if dataset is DatasetLayout.bp4d else videos
    if source is None or labels is None:
        need = "--frames" if dataset is DatasetLayout.bp4d else "--videos"
        raise UsageError(f"prepare {dataset.value} needs {need} and --labels")
    if dataset is not DatasetLayout.videos and (index or au_set or test_fraction):
        raise UsageError("--index, --au-set and --test-fraction are for prepare videos")
    options = dict(source=source, labels=labels, output=output, parts=parts, workers=workers, chunk=chunk,
                   drop_missing=drop_missing, index=index, au_set=au_set, test_fraction=test_fraction, seed=seed)
    if quiet:
        prepare(dataset.value, **options)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn(f"prepare {dataset.value}"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"),
                  TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("frames", total=None)
        summary = prepare(dataset.value, **options,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"{summary['frames_written']} of {summary['frames']} frames written to {output}; "
                  f"{summary['frames_without_face']} without a detected face "
                  f"({'aligned with the nearest face' if not drop_missing else 'left out'}); details in "
                  f"{output / 'prepare.json'}", highlight=False, soft_wrap=True)
    for problem in summary["problems"]:
        console.print(f"warning: {problem}", highlight=False, soft_wrap=True)
