"""The VAE and its scoring graph: torch modules only, no files and no I/O.

Input layout (see service/bundle.py): ``x_num`` float ``[N, n_real + n_bool]`` (real-valued
columns first, then 0/1 columns; NaN = missing) and ``x_cat`` int64 ``[N, n_cat]``. The per-feature
negative log-likelihood has one column per feature in that same order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.neighbours import NeighbourTerm

LOG_2PI = math.log(2 * math.pi)
CLAMP = 1e4  # scaled numerics are clamped here so squares stay finite in float32
# The encoder sees scaled numerics clamped much closer: a wild value (10,000 where training saw
# 1-9, or beyond float32) would otherwise throw the latent code far out, the KL term (which
# no feature is credited with) would make the score, and the decoder's guesses from there
# would name the wrong features. Clamped, the value's own likelihood makes the score, and the
# attribution names it. Normal records lie well inside (robust units: ~1.35 per IQR).
ENCODER_CLAMP = 8.0
# the encoder's log-variance: a std within [0.0025, 55], so exp() stays finite in float32 and a
# posterior never collapses to a point
LOGVAR_MIN, LOGVAR_MAX = -12.0, 8.0
# the least total excess NLL attribution divides by (see ScoringGraph.floor)
ATTRIBUTION_FLOOR = 0.01


@dataclass
class Layout:
    """What the graph needs to know of the features (fitted on training data)."""

    center: list[float]  # per real column, in transformed units
    scale: list[float]
    log: list[bool]  # signed log1p before scaling
    bool_rate: list[float]  # per boolean column: imputed value for a missing entry
    nullable: list[bool]  # per x_num column (real then boolean): has a missing indicator
    cat_sizes: list[int]  # per categorical: vocabulary size including the reserved slots

    @property
    def n_real(self) -> int:
        return len(self.center)

    @property
    def n_bool(self) -> int:
        return len(self.bool_rate)

    @property
    def n_num(self) -> int:
        return self.n_real + self.n_bool

    @property
    def n_null(self) -> int:
        return sum(self.nullable)

    @property
    def n_features(self) -> int:
        return self.n_num + len(self.cat_sizes)

    @property
    def in_dim(self) -> int:
        return self.n_num + self.n_null + sum(self.cat_sizes)

    @property
    def out_dim(self) -> int:
        return 2 * self.n_real + self.n_bool + self.n_null + sum(self.cat_sizes)


class Preprocess(nn.Module):
    """Raw inputs -> (encoder input, scaled numerics with missing imputed, missing mask)."""

    center: Tensor
    scale: Tensor
    log: Tensor
    impute: Tensor
    null_idx: Tensor

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self.layout = layout
        n_real = layout.n_real
        self.register_buffer("center", torch.tensor(layout.center + [0.0] * layout.n_bool))
        self.register_buffer("scale", torch.tensor(layout.scale + [1.0] * layout.n_bool))
        self.register_buffer("log", torch.tensor(layout.log + [False] * layout.n_bool))
        # a missing entry becomes the median (0 once scaled) or the boolean's training rate
        self.register_buffer("impute", torch.tensor([0.0] * n_real + layout.bool_rate))
        self.register_buffer(
            "null_idx",
            torch.tensor([i for i, n in enumerate(layout.nullable) if n], dtype=torch.long),
        )
        for j, k in enumerate(layout.cat_sizes):
            self.register_buffer(f"eye{j}", torch.eye(k))

    def forward(self, x_num: Tensor | None, x_cat: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        parts = []
        s = miss = torch.zeros(0)
        if x_num is not None:
            miss = torch.isnan(x_num)
            x = torch.where(miss, torch.zeros_like(x_num), x_num)
            t = torch.where(self.log, torch.sign(x) * torch.log1p(torch.abs(x)), x)
            s = torch.clamp((t - self.center) / self.scale, -CLAMP, CLAMP)
            s = torch.where(miss, self.impute.expand_as(s), s)
            miss = miss.to(s.dtype)
            parts += [s.clamp(-ENCODER_CLAMP, ENCODER_CLAMP), miss.index_select(1, self.null_idx)]
        if x_cat is not None:
            for j, k in enumerate(self.layout.cat_sizes):
                idx = torch.clamp(x_cat[:, j], 0, k - 1)
                parts.append(getattr(self, f"eye{j}")[idx])
        return torch.cat(parts, dim=1), s, miss


def softplus(x: Tensor) -> Tensor:
    """log(1 + e^x), written out so that the exported graph is stable for large |x| too."""
    return F.relu(x) + torch.log1p(torch.exp(-torch.abs(x)))


def bce_logits(logit: Tensor, y: Tensor) -> Tensor:
    """Bernoulli negative log-likelihood of y in {0, 1} given a logit (stable form)."""
    return softplus(logit) - y * logit


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """MLP encoder -> (mu, log sigma^2); MLP decoder -> a likelihood's parameters per feature."""

    null_idx: Tensor

    def __init__(self, layout: Layout, hidden: list[int], latent: int, min_std: float) -> None:
        super().__init__()
        self.layout = layout
        self.latent = latent
        self.encoder = mlp([layout.in_dim, *hidden, 2 * latent])
        self.decoder = mlp([latent, *reversed(hidden), layout.out_dim])
        # decoder log-variance = lo + softplus(raw + c): bounded below by min_std, 0 at raw = 0
        self.lv_lo = 2 * math.log(min_std)
        self.lv_c = math.log(math.expm1(-self.lv_lo))
        self.register_buffer(
            "null_idx",
            torch.tensor([i for i, n in enumerate(layout.nullable) if n], dtype=torch.long),
        )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, lv = self.encoder(x).chunk(2, dim=-1)
        return mu, torch.clamp(lv, LOGVAR_MIN, LOGVAR_MAX)

    def feature_nll(self, out: Tensor, s: Tensor, miss: Tensor, x_cat: Tensor | None) -> Tensor:
        """Negative log-likelihood of each feature, ``[B, n_features]``, from decoder output."""
        L = self.layout
        parts = []
        o = 0
        if L.n_num:
            mu, raw = out[:, o : o + L.n_real], out[:, o + L.n_real : o + 2 * L.n_real]
            o += 2 * L.n_real
            lv = self.lv_lo + softplus(raw + self.lv_c)
            real = s[:, : L.n_real]
            gauss = 0.5 * (LOG_2PI + lv + (real - mu) ** 2 * torch.exp(-lv))
            logit = out[:, o : o + L.n_bool]
            o += L.n_bool
            bern = bce_logits(logit, s[:, L.n_real :])
            present = 1.0 - miss
            nll_num = torch.cat([gauss, bern], dim=1) * present
            if L.n_null:
                miss_logit = out[:, o : o + L.n_null]
                o += L.n_null
                m = miss.index_select(1, self.null_idx)
                miss_nll = bce_logits(miss_logit, m)
                # add each indicator's NLL to its own column
                nll_num = nll_num.index_add(1, self.null_idx, miss_nll)
            parts.append(nll_num)
        if x_cat is not None:
            for j, k in enumerate(L.cat_sizes):
                logp = F.log_softmax(out[:, o : o + k], dim=1)
                o += k
                idx = torch.clamp(x_cat[:, j : j + 1], 0, k - 1)
                parts.append(-logp.gather(1, idx))
        return torch.cat(parts, dim=1)


def kl_normal(mu: Tensor, lv: Tensor) -> Tensor:
    """KL(N(mu, exp(lv)) || N(0, I)) summed over the last axis."""
    return 0.5 * (mu**2 + torch.exp(lv) - 1.0 - lv).sum(-1)


class ScoringGraph(nn.Module):
    """The whole scoring computation, exported to ONNX as one graph.

    Sampling uses a fixed noise tensor ``eps [L, latent]`` so a record always gets the same
    scores. Returns ``elbo`` (negative ELBO), ``recon`` (negative reconstruction log-likelihood
    averaged over the L samples), ``iwae`` (importance-weighted estimate of -log p(x)), and
    ``attribution``: each feature's share of the NLL in excess of its median on normal data.
    With ``neighbours``, each score also gets the neighbour and tail terms
    (training/neighbours.py).
    """

    eps: Tensor
    baseline: Tensor
    floor: Tensor

    def __init__(
        self,
        pre: Preprocess,
        vae: VAE,
        eps: Tensor,
        baseline: Tensor,
        neighbours: NeighbourTerm | None = None,
    ) -> None:
        super().__init__()
        self.pre = pre
        self.vae = vae
        self.neighbours = neighbours
        self.register_buffer("eps", eps)
        self.register_buffer("baseline", baseline)
        # attribution divides by at least this much excess, so the features of a record that is
        # no more unusual than a typical normal one get small shares, not a normalized 100%
        self.register_buffer("floor", torch.tensor(ATTRIBUTION_FLOOR))
        self.has_num = pre.layout.n_num > 0
        self.has_cat = len(pre.layout.cat_sizes) > 0

    def inputs_and_means(self, x_num: Tensor | None, x_cat: Tensor | None) -> tuple[Tensor, Tensor]:
        """The records in input space (see :meth:`space`) and their posterior means."""
        enc_in, s, _ = self.pre(x_num, x_cat)
        return self.space(enc_in, s), self.vae.encode(enc_in)[0]

    def space(self, enc_in: Tensor, s: Tensor) -> Tensor:
        """The encoder's input with the scaled numerics unclamped: where the neighbour term
        measures distances (an extreme value stays as far out as it is)."""
        n_num = self.pre.layout.n_num
        return torch.cat([s, enc_in[:, n_num:]], 1) if self.has_num else enc_in

    def per_sample_nll(
        self, x_num: Tensor | None, x_cat: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Feature NLL per sample ``[N, L, F]``, with mu, logvar, z ``[N, L, d]`` and the
        records in input space."""
        enc_in, s, miss = self.pre(x_num, x_cat)
        space = self.space(enc_in, s)
        mu, lv = self.vae.encode(enc_in)
        n, (n_samples, d) = mu.shape[0], self.eps.shape
        z = mu.unsqueeze(1) + torch.exp(0.5 * lv).unsqueeze(1) * self.eps.unsqueeze(0)
        out = self.vae.decoder(z.reshape(-1, d))

        def rep(t: Tensor) -> Tensor:
            return t.unsqueeze(1).expand(n, n_samples, t.shape[1]).reshape(n * n_samples, -1)

        xc = rep(x_cat) if x_cat is not None else None
        if x_num is not None:
            s, miss = rep(s), rep(miss)
        nll = self.vae.feature_nll(out, s, miss, xc).reshape(n, n_samples, -1)
        return nll, mu, lv, z, space

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        it = iter(inputs)
        x_num = next(it) if self.has_num else None
        x_cat = next(it) if self.has_cat else None
        elbo, recon, iwae, attribution, space, mu = self.model_scores(x_num, x_cat)
        if self.neighbours is None:
            return elbo, recon, iwae, attribution
        term = self.neighbours(space, mu, self.pre.layout.n_num)
        return elbo + term[:, 0], recon + term[:, 1], iwae + term[:, 2], attribution

    def model_scores(
        self, x_num: Tensor | None, x_cat: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The VAE's own scores and attribution, with the records in input space and their
        posterior means."""
        nll, mu, lv, z, space = self.per_sample_nll(x_num, x_cat)
        rec = nll.sum(-1)  # [N, L]
        recon = rec.mean(1)
        elbo = recon + kl_normal(mu, lv)
        log_pz = -0.5 * (z**2 + LOG_2PI).sum(-1)
        log_qz = -0.5 * (self.eps.unsqueeze(0) ** 2 + LOG_2PI + lv.unsqueeze(1)).sum(-1)
        log_w = -rec + log_pz - log_qz
        iwae = -(torch.logsumexp(log_w, dim=1) - math.log(self.eps.shape[0]))
        excess = F.relu(nll.mean(1) - self.baseline)
        attribution = excess / torch.maximum(excess.sum(1, keepdim=True), self.floor)
        return elbo, recon, iwae, attribution, space, mu
