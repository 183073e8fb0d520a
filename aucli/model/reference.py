"""Key names of the reference implementation (CVI-SZU/MDHR) and how they map onto aucli's.

This table is the single source of the correspondence: the converter
(`aucli convert-official`), the backbone-weights loader and the tests all use it.
Key lists of the reference state dicts: spec §8 and ``official_state_dict_*.txt``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import AucliError

# (reference pattern, aucli replacement), tried in order; the first match wins.
KEY_RULES: list[tuple[str, str]] = [
    (r"^Backbone\.", "backbone.model."),
    (r"^global_linear\.", "static_proj."),
    (r"^MFD\.conv([1-4])\.", r"mfd.scales.{\1-1}.conv."),
    (r"^MFD\.bn([1-4])\.", r"mfd.scales.{\1-1}.bn."),
    (r"^MFD\.weight_([1-4])\.", r"mfd.scales.{\1-1}.gate_conv."),
    (r"^MFD\.wbn([1-4])\.", r"mfd.scales.{\1-1}.gate_bn."),
    (r"^MFD\.weight\.", "mfd.gate_mix."),
    (r"^MFD\.convcat\.", "mfd.fuse_conv."),
    (r"^MFD\.bn\.", "mfd.fuse_bn."),
    (r"^LRM\.class_linears\.(\d+)\.", r"hsr.au_extractors.\1."),
    (r"^LRM\.(\w+?)_linear\.", r"hsr.region_blocks.\1."),
    (r"^LRM\.(\w+?)_fc\.", r"hsr.aux_heads.\1."),
    (r"^CRM\.gat\.linear\.", "hsr.gat.proj."),
    # "source" scores the receiving node, "target" the neighbour (spec §3.7, §9.2).
    (r"^CRM\.gat\.scoring_fn_source$", "hsr.gat.score_receiver"),
    (r"^CRM\.gat\.scoring_fn_target$", "hsr.gat.score_neighbour"),
    (r"^CRM\.gat\.bias$", "hsr.gat.bias"),
    (r"^TCN\.temporal_cnn\.(\d+)\.", r"temporal.convs.\1."),
    (r"^TCN\.bn\.", "temporal.bn."),
    (r"^node_classifier\.sc$", "classifier.prototypes"),
]

# Swin buffers that timm rebuilds itself (spec §8.3); consumed, checked where timm holds them.
STRUCTURAL_BUFFERS = ("relative_position_index", "attn_mask")

_SCALE = re.compile(r"\{(\d)-1\}")


def _apply_rules(key: str) -> str | None:
    for pattern, repl in KEY_RULES:
        if re.search(pattern, key):
            out = re.sub(pattern, repl, key, count=1)
            return _SCALE.sub(lambda m: str(int(m.group(1)) - 1), out)
    return None


def _shift_swin_downsample(key: str) -> str:
    """Reference Swin merges at the end of stages 0-2; timm at the start of stages 1-3."""
    m = re.match(r"^(.*layers\.)(\d)(\.downsample\..*)$", key)
    if m:
        return f"{m.group(1)}{int(m.group(2)) + 1}{m.group(3)}"
    return key


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or {'state_dict': ...}; strip DataParallel 'module.' prefixes."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise AucliError("not a state dict (expected a mapping of parameter names to tensors)")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise AucliError(f"not a state dict: entry {key!r} is not a named tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def official_backbone_to_timm(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Backbone keys of the official ImageNet files (or the reference's ``Backbone.*``) -> timm keys."""
    state = {k[len("Backbone."):] if k.startswith("Backbone.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith(STRUCTURAL_BUFFERS)}
    if family == "swin" and any(k.startswith("layers.0.downsample.") for k in state):
        state = {_shift_swin_downsample(k): v for k, v in state.items()}
    return state


def map_reference_keys(
    state: dict[str, torch.Tensor], family: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Rename reference keys to aucli keys.

    Returns (renamed tensors, structural buffers by aucli name, reference keys no rule matched).
    """
    renamed: dict[str, torch.Tensor] = {}
    structural: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        target = _apply_rules(key)
        if target is None:
            unmatched.append(key)
            continue
        if family == "swin" and target.startswith("backbone.model."):
            target = _shift_swin_downsample(target)
        if key.endswith(STRUCTURAL_BUFFERS):
            structural[target] = value
        else:
            renamed[target] = value
    return renamed, structural, unmatched


def convert_reference_state(
    state: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """A reference state dict (already unwrapped) -> a complete aucli state dict for ``model``.

    Every source key must be consumed and every model tensor filled with a matching
    shape; otherwise AucliError names the offending keys.
    """
    family = model.backbone.family
    renamed, structural, unmatched = map_reference_keys(state, family)
    own = model.state_dict()
    unexpected = sorted(unmatched + [k for k in renamed if k not in own])
    missing = sorted(k for k in own if k not in renamed)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    shape = [k for k in renamed if k in own and renamed[k].shape != own[k].shape]
    if shape:
        k = shape[0]
        problems.append(
            f"{len(shape)} shape mismatch(es), e.g. {k}: {tuple(renamed[k].shape)} vs {tuple(own[k].shape)}"
        )
    problems += _check_structural(structural, model)
    if problems:
        raise AucliError("; ".join(problems))
    return {k: renamed[k].to(own[k].dtype) for k in own}


def _check_structural(structural: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """The dropped Swin buffers must equal what timm rebuilds, or the checkpoint is for another layout."""
    buffers = dict(model.named_buffers())
    for name, value in structural.items():
        ours = buffers.get(name)
        if ours is None:
            # timm may build the mask on the fly; nothing to compare with.
            continue
        if ours.shape != value.shape or not torch.equal(ours.to(value.dtype), value):
            return [f"buffer {name} differs from the one timm builds"]
    return []


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
