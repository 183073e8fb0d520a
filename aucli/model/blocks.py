"""Small building blocks shared by the static path and HSR."""

from __future__ import annotations

import math

import torch
from torch import nn


class LinearBlock(nn.Module):
    """Linear, then BatchNorm over the feature axis, then ReLU (spec §2.6).

    Input (M, L, C_in) -> (M, L, C_out); BN statistics run over all M*L tokens.
    The reference's Dropout(p=0) is a no-op and is left out.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.bn = nn.BatchNorm1d(out_features)
        self.relu = nn.ReLU(inplace=True)
        nn.init.normal_(self.fc.weight, 0.0, math.sqrt(2.0 / out_features))  # spec §6.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)  # (M, L, C)
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return self.relu(x)
