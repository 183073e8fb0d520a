"""Import checkpoints written by the reference implementation (spec §6.5, §8)."""

from __future__ import annotations

from pathlib import Path

import torch

from .aus import AU_SETS, get_au_set
from .checkpoint import CheckpointMetadata, file_sha256, load_tensors, save_checkpoint, unreadable_reason
from .errors import AucliError, UsageError
from .model import MDHR
from .model.reference import convert_reference_state, unwrap_state_dict


def model_from_reference_state(state: object, dataset: str, backbone: str, k: int = 5) -> MDHR:
    """A reference state dict (bare, wrapped, or DataParallel-prefixed) -> an aucli MDHR in eval mode."""
    state = unwrap_state_dict(state)
    _check_kind(state, dataset, backbone)
    model = MDHR(dataset, backbone=backbone, k=k)
    converted = convert_reference_state(state, model)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def _check_kind(state: dict[str, torch.Tensor], dataset: str, backbone: str) -> None:
    """Name the likely wrong option before listing dozens of mismatched keys."""
    classifier = state.get("node_classifier.sc")
    expected = get_au_set(dataset).num_aus
    if classifier is not None and classifier.shape[0] != expected:
        fits = [s.name for s in AU_SETS.values() if s.num_aus == classifier.shape[0]]
        hint = f" (looks like {fits[0]})" if fits else ""
        raise AucliError(
            f"it holds {classifier.shape[0]} AUs but {dataset} has {expected}{hint}: wrong --dataset?"
        )
    is_swin = any(k.startswith("Backbone.layers.") for k in state)
    is_resnet = any(k.startswith("Backbone.layer1.") for k in state)
    if (is_swin and not backbone.startswith("swin")) or (is_resnet and not backbone.startswith("resnet")):
        actual = "a Swin" if is_swin else "a ResNet"
        raise AucliError(f"its backbone is {actual}, not {backbone}: wrong --backbone?")


def convert_official_checkpoint(
    source: str | Path,
    output: str | Path,
    dataset: str,
    backbone: str = "resnet50",
    *,
    clip_length: int = 16,
    k: int = 5,
    threshold: float = 0.5,
    overwrite: bool = False,
) -> CheckpointMetadata:
    """Convert ``source`` (.pth from CVI-SZU/MDHR) into an aucli checkpoint at ``output``."""
    source, output = Path(source), Path(output)
    if not source.is_file():
        raise AucliError(f"{source}: file not found")
    if output.exists() and not overwrite:
        raise UsageError(f"{output}: already exists (use --force to overwrite)")
    if output.suffix != ".pt":
        raise UsageError(f"{output}: aucli checkpoints end in .pt")
    try:
        obj = load_tensors(source)
    except Exception as exc:
        raise AucliError(f"{source}: not a readable PyTorch checkpoint ({unreadable_reason(exc)})") from None
    try:
        model = model_from_reference_state(obj, dataset, backbone, k)
    except AucliError as exc:
        raise AucliError(f"{source}: not a reference {dataset}/{backbone} checkpoint: {exc}") from None
    epoch = obj.get("epoch") if isinstance(obj, dict) else None
    return save_checkpoint(
        output,
        model,
        clip_length=clip_length,
        thresholds=[threshold] * model.au_set.num_aus,
        source={
            "kind": "converted",
            "converted_from": source.name,
            "converted_sha256": file_sha256(source),
            "reference": "CVI-SZU/MDHR",
            "dataset": dataset,
            "epoch": epoch if isinstance(epoch, int) else None,
        },
    )
