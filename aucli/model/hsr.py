"""HSR: AU features per facial region, auxiliary regional classifiers and the
cross-regional graph attention (spec §3). Everything dataset-specific comes
from the AU set table (aucli/aus.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..aus import AUSet
from .blocks import LinearBlock

GRID = 7  # the token map is 7x7, row-major (spec §0)
EDGE_THRESHOLD = 0.1  # the reference GAT keeps edges where A >= 0.1 (spec §3.7)


class GraphAttention(nn.Module):
    """One-head GAT over the AU nodes with identity residual, bias and ELU (spec §3.7).

    ``score_receiver`` scores the node being updated (row i) and ``score_neighbour``
    the node sending the message (column j); the reference names these
    ``scoring_fn_source`` and ``scoring_fn_target``, the reverse of the message
    direction (spec §9.2).
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(features, features, bias=False)
        self.score_receiver = nn.Parameter(torch.empty(1, 1, features))
        self.score_neighbour = nn.Parameter(torch.empty(1, 1, features))
        self.bias = nn.Parameter(torch.zeros(features))
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.xavier_uniform_(self.score_receiver)
        nn.init.xavier_uniform_(self.score_neighbour)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """x (M, N, d), adjacency (M, N, N) with self-loops -> (M, N, d)."""
        h = self.proj(x)
        s = (h * self.score_receiver).sum(-1)  # (M, N) receivers
        u = (h * self.score_neighbour).sum(-1)  # (M, N) neighbours
        e = F.leaky_relu(s.unsqueeze(2) + u.unsqueeze(1), 0.2)  # e[m, i, j]
        e = e.masked_fill(adjacency < EDGE_THRESHOLD, float("-inf"))
        alpha = torch.softmax(e, dim=-1)  # each receiver's row sums to 1
        return F.elu(alpha @ h + x + self.bias)


class HSR(nn.Module):
    """Local (per-region) and cross-regional AU relationship modelling."""

    def __init__(self, au_set: AUSet, features: int) -> None:
        super().__init__()
        self.au_set = au_set
        names = au_set.branch_names
        if au_set.branch_blocks:
            self.region_blocks = nn.ModuleDict({n: LinearBlock(features, features) for n in names})
        self.aux_heads = nn.ModuleDict(
            {b.name: nn.Linear(features, b.num_classes) for b in au_set.branches}
        )
        self.au_extractors = nn.ModuleList(
            LinearBlock(features, features) for _ in range(au_set.num_aus)
        )
        self.gat = GraphAttention(features)
        self.register_buffer("adjacency", torch.from_numpy(au_set.adjacency), persistent=False)
        self.register_buffer(
            "branch_of_au", torch.from_numpy(au_set.branch_index), persistent=False
        )
        for b, idx in enumerate(au_set.bit_positions):
            n = len(idx)
            self.register_buffer(f"_bits_{b}", torch.from_numpy(idx), persistent=False)
            self.register_buffer(
                f"_shifts_{b}", torch.arange(n - 1, -1, -1, dtype=torch.long), persistent=False
            )

    def regions(self, g: torch.Tensor) -> list[torch.Tensor]:
        """G (M, 49, d) -> one (M, 21, d) token sequence per branch."""
        grid = g.view(g.shape[0], GRID, GRID, g.shape[-1])
        out = []
        for b in self.au_set.branches:
            r0, r1 = b.rows
            tokens = grid[:, r0:r1].flatten(1, 2)
            if self.au_set.branch_blocks:
                tokens = self.region_blocks[b.name](tokens)
            out.append(tokens)
        return out

    def activation_mask(self, aux: list[torch.Tensor]) -> torch.Tensor:
        """Argmax of each branch's logits, decoded MSB-first into AU order (spec §3.6)."""
        m = aux[0].new_zeros(aux[0].shape[0], self.au_set.num_aus)
        for b, logits in enumerate(aux):
            cls = logits.detach().argmax(-1, keepdim=True)  # (M, 1)
            bits = (cls >> getattr(self, f"_shifts_{b}")) & 1  # (M, n_bits)
            m[:, getattr(self, f"_bits_{b}")] = bits.to(m.dtype)
        return m

    def forward(self, g: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """G (M, 49, d) -> AU node features (M, N, d) and aux logits per branch."""
        regions = self.regions(g)
        aux = [self.aux_heads[b.name](r.mean(1)) for b, r in zip(self.au_set.branches, regions)]
        nodes = torch.stack(
            [
                ext(regions[int(b)]).mean(1)
                for ext, b in zip(self.au_extractors, self.au_set.branch_index)
            ],
            dim=1,
        )
        mask = self.activation_mask(aux)  # (M, N), detached
        # A[i, j] = ADJ[i, j] * m[j] + delta_ij: column j is gated by its own activation.
        eye = torch.eye(self.au_set.num_aus, device=g.device, dtype=nodes.dtype)
        adjacency = self.adjacency.to(nodes.dtype) * mask.unsqueeze(1) + eye
        return self.gat(nodes, adjacency), aux
