"""Dump the parts a score could be made of, per record, so fusions can be compared offline.

Same split as bench/quality.py. For each dataset, seed and config: fit the VAE (no neighbour
term), then save for the training (bank), validation, calibration and test records: the VAE's
scores, the encoder's input and the posterior mean; plus the test labels and the validation
loss. ``bench/score_fusion.py`` reads these files.

    python bench/score_parts.py --out /tmp/parts --seeds 0 1 2 --only 6_cardio --set latent=8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from quality import DEFAULT_DATA, cases, split  # type: ignore[import-not-found]

from service.features import encode_columns
from training.config import TrainConfig
from training.data import prepare
from training.train import _rows, _tensors, build_graph, layout_of, model_sizes

BATCH = 2048


def parts(graph, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {
        "elbo": [],
        "recon": [],
        "iwae": [],
        "enc": [],
        "mu": [],
        "dec": [],
    }
    n = len(next(iter(inputs.values())))
    n_real, n_num = graph.pre.layout.n_real, graph.pre.layout.n_num
    with torch.no_grad():
        for i in range(0, n, BATCH):
            xn, xc = _tensors(_rows(inputs, slice(i, i + BATCH)))
            elbo, recon, iwae, _, enc, mu = graph.model_scores(xn, xc)
            # the decoder's guess at the posterior mean: real means, then 0/1 probabilities
            o = graph.vae.decoder(mu)
            dec = torch.cat([o[:, :n_real], torch.sigmoid(o[:, 2 * n_real : n_real + n_num])], 1)
            for k, v in zip(out, (elbo, recon, iwae, enc, mu, dec), strict=True):
                out[k].append(v.numpy())
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def decoder_std(graph, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Each real feature's median decoder std (scaled units) at the posterior means of
    ``inputs``: how closely the VAE predicts that feature."""
    vae, n_real = graph.vae, graph.pre.layout.n_real
    with torch.no_grad():
        enc_in, _, _ = graph.pre(*_tensors(inputs))
        out = vae.decoder(vae.encode(enc_in)[0])
        raw = out[:, n_real : 2 * n_real]
        lv = vae.lv_lo + torch.nn.functional.softplus(raw + vae.lv_c)
    return torch.exp(0.5 * lv).median(0).values.numpy()


def one(X, y, seed: int, extra: dict, cap: int | None, member: int = 0) -> dict[str, np.ndarray]:
    df, test_df, y_test = split(X, y, seed, cap)
    mult = {k: extra.pop(k) for k in ("latent_x", "hidden_x") if k in extra}
    cfg = TrainConfig(seed=seed, neighbour_weight=0, threads=1, **extra)
    prep = prepare(df, cfg)
    if member:  # the same split, another init: a second member of an ensemble
        cfg = cfg.model_copy(update={"seed": seed + member})
    layout = layout_of(prep.features)
    hidden, latent = model_sizes(layout, cfg)
    if "latent_x" in mult:  # a multiple of the default size
        cfg = cfg.model_copy(update={"latent": max(1, round(latent * mult["latent_x"]))})
    if "hidden_x" in mult:
        cfg = cfg.model_copy(update={"hidden": [round(h * mult["hidden_x"]) for h in hidden]})
    normal_in = encode_columns(prep.features, prep.columns).inputs
    t0 = time.perf_counter()
    graph, hist = build_graph(layout, normal_in, prep.train_idx, prep.val_idx, cfg)
    fit_s = time.perf_counter() - t0
    test_in = encode_columns(
        prep.features, {f.name: test_df[f.name].to_numpy() for f in prep.features}
    ).inputs
    res: dict[str, np.ndarray] = {
        "y": y_test,
        "val_loss": np.array(hist.val_loss[hist.best_epoch]),
        "epochs": np.array(len(hist.val_loss)),
        "fit_s": np.array(fit_s),
        "n_num": np.array(layout.n_num),
        "n_real": np.array(layout.n_real),
        "dec_std": decoder_std(graph, _rows(normal_in, prep.train_idx[:4096])),
    }
    for name, inputs in (
        ("train", _rows(normal_in, prep.train_idx)),
        ("val", _rows(normal_in, prep.val_idx)),
        ("cal", _rows(normal_in, prep.calib_idx)),
        ("test", test_in),
    ):
        for k, v in parts(graph, inputs).items():
            res[f"{name}_{k}"] = v
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--only", nargs="+")
    p.add_argument("--set", nargs="+", default=[])
    p.add_argument("--tag", default="base")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--member", type=int, default=0, help="init seed offset, same split")
    a = p.parse_args()
    torch.set_num_threads(1)
    extra = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    a.out.mkdir(parents=True, exist_ok=True)
    for name, X, y, cap in cases(a.data):
        if a.only and name not in a.only:
            continue
        for s in a.seeds:
            f = a.out / f"{name}__{a.tag}__{s}.npz"
            if f.exists():
                continue
            r = one(X, y, s, dict(extra), cap, a.member)
            np.savez(f, **r)
            print(
                f"{name} seed {s} {a.tag}: {float(r['fit_s']):.1f}s val {float(r['val_loss']):.3f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
