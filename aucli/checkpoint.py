"""Self-describing, safe checkpoints.

A checkpoint is a ``.pt`` file holding only tensors and plain values, so it opens
with ``torch.load(weights_only=True)`` and never runs pickled code::

    {"format": "aucli-checkpoint", "format_version": 1,
     "metadata": {...plain values...}, "state_dict": {...tensors...}, "extra": {...}}

``extra`` carries optional training state (optimiser, scheduler, epoch, RNG).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .aus import get_au_set
from .errors import AucliError

FORMAT = "aucli-checkpoint"
FORMAT_VERSION = 1

#: The starter model that ships inside the package (docs/models.md): the last resort of `detect`.
STARTER = Path(__file__).resolve().parent / "weights" / "starter.pt"


def named_checkpoint(value: str | Path) -> Path:
    """A checkpoint option's value as a path: ``starter`` names the shipped starter model
    (unless a file or folder of that name is in the current folder)."""
    path = Path(value)
    return STARTER if str(value) == "starter" and not path.exists() else path


@dataclass
class CheckpointMetadata:
    """Everything needed to rebuild the model and read its outputs."""

    au_set: str
    aus: list[int]
    au_names: list[str]
    backbone: str
    feature_dim: int
    clip_length: int
    k: int
    thresholds: list[float]
    input_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    source: dict[str, Any] = field(default_factory=dict)
    aucli_version: str = __version__

    @property
    def model_config(self) -> dict[str, Any]:
        return {"au_set": self.au_set, "backbone": self.backbone, "k": self.k, "feature_dim": self.feature_dim}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> CheckpointMetadata:
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        absent = sorted(required - data.keys())
        if absent:
            raise AucliError(f"{where}: metadata lacks {', '.join(absent)}")
        meta = cls(**{k: v for k, v in data.items() if k in names})
        meta.validate(where)
        return meta

    def validate(self, where: str) -> None:
        try:
            au_set = get_au_set(self.au_set)
        except ValueError as exc:
            raise AucliError(f"{where}: {exc}") from None
        if list(self.aus) != list(au_set.aus):
            raise AucliError(f"{where}: AU list {self.aus} does not match AU set {self.au_set}")
        if len(self.thresholds) != len(self.aus):
            raise AucliError(f"{where}: {len(self.thresholds)} thresholds for {len(self.aus)} AUs")
        if self.clip_length < 2 * self.k + 1:
            raise AucliError(f"{where}: clip length {self.clip_length} is too short for k={self.k}")


@dataclass
class Checkpoint:
    metadata: CheckpointMetadata
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any]
    video_head: dict[str, Any] | None = None  # aucli/calibration.py, optional


def make_metadata(
    model: torch.nn.Module,
    clip_length: int,
    thresholds: list[float] | None = None,
    source: dict[str, Any] | None = None,
) -> CheckpointMetadata:
    au_set = model.au_set
    cfg = model.config
    meta = CheckpointMetadata(
        au_set=au_set.name,
        aus=list(au_set.aus),
        au_names=au_set.names,
        backbone=cfg["backbone"],
        feature_dim=cfg["feature_dim"],
        clip_length=int(clip_length),
        k=cfg["k"],
        thresholds=[float(t) for t in (thresholds or [0.5] * au_set.num_aus)],
        source=dict(source or {"kind": "random"}),
    )
    meta.validate("checkpoint")
    return meta


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    *,
    clip_length: int,
    thresholds: list[float] | None = None,
    source: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> CheckpointMetadata:
    """Write a checkpoint atomically (temporary file, then rename)."""
    meta = make_metadata(model, clip_length, thresholds, source)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": asdict(meta),
        "state_dict": state,
        "extra": extra or {},
    }
    write_atomic(path, payload)
    return meta


def export_checkpoint(source: str | Path, output: str | Path, *, half: bool = True,
                      source_update: dict[str, Any] | None = None) -> CheckpointMetadata:
    """A slim copy for shipping: no training state, floating tensors stored as fp16 if ``half``.

    Loading upcasts them to the model's fp32 parameters (``load_state_dict`` copies across dtypes).
    """
    ckpt = load_checkpoint(source)
    state = {k: v.half() if half and v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    meta = asdict(ckpt.metadata)
    meta["source"] = {**meta["source"], **(source_update or {})}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": meta,
               "state_dict": state, "extra": {}}
    if ckpt.video_head is not None:
        payload["video_head"] = ckpt.video_head
    write_atomic(output, payload)
    return ckpt.metadata


def save_with_video_head(source: str | Path, output: str | Path, head_state: dict[str, Any],
                         thresholds: list[float], source_update: dict[str, Any] | None = None) -> CheckpointMetadata:
    """A copy of ``source`` with a per-video calibration head (aucli/calibration.py) and the
    thresholds that go with its outputs; training state is dropped."""
    ckpt = load_checkpoint(source)
    meta = asdict(ckpt.metadata)
    meta["thresholds"] = [float(t) for t in thresholds]
    meta["source"] = {**meta["source"], **(source_update or {})}
    CheckpointMetadata.from_dict(meta, str(output))
    write_atomic(output, {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": meta,
                          "state_dict": ckpt.state_dict, "extra": {}, "video_head": head_state})
    return CheckpointMetadata.from_dict(meta, str(output))


def describe(meta: CheckpointMetadata) -> str:
    """One line on what a checkpoint is: backbone, AU set, and where it came from."""
    source = meta.source or {}
    origin = source.get("description") or {
        "random": "randomly initialised (outputs are meaningless)",
        "trained": f"trained on {source.get('dataset', '?')} fold {source.get('fold', '?')}",
        "official": "converted from a reference MDHR checkpoint",
    }.get(source.get("kind"), source.get("kind", "unknown origin"))
    return f"MDHR-{meta.backbone}, {meta.au_set} AU set ({len(meta.aus)} AUs), {origin}"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (provenance of checkpoints and converted files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | Path) -> Any:
    """``torch.load`` that runs no pickled code (``weights_only``) and prints nothing.

    On a legacy (non-zip) file pickled with protocol 3 or higher, torch warns that its
    safe unpickler expects protocol 2 before refusing or reading it; aucli reports its
    own one-line reason instead. Raises whatever torch raises.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def unreadable_reason(error: Exception) -> str:
    """Why ``load_tensors`` failed, in a few words (torch's own message runs to many lines)."""
    text = str(error)
    if "weights_only" in text or "Unsupported global" in text:
        return "it holds pickled objects, which aucli refuses to load"
    return "not a PyTorch file, or a damaged one"


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint without running any pickled code."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise AucliError(f"{where}: checkpoint not found")
    if path.stat().st_size == 0:
        raise AucliError(f"{where}: not an aucli checkpoint (the file is empty)")
    try:
        obj = load_tensors(path)
    except Exception as exc:
        raise AucliError(f"{where}: not a readable aucli checkpoint ({unreadable_reason(exc)})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        hint = ""
        if isinstance(obj, dict) and ("state_dict" in obj or any(str(k).startswith(("module.", "MFD.")) for k in obj)):
            hint = "; a reference MDHR checkpoint? convert it with `aucli convert-official`"
        raise AucliError(f"{where}: not an aucli checkpoint{hint}")
    if obj.get("format_version") != FORMAT_VERSION:
        raise AucliError(f"{where}: unsupported checkpoint format version {obj.get('format_version')!r}")
    if not isinstance(obj.get("metadata"), dict) or not isinstance(obj.get("state_dict"), dict):
        raise AucliError(f"{where}: checkpoint lacks metadata or state_dict")
    try:
        meta = CheckpointMetadata.from_dict(obj["metadata"], where)
    except TypeError as exc:
        raise AucliError(f"{where}: malformed metadata ({exc})") from None
    return Checkpoint(meta, obj["state_dict"], obj.get("extra") or {}, obj.get("video_head"))


class _SkipRandomFills(torch.overrides.TorchFunctionMode):
    """While active, the in-place random fills of weight initialisation do nothing.

    ``build_model`` overwrites every tensor from the checkpoint (``strict=True``), so the
    random initialisation would be thrown away: it took 0.66 s of loading a ResNet-50
    MDHR and 0.15 s of the ResNet-18 starter on the 2-core development machine.
    """

    FILLS = frozenset({
        torch.Tensor.uniform_, torch.Tensor.normal_,
        *(getattr(torch.nn.init, name) for name in (
            "uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
            "xavier_uniform_", "xavier_normal_", "orthogonal_")),
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FILLS:  # each fills its first argument, the tensor, and returns it
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build_model(ckpt: Checkpoint, where: str = "checkpoint") -> torch.nn.Module:
    """Instantiate the model a checkpoint describes and fill it, checking tensors against metadata."""
    from .model import MDHR

    with _SkipRandomFills():
        model = MDHR(**ckpt.metadata.model_config)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in ckpt.state_dict)
    unexpected = sorted(k for k in ckpt.state_dict if k not in own)
    bad_shape = [k for k in own if k in ckpt.state_dict and ckpt.state_dict[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"shape of {k} is {tuple(ckpt.state_dict[k].shape)}, expected {tuple(own[k].shape)}")
        raise AucliError(f"{where}: metadata and tensors disagree: {'; '.join(parts)}")
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load an aucli checkpoint: the MDHR model in eval mode, with ``.metadata`` and
    ``.video_head`` (the per-video calibration head, or None) attached."""
    from .calibration import head_from_state

    ckpt = load_checkpoint(path)
    model = build_model(ckpt, str(path))
    model.metadata = ckpt.metadata
    model = model.to(device).eval()
    head = None
    if ckpt.video_head is not None:
        with _SkipRandomFills():  # its tensors come from the checkpoint too
            head = head_from_state(ckpt.video_head, str(path))
    if head is not None and head.num_aus != len(ckpt.metadata.aus):
        raise AucliError(f"{path}: video_head is for {head.num_aus} AUs, the model has {len(ckpt.metadata.aus)}")
    # Not a submodule: the model's own state_dict stays MDHR's alone.
    object.__setattr__(model, "video_head", head)
    return model
