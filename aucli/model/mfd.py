"""MFD: multi-scale facial dynamics from differences of neighbouring frames (spec §2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GATE_WIDTH = 16  # per-scale bottleneck of the adaptive weighting branch (spec §2.4)


def _init_conv(conv: nn.Conv2d) -> None:
    # N(0, sqrt(2 / (kh * kw * out))) as in the reference (spec §6.2).
    kh, kw = conv.kernel_size
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kh * kw * conv.out_channels)))


class ScaleProjection(nn.Module):
    """Projects one scale's difference maps onto the 7x7 grid, and its weighting bottleneck."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        # Kernel = stride = 8, 4, 2, 1 for scales 1-4, not the paper's 8/l (spec §2.2, §9.1 #3).
        self.conv = nn.Conv2d(in_channels, out_channels, stride, stride)
        self.bn = nn.BatchNorm2d(out_channels)
        self.gate_conv = nn.Conv2d(out_channels, GATE_WIDTH, 1)
        self.gate_bn = nn.BatchNorm2d(GATE_WIDTH)
        _init_conv(self.conv)
        _init_conv(self.gate_conv)

    def project(self, diff: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(diff)))

    def gate(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.relu(self.gate_bn(self.gate_conv(pooled)))


class MFD(nn.Module):
    """Temporal differencing, per-scale projection, temporal pooling, adaptive fusion."""

    def __init__(self, c1: int, out_features: int, k: int = 5) -> None:
        super().__init__()
        self.k = k
        width = 8 * c1
        self.width = width
        self.scales = nn.ModuleList(
            ScaleProjection(c1 * 2**i, width, 2 ** (3 - i)) for i in range(4)
        )
        self.gate_mix = nn.Conv2d(4 * GATE_WIDTH, 4, 1)
        self.fuse_conv = nn.Conv2d(width, out_features, 1)
        self.fuse_bn = nn.BatchNorm1d(out_features)
        _init_conv(self.gate_mix)
        _init_conv(self.fuse_conv)

    def project(self, prev_maps: list[torch.Tensor], next_maps: list[torch.Tensor]) -> torch.Tensor:
        """Projected differences for P frame pairs -> (P, 4, 8*C1, 7, 7).

        A pair's result depends only on its two frames, so a sliding-window caller
        can compute it once per pair and reuse it across windows.
        """
        out = [s.project(b - a) for s, a, b in zip(self.scales, prev_maps, next_maps)]
        return torch.stack(out, dim=1)

    def temporal_pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T-1, C, 7, 7) differences -> (B, T, C, 7, 7), one pooled map per frame.

        Window j = t-k .. t+k-1 with zero padding and a fixed divisor 2k, as the
        reference's AvgPool3d (count_include_pad) does; the paper instead repeats
        border frames (spec §2.3, §9.1 #4).
        """
        k = self.k
        # The sum of 2k shifted slices, in the order AvgPool3d((2k, 1, 1), padding k) adds
        # them, so the result is the same to the bit; torch's 3-D pooling kernel took
        # 5-8x longer on CPU (inference runs this once per window).
        padded = F.pad(x, (0, 0, 0, 0, 0, 0, k, k))  # zeros before and after in time
        frames = x.shape[1] + 1
        total = padded[:, :frames].clone()
        for j in range(1, 2 * k):
            total += padded[:, j : j + frames]
        return total / (2 * k)

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """motion (B, T-1, 4, C, 7, 7) -> X_dyn (B*T, 49, out_features), clip-major rows."""
        B, P = motion.shape[:2]
        T = P + 1
        pooled = [self.temporal_pool(motion[:, :, i]).flatten(0, 1) for i in range(4)]  # (BT, C, 7, 7)
        gates = torch.cat([s.gate(p) for s, p in zip(self.scales, pooled)], dim=1)  # (BT, 64, 7, 7)
        weights = torch.softmax(self.gate_mix(gates), dim=1)  # (BT, 4, 7, 7), softmax over scales
        fused = sum(weights[:, i : i + 1] * pooled[i] for i in range(4))
        x = self.fuse_conv(fused).flatten(2)  # (BT, d, 49)
        x = F.relu(self.fuse_bn(x))
        assert x.shape[0] == B * T
        return x.transpose(1, 2)
