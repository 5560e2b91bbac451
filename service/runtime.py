"""The model runtime: one onnxruntime session over a verified bundle. Knows nothing of HTTP."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.bundle import Bundle, BundleError, read_bundle

MAX_ROWS = 4096


class OnnxModel:
    """An onnxruntime session over one ONNX file; ``run`` returns every output by name."""

    def __init__(self, model_path: str | os.PathLike[str], *, intra_op_threads: int = 1) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"{model_path}: onnxruntime cannot load the model: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name. Large inputs run in slices of ``MAX_ROWS``: the graph's
        intermediate tensors grow with rows x posterior samples (1 GB for 10,000 rows)."""
        n = len(next(iter(inputs.values())))
        if n <= MAX_ROWS:
            return dict(
                zip(self.output_names, self.session.run(self.output_names, inputs), strict=True)
            )
        parts = [
            self.session.run(self.output_names, {k: v[i : i + MAX_ROWS] for k, v in inputs.items()})
            for i in range(0, n, MAX_ROWS)
        ]
        return {
            name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(self.output_names)
        }


def open_bundle(
    path: str | os.PathLike[str] | Bundle, *, intra_op_threads: int = 1
) -> tuple[Bundle, OnnxModel]:
    """Read and verify a bundle, load its model, and check the model matches the manifest."""
    bundle = path if isinstance(path, Bundle) else read_bundle(Path(path))
    model = OnnxModel(bundle.model_path, intra_op_threads=intra_op_threads)
    m = bundle.manifest
    if sorted(model.input_names) != sorted(m.model.inputs):
        raise BundleError(
            f"{bundle.model_path}: model inputs {model.input_names} differ from "
            f"the manifest's {m.model.inputs}"
        )
    missing = {*m.score_types, "attribution"} - set(model.output_names)
    if missing:
        raise BundleError(f"{bundle.model_path}: model lacks outputs {sorted(missing)}")
    return bundle, model
