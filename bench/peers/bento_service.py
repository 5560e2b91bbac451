"""BentoML's side of the race: an async service over onnxruntime (1 thread), one worker.

    PEER_MODEL=model.onnx bentoml serve bento_service:Scorer --host 127.0.0.1 --port P

Runs in BentoML's own venv (bench/peers/setup.sh), from this directory. BentoML 1.4's
services have no gRPC. Takes the model's tensors as they are (``{"x_num": [[...]], "x_cat":
[[...]]}``) and answers the ELBO scores.
"""

import os

import bentoml
import numpy as np
import onnxruntime as ort


@bentoml.service(workers=1)
class Scorer:
    def __init__(self) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        path = os.environ["PEER_MODEL"]
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    @bentoml.api
    async def score(self, x_num: np.ndarray, x_cat: np.ndarray) -> np.ndarray:
        inputs = {"x_num": x_num.astype(np.float32), "x_cat": x_cat.astype(np.int64)}
        return self.session.run(["elbo"], inputs)[0]
