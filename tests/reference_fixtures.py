"""Regenerate the reference weights and inputs of ../shared/spec/fixtures (see its README)."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


REFERENCE_DIR = REPO / "tests" / "reference"  # copies of ../shared/spec/fixtures and key lists


FIXTURES = {
    # fixture file: (dataset, backbone, key-list file)
    "reference_bp4d_resnet50_seed0.npz": ("bp4d", "resnet50", "official_state_dict_bp4d_resnet50.txt"),
    "reference_disfa_resnet50_seed0.npz": ("disfa", "resnet50", "official_state_dict_disfa_resnet50.txt"),
    "reference_bp4d_swin_base_seed0.npz": ("bp4d", "swin_base", "official_state_dict_bp4d_swinb.txt"),
}


def read_key_list(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        key, shape = line.split()
        dims = shape.strip("[]")
        out.append((key, tuple(int(d) for d in dims.split(",")) if dims else ()))
    return out


def reference_state(
    keys: list[tuple[str, tuple[int, ...]]], seed: int, structural: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Weights by the README's rule. ``structural`` supplies Swin's index/mask buffers by key."""
    state = {}
    for key, shape in keys:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=torch.long)
            continue
        if key.endswith(("relative_position_index", "attn_mask")):
            state[key] = structural[key]
            continue
        g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")) ^ seed)
        if key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean"):
            value = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) <= 1 and key.endswith(".weight"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) <= 1:
            value = 0.1 * torch.randn(shape, generator=g)
        else:
            value = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        state[key] = value.float()
    return state


def reference_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def load_fixture(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def reference_state_for(fixture: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], str, str]:
    """The reference-format state dict behind a fixture, plus its dataset and backbone."""
    from aucli.model import MDHR
    from aucli.model.reference import map_reference_keys

    dataset, backbone, key_file = FIXTURES[fixture]
    keys = read_key_list(REFERENCE_DIR / key_file)
    structural: dict[str, torch.Tensor] = {}
    if backbone.startswith("swin"):
        # Index and mask buffers are structure, kept as the module creates them (fixture README).
        probe = MDHR(dataset, backbone)
        buffers = dict(probe.named_buffers())
        for key, _ in keys:
            if key.endswith(("relative_position_index", "attn_mask")):
                _, mapped, _ = map_reference_keys({key: torch.empty(0)}, "swin")
                structural[key] = buffers[next(iter(mapped))]
    return reference_state(keys, seed, structural), dataset, backbone
