"""MLServer's side of the race: a custom runtime over onnxruntime (1 thread).

Runs in MLServer's own venv (bench/peers/setup.sh); bench/peers/race.py writes the settings
(one process: ``parallel_workers: 0``; adaptive batching on or off) and copies this file beside
them. Takes the model's tensors (``x_num`` FP32 [N, k], ``x_cat`` INT64 [N, k]) as they are and
answers the ELBO score: less work than our service does per request.
"""

from typing import Any

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxScorer(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        uri: Any = self.settings.parameters.uri  # type: ignore[union-attr]
        self.session = ort.InferenceSession(uri, opts, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # the codec gives [N, k] tensors back flat: the model wants them as sent
        inputs = {i.name: NumpyCodec.decode_input(i).reshape(i.shape) for i in payload.inputs}
        (score,) = self.session.run(["elbo"], inputs)
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("score", score)]
        )
