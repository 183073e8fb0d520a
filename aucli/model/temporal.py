"""Per-AU temporal convolution and the similarity classifier (spec §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TCN_KERNEL = 5


class TemporalConv(nn.Module):
    """A depthwise Conv1d over time for each AU, then BN over the AU axis and ReLU (spec §4.1)."""

    def __init__(self, num_aus: int, features: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(features, features, TCN_KERNEL, padding=TCN_KERNEL // 2, groups=features)
            for _ in range(num_aus)
        )
        self.bn = nn.BatchNorm1d(num_aus)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, N, d) -> (B*T, N, d), clip-major rows."""
        B, T, N, d = x.shape
        per_au = [conv(x[:, :, n].transpose(1, 2)).transpose(1, 2) for n, conv in enumerate(self.convs)]
        y = torch.stack(per_au, dim=2).reshape(B * T, N, d)
        return F.relu(self.bn(y))


class SimilarityClassifier(nn.Module):
    """Cosine similarity with a learned non-negative vector per AU; output in [0, 1], no sigmoid (spec §4.2)."""

    def __init__(self, num_aus: int, features: int) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.empty(num_aus, features))
        nn.init.xavier_uniform_(self.prototypes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, N, d) -> probabilities (M, N)."""
        s = F.normalize(F.relu(self.prototypes), dim=-1, eps=1e-12)
        y = F.normalize(x, dim=-1, eps=1e-12)
        return (y * s).sum(-1)
