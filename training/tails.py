"""The marginal tail term of the scores: how rare each of a record's values is on its own.

A likelihood and a nearest-neighbour distance both judge a record as a whole; a value in the
far tail of its own column (a mammogram's calcification size, a heart rate) can hide among
many ordinary columns. Per numeric feature, the rarer-side empirical tail probability of the
value against a grid of training quantiles (as ECOD does), its negative log summed over the
features: batch-wide comparisons inside the ONNX graph, no sorting or search.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# quantiles kept per feature: tails resolved down to 1/(GRID + 1); 64 or the whole 2048-record
# bank changed the dev sets' mean ROC-AUC by < 0.001 (bench/results/quality.md), and the
# comparisons cost N x features x GRID
GRID = 32
# a value within this (relative) distance of a grid quantile counts as equal to it: discrete
# columns put many quantiles on the same value, and onnxruntime's preprocessing (log1p, the
# scaling) differs from torch's by up to ~5e-5 (2_annthyroid): that must not move a record
# across them
TIE = 1e-3


class MarginalTail(nn.Module):
    """``[N, D]`` scaled numerics -> ``[N]``: sum over features of -log P(rarer side)."""

    grid: Tensor

    def __init__(self, train: Tensor) -> None:
        """``train``: the training records' scaled numerics, ``[n, D]``."""
        super().__init__()
        probs = (torch.arange(GRID, dtype=train.dtype) + 0.5) / GRID
        self.register_buffer("grid", torch.quantile(train, probs, dim=0).T.contiguous())

    def forward(self, s: Tensor) -> Tensor:
        x = s.unsqueeze(2)  # [N, D, 1] against [1, D, GRID]
        tie = TIE * (1.0 + torch.abs(x))
        grid = self.grid.unsqueeze(0)
        at_most = (grid <= x + tie).to(s.dtype).sum(2)
        at_least = (grid >= x - tie).to(s.dtype).sum(2)
        rarer = (torch.minimum(at_most, at_least) + 1.0) / (GRID + 1.0)
        return -torch.log(rarer).sum(1)
