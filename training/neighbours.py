"""The terms added to the VAE's scores: how far a record lies from the nearest training records,
and how rare its values are column by column (training/tails.py).

A VAE's likelihood misses records that sit between the modes it learned, in a region no
training record comes near; the distance to the nearest training record (KNN, the strongest
single peer in bench/quality.py) sees them. Two distances, both inside the ONNX graph: in the
input space (scaled numerics *without* the encoder's clamp, missing indicators, one-hot
categories: the clamp that keeps the encoder sane would hide how far out an extreme value is)
and between posterior means. Each term is put in the units of a score by the ratio of their
median absolute deviations on validation records, times its weight, so adding them keeps the
score's scale and calibration works unchanged.

Both distances are to the NEAREST (2) bank records, averaged: a record beside a lone stray
training record is not "at distance 0" (bench/results/quality.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from training.tails import MarginalTail

if TYPE_CHECKING:
    from training.model import ScoringGraph

CANDIDATES = 8  # bank rows whose exact distance is taken (ranked by the fast, blurred one)
# the distances are averaged over this many nearest bank records: 2 and 3 beat 1 and 5 on the
# dev sets (bench/results/quality.md)
NEAREST = 2


def nearest(q: Tensor, bank: Tensor, k: int) -> Tensor:
    """Euclidean distances from each row of ``q`` to its ``k`` nearest rows of ``bank``,
    ``[N, k]``, nearest first.

    The expanded square ranks the bank with one matrix product, but float32 cancellation
    blurs it (and would make a record's distance to itself sqrt(eps), not 0): so the exact
    distance, from the differences themselves, is taken to the few best-ranked rows."""
    d2 = (bank * bank).sum(1).unsqueeze(0) - 2.0 * q @ bank.T
    idx = torch.topk(d2, min(CANDIDATES, bank.shape[0]), dim=1, largest=False).indices
    diff = q.unsqueeze(1) - bank[idx]  # [N, CANDIDATES, D]
    d2_exact = (diff * diff).sum(2)
    return torch.sqrt(torch.topk(d2_exact, min(k, idx.shape[1]), dim=1, largest=False).values)


def near(q: Tensor, bank: Tensor) -> Tensor:
    """Mean distance from each row of ``q`` to its NEAREST rows of ``bank``, ``[N]``."""
    return nearest(q, bank, NEAREST).mean(1)


# a term's spread is at least this share of its mean absolute deviation: where most records
# tie (duplicates at distance ~0), the median absolute deviation is tiny, and dividing by it
# would magnify float noise (onnxruntime vs torch) a hundredfold
SPREAD_FLOOR = 0.5


def spread(x: Tensor) -> Tensor:
    """Median absolute deviation, at least SPREAD_FLOOR x the mean absolute deviation."""
    dev = torch.abs(x - torch.median(x))
    return torch.maximum(torch.median(dev), SPREAD_FLOOR * dev.mean())


def ranks(x: Tensor) -> Tensor:
    """Each value's rank among ``x`` (0-based), tied values sharing their mean rank."""
    x = x.contiguous()
    srt = torch.sort(x).values
    below = torch.searchsorted(srt, x, right=False)
    up_to = torch.searchsorted(srt, x, right=True)
    return (below + up_to - 1).to(x.dtype) / 2


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's rho of ``a`` and ``b`` (0 if either is constant)."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    return (ra * rb).sum() / norm if norm > 0 else torch.zeros((), dtype=a.dtype)


# the tail term is weighed by how far it agrees with the score on the validation records
# (Spearman's rho, none if it disagrees): where marginal rarity runs against the likelihood
# on normal records (fault, satellite: rho <= 0.04) it ranks them by something the model
# rightly finds normal, and only costs; where it agrees (0.25-0.9) it is worth more than a
# fixed weight gives it (bench/results/quality.md, round six)
TAIL = 2


class NeighbourTerm(nn.Module):
    """``weight[i] @ (d_input, d_latent, tail)`` for score type ``i``, in that score's units."""

    bank_in: Tensor
    bank_mu: Tensor
    weight: Tensor

    def __init__(
        self, bank_in: Tensor, bank_mu: Tensor, n_scores: int, tail: MarginalTail | None
    ) -> None:
        super().__init__()
        self.register_buffer("bank_in", bank_in)
        self.register_buffer("bank_mu", bank_mu)
        self.tail = tail
        self.register_buffer("weight", torch.zeros(n_scores, 3 if tail is not None else 2))

    def parts(self, space: Tensor, mu: Tensor, n_num: int) -> Tensor:
        """``[N, 2 or 3]``: to the nearest bank records in input space and in latent space,
        and the marginal tail term of the ``n_num`` scaled numerics that lead ``space``."""
        cols = [near(space, self.bank_in), near(mu, self.bank_mu)]
        if self.tail is not None:
            cols.append(self.tail(space[:, :n_num]))
        return torch.stack(cols, 1)

    def forward(self, space: Tensor, mu: Tensor, n_num: int) -> Tensor:
        """``[N, n_scores]``: the term to add to each score."""
        return self.parts(space, mu, n_num) @ self.weight.T

    def fit_weights(self, scores: Tensor, parts: Tensor, strengths: list[float]) -> None:
        """Set the weights from validation records: ``scores [N, n_scores]`` (without the
        terms) and their ``parts``. Part j gets ``strengths[j]`` times the score's spread over
        its own (the tail, times its rank correlation with the score if positive); a part with
        no spread (all records alike) gets none."""
        p_spread = torch.stack([spread(parts[:, j]) for j in range(parts.shape[1])])
        strength = torch.tensor(strengths[: parts.shape[1]], dtype=parts.dtype)
        for i in range(scores.shape[1]):
            ratio = spread(scores[:, i]) / torch.clamp(p_spread, min=1e-12)
            weight = torch.where(p_spread > 1e-12, strength * ratio, 0.0)
            if parts.shape[1] > TAIL:
                agree = rank_correlation(scores[:, i], parts[:, TAIL])
                weight[TAIL] = weight[TAIL] * torch.clamp(agree, min=0.0)
            self.weight[i] = weight


def attach(
    graph: ScoringGraph,
    bank: tuple[Tensor | None, Tensor | None],
    val: tuple[Tensor | None, Tensor | None],
    strengths: tuple[float, float, float],
) -> None:
    """Give ``graph`` the terms over the ``bank`` records (training records, never the
    validation or calibration ones), weighted on the ``val`` records: ``strengths`` of the
    input distance, the latent distance and the tail term (0: no tail term)."""
    n_num = graph.pre.layout.n_num
    with torch.no_grad():
        space, mu = graph.inputs_and_means(*bank)
        tail = MarginalTail(space[:, :n_num]) if strengths[2] > 0 and n_num else None
        term = NeighbourTerm(space, mu, 3, tail)
        elbo, recon, iwae, _, v_space, v_mu = graph.model_scores(*val)
        scores = torch.stack([elbo, recon, iwae], 1)
        term.fit_weights(scores, term.parts(v_space, v_mu, n_num), list(strengths))
    graph.neighbours = term
