"""Export the scoring graph to one self-contained ONNX file and check it against torch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from service.bundle import SCORE_TYPES
from service.runtime import OnnxModel
from training.model import ScoringGraph

OPSET = 18
OUTPUTS = [*SCORE_TYPES, "attribution"]
TOLERANCE = 1e-3  # max |onnx - torch| / (1 + |torch|) over every output


class ExportError(RuntimeError):
    """The exported graph is missing or does not reproduce torch."""


def input_names(graph: ScoringGraph) -> list[str]:
    return [n for n, has in (("x_num", graph.has_num), ("x_cat", graph.has_cat)) if has]


def export_onnx(graph: ScoringGraph, inputs: dict[str, np.ndarray], path: Path) -> None:
    """Write ``graph`` as a single ONNX file (weights inside) with a dynamic batch axis."""
    graph.eval()
    names = input_names(graph)
    args = tuple(torch.from_numpy(inputs[n]) for n in names)
    batch = torch.export.Dim("batch", min=1, max=1 << 30)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            args,
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=OPSET,
            input_names=names,
            output_names=OUTPUTS,
            dynamic_shapes=(tuple({0: batch} for _ in names),),  # forward(*inputs)
            verbose=False,
        )
    onnx.checker.check_model(str(path), full_check=True)


def compare(
    graph: ScoringGraph, session: OnnxModel, inputs: dict[str, np.ndarray]
) -> tuple[float, float]:
    """Max absolute and relative difference between onnxruntime and torch on ``inputs``."""
    names = input_names(graph)
    with torch.no_grad():
        ref = graph(*(torch.from_numpy(inputs[n]) for n in names))
    got = session.run({n: inputs[n] for n in names})
    max_abs = max_rel = 0.0
    for name, r in zip(OUTPUTS, ref, strict=True):
        r_np = r.numpy().astype(np.float64)
        diff = np.abs(got[name].astype(np.float64) - r_np)
        if not np.all(np.isfinite(got[name])):
            raise ExportError(f"onnxruntime output {name} has non-finite values")
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / (1.0 + np.abs(r_np))).max()))
    if max_rel > TOLERANCE:
        raise ExportError(
            f"onnxruntime differs from torch by {max_rel:.2e} (relative), over the "
            f"{TOLERANCE:.0e} tolerance; the model was not written"
        )
    return max_abs, max_rel
