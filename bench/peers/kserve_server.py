"""KServe's side of the race: its Python model server with a custom model over onnxruntime.

    PEER_MODEL=model.onnx python kserve_server.py --http_port P --grpc_port G [kserve options]

Runs in KServe's own venv (bench/peers/setup.sh), one process (``--workers 1``), onnxruntime
at 1 thread. KServe binds 0.0.0.0 and [::] unconditionally; for the bench both listeners are
moved to 127.0.0.1 here. ``--enable_latency_logging false --configure_logging false`` is the
"logging off" variant. Takes the model's tensors as they are and answers the ELBO score.
"""

import os
import uuid
from typing import Any

import grpc.aio
import kserve.protocol.rest.server as rest
import onnxruntime as ort
import uvicorn
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

_add_port = grpc.aio._server.Server.add_insecure_port  # type: ignore[attr-defined]


def _local_port(self: Any, address: str) -> int:
    return _add_port(self, address.replace("[::]", "127.0.0.1"))


def _local_config(*a: Any, **kw: Any) -> uvicorn.Config:
    return uvicorn.Config(*a, **{**kw, "host": "127.0.0.1"})


grpc.aio._server.Server.add_insecure_port = _local_port  # type: ignore[attr-defined]
rest.uvicorn = type("uvicorn", (), {"Config": staticmethod(_local_config)})  # type: ignore[assignment]


class OnnxScorer(Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.ready = True
        return True

    async def predict(
        self, payload: InferRequest, headers: Any = None, response_headers: Any = None
    ) -> InferResponse:
        inputs = {i.name: i.as_numpy() for i in payload.inputs}
        (score,) = self.session.run(["elbo"], inputs)
        out = InferOutput(name="score", shape=list(score.shape), datatype="FP32")
        out.set_data_from_numpy(score, binary_data=False)
        rid = payload.id or str(uuid.uuid4())  # as KServe's own servers answer
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=rid)


if __name__ == "__main__":
    ModelServer(workers=1).start([OnnxScorer("vae", os.environ["PEER_MODEL"])])
