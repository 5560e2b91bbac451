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

Both distances are *local*: the mean distance to the NEAREST bank records, divided by a power of
how far apart the bank records around them lie (their own mean distance to their NEAREST
others). A step out of a sparse region of normal records (the tail of a wide cluster) says less
than the same step out of a dense one, as LOF says; the small power keeps most of the plain
distance, which carried most of the gain on the dev sets (bench/results/quality.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from training.tails import MarginalTail

if TYPE_CHECKING:
    from training.model import ScoringGraph

CANDIDATES = 8  # bank rows whose exact distance is taken (ranked by the fast, blurred one)
# a local distance: the mean over this many nearest bank records (2 and 3 beat 1 and 5 on the
# dev sets), divided by the bank's spacing there to this power (0.25 kept the plain distance's
# gains and added some; 1, plain LOF, lost 0.015 of mean ROC-AUC), the spacing floored at this
# share of its median on validation records (two duplicates are 0 apart: a ratio must not blow
# up on them)
NEAREST, DENSITY_POWER, SPACING_FLOOR = 2, 0.25, 0.1
CHUNK = 1024  # bank rows per step when the bank measures its own spacing (memory: CHUNK x bank)


def nearest(q: Tensor, bank: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """Euclidean distances from each row of ``q`` to its ``k`` nearest rows of ``bank``, and
    their indices, ``[N, k]`` each, nearest first.

    The expanded square ranks the bank with one matrix product, but float32 cancellation
    blurs it (and would make a record's distance to itself sqrt(eps), not 0): so the exact
    distance, from the differences themselves, is taken to the few best-ranked rows."""
    d2 = (bank * bank).sum(1).unsqueeze(0) - 2.0 * q @ bank.T
    idx = torch.topk(d2, min(CANDIDATES, bank.shape[0]), dim=1, largest=False).indices
    diff = q.unsqueeze(1) - bank[idx]  # [N, CANDIDATES, D]
    best = torch.topk((diff * diff).sum(2), min(k, idx.shape[1]), dim=1, largest=False)
    return torch.sqrt(best.values), torch.gather(idx, 1, best.indices)


def spacing(bank: Tensor) -> Tensor:
    """Each bank record's mean distance to its NEAREST other bank records, ``[B]``."""
    if bank.shape[0] < 2:
        return torch.zeros(bank.shape[0], dtype=bank.dtype)
    out = [
        nearest(bank[i : i + CHUNK], bank, NEAREST + 1)[0][:, 1:].mean(1)  # [:, 0]: itself
        for i in range(0, bank.shape[0], CHUNK)
    ]
    return torch.cat(out)


# a term's spread is at least this share of its mean absolute deviation: where most records
# tie (duplicates at distance ~0), the median absolute deviation is tiny, and dividing by it
# would magnify float noise (onnxruntime vs torch) a hundredfold
SPREAD_FLOOR = 0.5


def spread(x: Tensor) -> Tensor:
    """Median absolute deviation, at least SPREAD_FLOOR x the mean absolute deviation."""
    dev = torch.abs(x - torch.median(x))
    return torch.maximum(torch.median(dev), SPREAD_FLOOR * dev.mean())


class LocalDistance(nn.Module):
    """``[N, D]`` -> ``[N]``: the mean distance to the NEAREST bank records over a power of the
    bank's spacing around them (floored: see SPACING_FLOOR)."""

    bank: Tensor
    spacing: Tensor
    floor: Tensor

    def __init__(self, bank: Tensor) -> None:
        super().__init__()
        self.register_buffer("bank", bank)
        self.register_buffer("spacing", spacing(bank))
        self.register_buffer("floor", torch.tensor(1e-6))

    def near(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Mean distance to the NEAREST bank records, and their mean spacing."""
        dist, idx = nearest(q, self.bank, NEAREST)
        return dist.mean(1), self.spacing[idx].mean(1)

    def fit_floor(self, val: Tensor) -> None:
        """The floor from validation records: SPACING_FLOOR of their typical spacing."""
        typical = float(self.near(val)[1].median())
        self.floor.fill_(max(SPACING_FLOOR * typical, 1e-6))

    def forward(self, q: Tensor) -> Tensor:
        dist, around = self.near(q)
        return dist / torch.pow(around + self.floor, DENSITY_POWER)


class NeighbourTerm(nn.Module):
    """``weight[i] @ (d_input, d_latent, tail)`` for score type ``i``, in that score's units."""

    weight: Tensor

    def __init__(
        self, bank_in: Tensor, bank_mu: Tensor, n_scores: int, tail: MarginalTail | None
    ) -> None:
        super().__init__()
        self.d_in = LocalDistance(bank_in)
        self.d_mu = LocalDistance(bank_mu)
        self.tail = tail
        self.register_buffer("weight", torch.zeros(n_scores, 3 if tail is not None else 2))

    def parts(self, space: Tensor, mu: Tensor, n_num: int) -> Tensor:
        """``[N, 2 or 3]``: the local distances in input space and between posterior means,
        and the marginal tail term of the ``n_num`` scaled numerics that lead ``space``."""
        cols = [self.d_in(space), self.d_mu(mu)]
        if self.tail is not None:
            cols.append(self.tail(space[:, :n_num]))
        return torch.stack(cols, 1)

    def forward(self, space: Tensor, mu: Tensor, n_num: int) -> Tensor:
        """``[N, n_scores]``: the term to add to each score."""
        return self.parts(space, mu, n_num) @ self.weight.T

    def fit_weights(self, scores: Tensor, parts: Tensor, strengths: list[float]) -> None:
        """Set the weights from validation records: ``scores [N, n_scores]`` (without the
        terms) and their ``parts``. Part j gets ``strengths[j]`` times the score's spread over
        its own; a part with no spread (all records alike) gets none."""
        p_spread = torch.stack([spread(parts[:, j]) for j in range(parts.shape[1])])
        strength = torch.tensor(strengths[: parts.shape[1]], dtype=parts.dtype)
        for i in range(scores.shape[1]):
            ratio = spread(scores[:, i]) / torch.clamp(p_spread, min=1e-12)
            self.weight[i] = torch.where(p_spread > 1e-12, strength * ratio, 0.0)


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
        term.d_in.fit_floor(v_space)
        term.d_mu.fit_floor(v_mu)
        scores = torch.stack([elbo, recon, iwae], 1)
        term.fit_weights(scores, term.parts(v_space, v_mu, n_num), list(strengths))
    graph.neighbours = term
