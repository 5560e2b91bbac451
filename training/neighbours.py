"""The neighbour term of the scores: how far a record lies from the nearest training records.

A VAE's likelihood misses records that sit between the modes it learned, in a region no
training record comes near; the distance to the nearest training record (KNN, the strongest
single peer in bench/quality.py) sees them. Two distances, both inside the ONNX graph: in the
encoder's input space (scaled numerics, missing indicators, one-hot categories) and between
posterior means. Each is converted to the units of a score by the ratio of their spreads on
validation records, so adding them keeps the score's scale and calibration works unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from training.model import ScoringGraph

CANDIDATES = 8  # bank rows whose exact distance is taken (ranked by the fast, blurred one)


def nearest_distance(q: Tensor, bank: Tensor) -> Tensor:
    """Euclidean distance from each row of ``q`` to its nearest row of ``bank``, ``[N]``.

    The expanded square ranks the bank with one matrix product, but float32 cancellation
    blurs it (and would make a record's distance to itself sqrt(eps), not 0): so the exact
    distance, from the differences themselves, is taken to the few best-ranked rows."""
    d2 = (bank * bank).sum(1).unsqueeze(0) - 2.0 * q @ bank.T
    k = min(CANDIDATES, bank.shape[0])
    idx = torch.topk(d2, k, dim=1, largest=False).indices  # [N, k]
    diff = q.unsqueeze(1) - bank[idx]  # [N, k, D]
    return torch.sqrt((diff * diff).sum(2).min(1).values)


def spread(x: Tensor) -> Tensor:
    """Interquartile range."""
    return torch.quantile(x, 0.75) - torch.quantile(x, 0.25)


class NeighbourTerm(nn.Module):
    """``weight[i] * (d_input + d_latent)`` for score type ``i``, in that score's units."""

    bank_in: Tensor
    bank_mu: Tensor
    weight: Tensor

    def __init__(self, bank_in: Tensor, bank_mu: Tensor, n_scores: int) -> None:
        super().__init__()
        self.register_buffer("bank_in", bank_in)
        self.register_buffer("bank_mu", bank_mu)
        self.register_buffer("weight", torch.zeros(n_scores, 2))

    def distances(self, enc_in: Tensor, mu: Tensor) -> Tensor:
        """``[N, 2]``: to the nearest bank record in input space and in latent space."""
        return torch.stack(
            [nearest_distance(enc_in, self.bank_in), nearest_distance(mu, self.bank_mu)], 1
        )

    def forward(self, enc_in: Tensor, mu: Tensor) -> Tensor:
        """``[N, n_scores]``: the term to add to each score."""
        return self.distances(enc_in, mu) @ self.weight.T

    def fit_weights(self, scores: Tensor, dist: Tensor, strength: float) -> None:
        """Set the weights from validation records: ``scores [N, n_scores]`` (without the
        term) and ``dist [N, 2]``. Each distance gets ``strength / 2`` times the score's spread
        over its own; a distance with no spread (all records alike) gets none."""
        d_spread = torch.stack([spread(dist[:, j]) for j in range(dist.shape[1])])
        for i in range(scores.shape[1]):
            ratio = spread(scores[:, i]) / torch.clamp(d_spread, min=1e-12)
            self.weight[i] = torch.where(d_spread > 1e-12, 0.5 * strength * ratio, 0.0)


def attach(
    graph: ScoringGraph,
    bank: tuple[Tensor | None, Tensor | None],
    val: tuple[Tensor | None, Tensor | None],
    strength: float,
) -> None:
    """Give ``graph`` a neighbour term over the ``bank`` records (training records, never the
    validation or calibration ones), weighted on the ``val`` records."""
    with torch.no_grad():
        enc_in, _, _ = graph.pre(*bank)
        mu, _ = graph.vae.encode(enc_in)
        term = NeighbourTerm(enc_in, mu, 3)
        elbo, recon, iwae, _, v_in, v_mu = graph.model_scores(*val)
        term.fit_weights(torch.stack([elbo, recon, iwae], 1), term.distances(v_in, v_mu), strength)
    graph.neighbours = term
