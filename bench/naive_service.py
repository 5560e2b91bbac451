"""Two reference servers for bench/run.py (not part of the product).

- ``naive``: the same API served the way most tutorials do it: the torch model called in the
  FastAPI handler, pydantic request models, no batching, no ONNX.
- ``trivial``: a FastAPI endpoint that returns a constant: the HTTP ceiling.

    python bench/naive_service.py naive|trivial BUNDLE PORT
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class Request(BaseModel):
    records: list[dict[str, Any]]


def naive_app(bundle_dir: str) -> FastAPI:
    # imported here: the trivial server must not carry torch (its objects slow the collector)
    import numpy as np
    import torch

    from service.bundle import read_bundle
    from service.features import encode_columns
    from training.model import VAE, Preprocess, ScoringGraph
    from training.retrain import serving_weights
    from training.train import layout_of

    torch.set_num_threads(1)
    bundle = read_bundle(bundle_dir)
    m = bundle.manifest
    layout = layout_of(list(m.features))
    vae = VAE(layout, m.config["hidden"], m.config["latent"], m.config["min_std"])
    vae.load_state_dict(serving_weights(bundle), strict=False)
    graph = ScoringGraph(
        Preprocess(layout),
        vae,
        torch.randn(m.config["samples"], m.config["latent"]),
        torch.zeros(layout.n_features),
    ).eval()
    thr = m.thresholds[m.default_score].value
    app = FastAPI()

    @app.post("/v1/score")
    def score(req: Request) -> dict[str, Any]:
        cols = {f.name: [r.get(f.name) for r in req.records] for f in m.features}
        inputs = encode_columns(m.features, cols).inputs
        with torch.no_grad():
            elbo = graph(*(torch.from_numpy(v) for v in inputs.values()))[0].numpy()
        return {
            "results": [{"score": float(s), "is_anomaly": bool(s > thr)} for s in np.asarray(elbo)]
        }

    return app


def trivial_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/score")
    async def score() -> dict[str, Any]:
        return {"results": [{"score": 1.0, "is_anomaly": False}]}

    return app


if __name__ == "__main__":
    kind, bundle_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    app = naive_app(bundle_dir) if kind == "naive" else trivial_app()
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools"
    )
