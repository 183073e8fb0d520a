"""Backbones behind one interface: a final 7x7 token map plus four multi-scale maps (spec §1.1).

ResNets are built in aucli/model/resnet.py (timm's architecture, names and
initialisation, without importing timm); Swin comes from timm. The rest of MDHR only sees
``BackboneOutput(tokens (M, 49, C_L), maps [f1..f4])`` where ``f_l`` has
``C1 * 2**(l-1)`` channels on a ``56 / 2**(l-1)`` grid for 224x224 input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import AucliError
from .resnet import RESNETS


@dataclass(frozen=True)
class BackboneSpec:
    """One named backbone: its timm model (Swin; ImageNet weights for all) and family."""

    timm_name: str
    family: str  # "resnet" (built by model/resnet.py) or "swin"
    pretrained_tag: str | None = None  # timm weights matching the reference's ImageNet start
    default_drop_path: float = 0.0


BACKBONES: dict[str, BackboneSpec] = {
    # The reference starts from the legacy torchvision ImageNet-1k file (spec §6.1).
    "resnet50": BackboneSpec("resnet50", "resnet", "tv_in1k"),
    # Official Swin release weights; drop-path 0.5 as in the reference (spec §6.1).
    "swin_base": BackboneSpec(
        "swin_base_patch4_window7_224", "swin", "ms_in1k", default_drop_path=0.5
    ),
    # Smaller backbones of the same two families, for experiments and fast tests.
    "resnet18": BackboneSpec("resnet18", "resnet", "tv_in1k"),
    "swin_tiny": BackboneSpec(
        "swin_tiny_patch4_window7_224", "swin", "ms_in1k", default_drop_path=0.2
    ),
    "resnet_tiny": BackboneSpec("resnet18", "resnet", None),  # layers and channels: model/resnet.py
}


@dataclass
class BackboneOutput:
    tokens: torch.Tensor  # (M, 49, C_L)
    maps: list[torch.Tensor]  # f1..f4, (M, C_l, H_l, W_l)


def _tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """timm Swin features are channel-last (M, H, W, C); MFD wants (M, C, H, W)."""
    return x.permute(0, 3, 1, 2).contiguous()


class Backbone(nn.Module):
    """A ResNet or a timm Swin that exposes the taps MDHR needs."""

    def __init__(
        self,
        name: str = "resnet50",
        pretrained: bool = False,
        weights_file: str | Path | None = None,
        drop_path_rate: float | None = None,
    ) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise AucliError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
        spec = BACKBONES[name]
        self.name = name
        self.family = spec.family
        if spec.family == "resnet":
            self.model = RESNETS[name]()
        else:
            import timm  # imports torchvision and torch._dynamo: seconds, so only for Swin

            dpr = spec.default_drop_path if drop_path_rate is None else drop_path_rate
            self.model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, drop_path_rate=dpr)
        if pretrained:
            self.load_pretrained(spec)
        if weights_file is not None:
            self.load_weights_file(weights_file)
        self.channels = self._probe_channels()

    # ----- channels --------------------------------------------------------------
    def _probe_channels(self) -> list[int]:
        """Channels of f1..f4 from timm's feature_info (ResNet: layer1-4; Swin: stages 1-4).

        For Swin the taps are stage inputs, which have the same widths as the stage outputs
        listed by timm (C1, 2C1, 4C1, 8C1).
        """
        info = [f["num_chs"] for f in self.model.feature_info]
        return info[-4:]

    @property
    def c1(self) -> int:
        """Channels of the first tap; MFD projects every scale to 8 * c1."""
        return self.channels[0]

    @property
    def token_channels(self) -> int:
        """Channels of the final token map X_L."""
        return self.channels[3]

    # ----- weights -------------------------------------------------------------------
    def load_pretrained(self, spec: BackboneSpec) -> None:
        """Start from timm's ImageNet weights: from the local Hugging Face cache when they are
        there, else downloaded. Offline, fail in seconds rather than after the hub client's
        retries (about a minute)."""
        if spec.pretrained_tag is None:
            raise AucliError(f"backbone {self.name!r} has no ImageNet weights to start from")
        import timm

        tag = f"{spec.timm_name}.{spec.pretrained_tag}"
        advice = "connect to the network, or pass --backbone-weights FILE with a local copy"
        cached = _cached_weights(tag)
        if cached is None and (problem := _hub_unreachable()):
            raise AucliError(f"could not fetch ImageNet weights {tag!r}: {problem}; {advice}")
        try:
            overlay = {"file": cached} if cached else None
            source = timm.create_model(tag, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
        except Exception as exc:  # network errors come in many types
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AucliError(f"could not fetch ImageNet weights {tag!r} from the timm hub ({reason}); {advice}") from None
        self.model.load_state_dict(source.state_dict(), strict=True)

    def load_weights_file(self, path: str | Path) -> None:
        """Load backbone weights from a local file (a timm/torchvision state dict, or {'model': ...})."""
        from ..checkpoint import load_tensors, unreadable_reason

        path = Path(path)
        if not path.is_file():
            raise AucliError(f"{path}: backbone weights file not found")
        try:
            state = load_tensors(path)
        except Exception as exc:
            raise AucliError(f"{path}: not a readable weights file ({unreadable_reason(exc)})") from None
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        if not isinstance(state, dict):
            raise AucliError(f"{path}: expected a state dict of tensors")
        from .reference import official_backbone_to_timm

        state = official_backbone_to_timm(state, self.family)
        own = self.model.state_dict()
        state = {k: v for k, v in state.items() if k in own}  # drop classifier heads
        missing = [k for k in own if k not in state]
        if missing:
            raise AucliError(
                f"{path}: {len(missing)} backbone tensors missing, e.g. {missing[0]!r}"
            )
        bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise AucliError(f"{path}: shape mismatch for {bad[0]!r}")
        self.model.load_state_dict(state, strict=True)

    # ----- forward -----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> BackboneOutput:
        if self.family == "resnet":
            m = self.model
            x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
            f1 = m.layer1(x)
            f2 = m.layer2(f1)
            f3 = m.layer3(f2)
            f4 = m.layer4(f3)
            # X_L is layer4 flattened to tokens, no pooling (spec §1.1).
            tokens = f4.flatten(2).transpose(1, 2)
            return BackboneOutput(tokens, [f1, f2, f3, f4])
        # Swin: taps sit before each stage's blocks; timm puts patch merging at the
        # start of stages 2-4, so "input to stage blocks" is the reference's
        # "stage output including merging" (spec §1.1, §8.3).
        m = self.model
        x = m.patch_embed(x)  # (M, 56, 56, C1)
        maps = []
        for stage in m.layers:
            x = stage.downsample(x)
            maps.append(_tokens_to_map(x))
            x = stage.blocks(x)
        x = m.norm(x)  # (M, 7, 7, C_L)
        tokens = x.flatten(1, 2)
        return BackboneOutput(tokens, maps)


def _cached_weights(tag: str) -> str | None:
    """The weights file of a timm tag in the local Hugging Face cache, if it is there."""
    import timm  # here only: it imports torchvision and torch._dynamo (seconds)
    from huggingface_hub import try_to_load_from_cache

    hub_id = timm.models.get_pretrained_cfg(tag).hf_hub_id
    for name in ("model.safetensors", "pytorch_model.bin") if hub_id else ():
        found = try_to_load_from_cache(hub_id, name)
        if isinstance(found, str):
            return found
    return None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """None when the Hugging Face hub (or the HTTPS proxy) accepts a connection within
    ``timeout`` seconds, else why not. Name lookup has no timeout of its own, hence the thread."""
    import socket
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and they are not in the local cache"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlsplit(proxy or constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    failure: list[str] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as error:
            failure.append(f"cannot reach {host} ({error.strerror or error})")

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout + 1)
    if probe.is_alive():
        return f"no answer from {host} within {timeout:.0f} s"
    return failure[0] if failure else None
