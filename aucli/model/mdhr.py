"""MDHR assembled: backbone -> static path + MFD -> HSR -> per-AU TCN -> classifier (spec §1.2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..aus import AUSet, get_au_set
from ..errors import AucliError
from .backbone import Backbone
from .blocks import LinearBlock
from .hsr import HSR
from .mfd import MFD
from .temporal import SimilarityClassifier, TemporalConv

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class FrameCodes:
    """Per-frame results of the backbone, computed once per frame."""

    static: torch.Tensor  # (M, 49, d): LinearBlock of the final token map
    maps: list[torch.Tensor]  # f1..f4 for MFD differencing


class MDHR(nn.Module):
    """Multi-scale Dynamic and Hierarchical Relationship model for AU occurrence."""

    def __init__(
        self,
        au_set: str | AUSet = "bp4d",
        backbone: str = "resnet50",
        k: int = 5,
        feature_dim: int = 512,
        pretrained: bool = False,
        backbone_weights: str | Path | None = None,
        drop_path_rate: float | None = None,
    ) -> None:
        super().__init__()
        self.au_set = get_au_set(au_set)
        if k < 1:
            raise AucliError(f"k must be at least 1, got {k}")
        self.k = k
        # Only architecture-defining values go into config; pretrained weights are a start, not a shape.
        self.config: dict[str, Any] = {
            "au_set": self.au_set.name,
            "backbone": backbone,
            "k": k,
            "feature_dim": feature_dim,
        }
        self.backbone = Backbone(backbone, pretrained, backbone_weights, drop_path_rate)
        self.static_proj = LinearBlock(self.backbone.token_channels, feature_dim)
        self.mfd = MFD(self.backbone.c1, feature_dim, k)
        self.hsr = HSR(self.au_set, feature_dim)
        self.temporal = TemporalConv(self.au_set.num_aus, feature_dim)
        self.classifier = SimilarityClassifier(self.au_set.num_aus, feature_dim)

    @property
    def clip_min(self) -> int:
        """Shortest clip the reference supports: the pooled difference sequence needs T-1 >= 2k."""
        return 2 * self.k + 1

    # ----- the three stages a sliding-window caller uses ---------------------------
    def encode_frames(self, frames: torch.Tensor) -> FrameCodes:
        """frames (M, 3, 224, 224) -> per-frame static tokens and multi-scale maps."""
        out = self.backbone(frames)
        return FrameCodes(self.static_proj(out.tokens), out.maps)

    def encode_motion(self, prev_maps: list[torch.Tensor], next_maps: list[torch.Tensor]) -> torch.Tensor:
        """Maps of P frames and of their successors -> projected differences (P, 4, 8*C1, 7, 7)."""
        return self.mfd.project(prev_maps, next_maps)

    def predict_window(
        self, static: torch.Tensor, motion: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """static (B, T, 49, d) and motion (B, T-1, 4, C, 7, 7) -> probs (B, T, N), aux logits."""
        B, T = static.shape[:2]
        if T < self.clip_min:
            raise AucliError(f"clips need at least {self.clip_min} frames for k={self.k}, got {T}")
        g = static.flatten(0, 1) + self.mfd(motion)  # (BT, 49, d)
        nodes, aux = self.hsr(g)  # (BT, N, d)
        nodes = self.temporal(nodes.view(B, T, *nodes.shape[1:]))
        probs = self.classifier(nodes).view(B, T, -1)
        aux_out = {
            name: logits.view(B, T, -1) for name, logits in zip(self.au_set.branch_names, aux)
        }
        return probs, aux_out

    def forward(
        self, clips: torch.Tensor, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """clips (B, T, 3, 224, 224), ImageNet-normalised -> AU probabilities (B, T, N)."""
        if clips.dim() != 5 or clips.shape[2] != 3:
            raise AucliError(f"expected clips of shape (B, T, 3, H, W), got {tuple(clips.shape)}")
        B, T = clips.shape[:2]
        if T < self.clip_min:
            raise AucliError(f"clips need at least {self.clip_min} frames for k={self.k}, got {T}")
        codes = self.encode_frames(clips.flatten(0, 1))
        maps = [m.view(B, T, *m.shape[1:]) for m in codes.maps]
        motion = self.encode_motion(
            [m[:, :-1].flatten(0, 1) for m in maps], [m[:, 1:].flatten(0, 1) for m in maps]
        )
        motion = motion.view(B, T - 1, *motion.shape[1:])
        probs, aux = self.predict_window(codes.static.view(B, T, *codes.static.shape[1:]), motion)
        return (probs, aux) if return_aux else probs
