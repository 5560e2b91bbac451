"""The latent-space files of a bundle (see service/latent_manifest.py): the encoder's posterior
and the decoder as ONNX, each checked against torch, and the 2-D map of the latent space."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from service.bundle import sha256_file
from service.latent_manifest import (
    DECODER_FILE,
    LATENT_CLAMP,
    MAX_MAP_POINTS,
    POSTERIOR_FILE,
    RECON_OUTPUTS,
    Explorer,
    ImageShape,
    LatentFile,
    LatentMap,
    MapSample,
)
from service.runtime import OnnxModel
from training.config import TrainConfig
from training.data import Prepared
from training.export import OPSET, TOLERANCE, ExportError, input_names
from training.model import VAE, Layout, Preprocess, softplus

Z90 = 1.6448536  # the central 90% of a normal distribution lies within +-Z90 standard deviations
LOG_MAX = 80.0  # expm1 of more overflows float32: a decoded log-scaled value is capped there


def recon_names(layout: Layout) -> list[str]:
    """The reconstruction outputs this layout has (an output of width 0 is left out)."""
    widths = [layout.n_real] * 3 + [layout.n_bool, layout.n_null, sum(layout.cat_sizes)]
    return [n for n, w in zip(RECON_OUTPUTS, widths, strict=True) if w]


class Reconstruction(nn.Module):
    """Decoder output -> each feature's reconstruction in the records' own units."""

    center: Tensor
    scale: Tensor
    log: Tensor

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae
        L = vae.layout
        self.register_buffer("center", torch.tensor(L.center))
        self.register_buffer("scale", torch.tensor(L.scale))
        self.register_buffer("log", torch.tensor(L.log, dtype=torch.bool))

    def raw(self, s: Tensor) -> Tensor:
        """Scaled units -> the record's units (the inverse of Preprocess, monotone)."""
        t = self.center + self.scale * s
        t_log = torch.sign(t) * torch.expm1(torch.clamp(torch.abs(t), max=LOG_MAX))
        return torch.where(self.log, t_log, t)

    def forward(self, out: Tensor) -> list[Tensor]:
        L, vae = self.vae.layout, self.vae
        parts: list[Tensor] = []
        o = 0
        if L.n_num:
            mu, raw = out[:, : L.n_real], out[:, L.n_real : 2 * L.n_real]
            o = 2 * L.n_real
            if L.n_real:
                sd = torch.exp(0.5 * (vae.lv_lo + softplus(raw + vae.lv_c)))
                sd = torch.clamp(sd, max=1e4)
                # one inverse transform for the value and both ends of its range (fewer nodes:
                # the explanation of a single record runs this graph on one row)
                three = self.raw(torch.stack([mu, mu - Z90 * sd, mu + Z90 * sd]))
                parts += [three[0], three[1], three[2]]
            width = L.n_bool + L.n_null
            probs = torch.sigmoid(out[:, o : o + width])
            o += width
            if L.n_bool:
                parts.append(probs[:, : L.n_bool])
            if L.n_null:
                parts.append(probs[:, L.n_bool :])
        if L.cat_sizes:
            cats, o = [], o
            for k in L.cat_sizes:
                cats.append(torch.softmax(out[:, o : o + k], dim=1))
                o += k
            parts.append(torch.cat(cats, dim=1))
        return parts


class PosteriorGraph(nn.Module):
    """Inputs -> (mu, sigma, reconstruction at mu), with the scoring graph's preprocessing."""

    def __init__(self, pre: Preprocess, vae: VAE) -> None:
        super().__init__()
        self.pre, self.vae, self.recon = pre, vae, Reconstruction(vae)
        self.has_num = pre.layout.n_num > 0
        self.has_cat = len(pre.layout.cat_sizes) > 0

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        it = iter(inputs)
        x_num = next(it) if self.has_num else None
        x_cat = next(it) if self.has_cat else None
        enc_in, _, _ = self.pre(x_num, x_cat)
        mu, lv = self.vae.encode(enc_in)
        return (mu, torch.exp(0.5 * lv), *self.recon(self.vae.decoder(mu)))


class DecoderGraph(nn.Module):
    """A latent point z -> its reconstruction (z clamped to +-LATENT_CLAMP per axis)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae, self.recon = vae, Reconstruction(vae)

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:  # one input, exported as *args
        z = torch.clamp(inputs[0], -LATENT_CLAMP, LATENT_CLAMP)
        return tuple(self.recon(self.vae.decoder(z)))


def _export(graph: nn.Module, args: dict[str, np.ndarray], outputs: list[str], path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 30)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            tuple(torch.from_numpy(v) for v in args.values()),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=OPSET,
            input_names=list(args),
            output_names=outputs,
            dynamic_shapes=(tuple({0: batch} for _ in args),),
            verbose=False,
        )
    onnx.checker.check_model(str(path), full_check=True)


def _check(
    graph: nn.Module, session: OnnxModel, args: dict[str, np.ndarray]
) -> tuple[float, float]:
    """Max absolute and relative difference of onnxruntime from torch; ExportError over the
    tolerance."""
    with torch.no_grad():
        ref = graph(*(torch.from_numpy(v) for v in args.values()))
    got = session.run(args)
    worst = worst_abs = 0.0
    for name, r in zip(session.output_names, ref, strict=True):
        r64 = r.numpy().astype(np.float64)
        if not np.all(np.isfinite(got[name])):
            raise ExportError(f"{session.output_names}: output {name} has non-finite values")
        diff = np.abs(got[name] - r64)
        worst_abs = max(worst_abs, float(diff.max()))
        # relative to the column's magnitude too: a decoded value near 0 of a feature centred
        # at 2.5e7 is a float32 difference of such numbers, exact to ~2.5e7 * 6e-8 only
        column = np.abs(r64).max(axis=0, keepdims=True)
        worst = max(worst, float((diff / (1.0 + np.abs(r64) + column)).max()))
    if worst > TOLERANCE:
        raise ExportError(f"the latent-space graphs differ from torch by {worst:.2e}")
    return worst_abs, worst


def fit_map(mu: np.ndarray) -> LatentMap:
    """Identity for a 2-D latent space; else the two principal axes of the latent means."""
    d = mu.shape[1]
    var = mu.var(0)
    if d == 2:
        share = (var / max(float(var.sum()), 1e-12)).tolist()
        return LatentMap(kind="identity", mean=[0.0, 0.0], components=np.eye(2).tolist(),
                         explained=share)  # fmt: skip
    mean = mu.mean(0)
    _, s, vt = np.linalg.svd(mu - mean, full_matrices=False)
    comps = np.zeros((2, d))
    comps[: min(2, d)] = vt[:2]
    total = max(float((s**2).sum()), 1e-12)
    share = [float(s[i] ** 2 / total) if i < len(s) else 0.0 for i in range(2)]
    return LatentMap(kind="pca", mean=mean.tolist(), components=comps.tolist(), explained=share)


def project(m: LatentMap, mu: np.ndarray) -> np.ndarray:
    return np.asarray((mu - np.asarray(m.mean)) @ np.asarray(m.components).T)


def build(
    folder: Path,
    pre: Preprocess,
    vae: VAE,
    inputs: dict[str, np.ndarray],
    percentile: np.ndarray,
    labels: tuple[str, np.ndarray] | None = None,
    image: ImageShape | None = None,
    seed: int = 0,
) -> tuple[Explorer, dict[str, np.ndarray]]:
    """Write posterior.onnx and decoder.onnx into ``folder`` from held-out ``inputs`` (with
    their default score's ``percentile``; ``labels``: a name and one label per row), check
    them, and return the manifest section with the posterior's outputs on ``inputs``."""
    outs = recon_names(vae.layout)
    post, dec = PosteriorGraph(pre, vae).eval(), DecoderGraph(vae).eval()
    names = input_names(post)  # type: ignore[arg-type]
    args = {n: inputs[n] for n in names}
    head = {n: np.ascontiguousarray(v[:512]) for n, v in args.items()}
    _export(post, head, ["mu", "sigma", *outs], folder / POSTERIOR_FILE)
    p_sess = OnnxModel(folder / POSTERIOR_FILE)
    diffs = [_check(post, p_sess, head)]
    got = p_sess.run(args)
    mu = got["mu"].astype(np.float64)
    z = {"z": np.ascontiguousarray(got["mu"][:512])}
    _export(dec, z, outs, folder / DECODER_FILE)
    diffs.append(_check(dec, OnnxModel(folder / DECODER_FILE), z))
    lmap = fit_map(mu)
    xy = project(lmap, mu)
    rng = np.random.default_rng(seed)
    take = np.sort(rng.permutation(len(xy))[:MAX_MAP_POINTS])
    lo, hi = np.percentile(xy, 0.5, axis=0), np.percentile(xy, 99.5, axis=0)
    pad = np.maximum((hi - lo) * 0.15, 0.5)
    sample = MapSample(
        x=np.round(xy[take, 0], 4).tolist(),
        y=np.round(xy[take, 1], 4).tolist(),
        percentile=np.round(percentile[take], 2).tolist(),
        label=None if labels is None else [str(v) for v in labels[1][take]],
        label_name=None if labels is None else labels[0],
    )
    section = Explorer(
        latent=mu.shape[1],
        posterior=_file(folder / POSTERIOR_FILE, ["mu", "sigma", *outs]),
        decoder=_file(folder / DECODER_FILE, outs),
        max_abs_diff=max(d[0] for d in diffs),
        max_rel_diff=max(d[1] for d in diffs),
        map=lmap,
        bounds=[[float(lo[i] - pad[i]), float(hi[i] + pad[i])] for i in range(2)],
        sample=sample,
        image=image,
    )
    return section, got


def _file(path: Path, outputs: list[str]) -> LatentFile:
    return LatentFile(file=path.name, sha256=sha256_file(path), outputs=outputs)


def for_bundle(
    folder: Path,
    pre: Preprocess,
    vae: VAE,
    cfg: TrainConfig,
    prep: Prepared,
    calib: tuple[dict[str, np.ndarray], np.ndarray],
    anomalies: tuple[dict[str, np.ndarray], np.ndarray | None],
) -> tuple[Explorer, dict[str, np.ndarray]]:
    """:func:`build` for a training run: the map sample is the calibration records (with
    their color column's values), or with a label column, those and the labelled anomalies.
    ``calib`` and ``anomalies``: inputs and default scores. Returns the section and the
    posterior's outputs on the calibration records."""
    (c_in, c_scores), (a_in, a_scores) = calib, anomalies
    ranked = np.sort(c_scores)

    def pct(s: np.ndarray) -> np.ndarray:
        return np.asarray(100.0 * np.searchsorted(ranked, s, side="right") / len(ranked))

    n = len(c_scores)
    labels = None
    inputs, scores = c_in, c_scores
    if prep.colors is not None:
        labels = (str(cfg.color_column), prep.colors[prep.calib_idx])
    elif a_scores is not None and len(a_scores):
        m = min(len(a_scores), MAX_MAP_POINTS // 4)
        inputs = {k: np.concatenate([v, a_in[k][:m]]) for k, v in c_in.items()}
        scores = np.concatenate([c_scores, a_scores[:m]])
        labels = ("label", np.array(["normal"] * n + ["anomaly"] * m))
    section, got = build(folder, pre, vae, inputs, pct(scores), labels, image_of(cfg, prep))
    return section, {k: v[:n] for k, v in got.items()}


def image_of(cfg: TrainConfig, prep: Prepared) -> ImageShape | None:
    """The image the config declares: the data's feature columns in order, as pixels."""
    if not cfg.image:
        return None
    if len(cfg.image) != 2 or min(cfg.image) < 1:
        raise ValueError(f"config: image must be [width, height], got {cfg.image}")
    width, height = cfg.image
    pixels = [c.name for c in prep.report if c.used or c.reason == "constant"]
    if len(pixels) != width * height:
        raise ValueError(
            f"config: image {width}x{height} needs {width * height} feature columns, "
            f"the data has {len(pixels)}"
        )
    return ImageShape(width=width, height=height, pixels=pixels)
