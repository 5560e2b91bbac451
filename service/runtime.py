"""The model runtime: one onnxruntime session over a verified bundle. Knows nothing of HTTP."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.bundle import (
    MAX_MODEL_BYTES,
    MISSING_INDEX,
    SCORE_TYPES,
    UNKNOWN_TOKEN,
    BooleanFeature,
    Bundle,
    BundleError,
    Manifest,
    NumericFeature,
    read_bundle,
    read_regular,
    sha256_hex,
)
from service.features import Encoder

MAX_ROWS = 4096
WARM_UP_ROWS = 64
ATTRIBUTION = "attribution"
INPUT_TYPES = {"x_num": "tensor(float)", "x_cat": "tensor(int64)"}


class OnnxModel:
    """An onnxruntime session over one ONNX file; ``run`` returns every output by name.

    The file is read once, as a regular file of at most MAX_MODEL_BYTES (checked against
    ``sha256`` when given), and the session is built from those bytes: what runs is what was
    verified, even if the file is replaced meanwhile."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        intra_op_threads: int = 1,
        sha256: str | None = None,
    ) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            data = read_regular(Path(model_path), MAX_MODEL_BYTES)
        except OSError as e:
            raise BundleError(f"{model_path}: unreadable model file: {e}") from e
        if sha256 is not None and sha256_hex(data) != sha256:
            raise BundleError(f"{model_path}: sha256 does not match the manifest (changed?)")
        try:
            self.session = ort.InferenceSession(
                data, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise BundleError(f"{model_path}: onnxruntime cannot load the model: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # shared by every run; abort() sets its terminate flag to stop a run in progress
        self.run_options = ort.RunOptions()

    def abort(self) -> None:
        """Make the runs in progress (and any later one) fail at their next node."""
        self.run_options.terminate = True

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name. Large inputs run in slices of ``MAX_ROWS``: the graph's
        intermediate tensors grow with rows x posterior samples (1 GB for 10,000 rows)."""
        n = len(next(iter(inputs.values())))
        names, ro = self.output_names, self.run_options
        if n <= MAX_ROWS:
            return dict(zip(names, self.session.run(names, inputs, ro), strict=True))
        parts = [
            self.session.run(names, {k: v[i : i + MAX_ROWS] for k, v in inputs.items()}, ro)
            for i in range(0, n, MAX_ROWS)
        ]
        return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}


def expected_outputs(m: Manifest) -> dict[str, tuple[int | None, ...]]:
    """Each output the model must have, with its shape (None: the batch axis)."""
    out: dict[str, tuple[int | None, ...]] = {st: (None,) for st in SCORE_TYPES}
    out[ATTRIBUTION] = (None, len(m.features))
    return out


def check_signature(path: Path, model: OnnxModel, m: Manifest) -> None:
    """The model's declared inputs and outputs are the manifest's, with the contract's element
    types and shapes: nothing more (an extra output runs with every call), nothing less."""
    session = model.session
    if sorted(model.input_names) != sorted(m.model.inputs):
        raise BundleError(
            f"{path}: model inputs {model.input_names} differ from the manifest's {m.model.inputs}"
        )
    if sorted(model.output_names) != sorted(m.model.outputs):
        raise BundleError(
            f"{path}: model outputs {model.output_names} differ from "
            f"the manifest's {m.model.outputs}"
        )
    wanted = expected_outputs(m)
    missing = {*m.score_types, ATTRIBUTION} - set(model.output_names)
    if missing:
        raise BundleError(f"{path}: model lacks outputs {sorted(missing)}")
    unknown = set(model.output_names) - set(wanted)
    if unknown:
        raise BundleError(f"{path}: unknown model outputs {sorted(unknown)}")
    for i in session.get_inputs():
        width = m.n_inputs(i.name)
        _check_arg(path, "input", i, INPUT_TYPES.get(i.name, "?"), (None, width))
    for o in session.get_outputs():
        _check_arg(path, "output", o, "tensor(float)", wanted[o.name])


def _check_arg(
    path: Path, what: str, arg: ort.NodeArg, dtype: str, shape: tuple[int | None, ...]
) -> None:
    if arg.type != dtype:
        raise BundleError(f"{path}: {what} {arg.name} is {arg.type}, not {dtype}")
    declared = arg.shape
    if declared is None:
        return  # no declared shape: the warm-up checks the real ones

    def fits(got: object, want: int | None) -> bool:
        # a named or unknown dimension fits anything; a fixed batch size never does
        return not isinstance(got, int) or got == want

    if len(declared) != len(shape) or not all(map(fits, declared, shape)):
        expect = ["N" if d is None else d for d in shape]
        raise BundleError(f"{path}: {what} {arg.name} has shape {declared}, not {expect}")


def check_outputs(path: Path, m: Manifest, out: dict[str, np.ndarray], n: int) -> None:
    """Outputs of a run over ``n`` rows: each of the contract's shape and dtype, all finite."""
    for name, shape in expected_outputs(m).items():
        if name not in out:
            continue  # a score type the manifest does not list (checked by check_signature)
        want = tuple(n if d is None else d for d in shape)
        got = out[name]
        if got.shape != want or got.dtype != np.float32:
            raise BundleError(
                f"{path}: output {name} over {n} rows is {got.dtype} {list(got.shape)}, "
                f"not float32 {list(want)}"
            )
        if not np.isfinite(got).all():
            raise BundleError(f"{path}: output {name} is not finite on warm-up records")


def warm_up_columns(m: Manifest) -> dict[str, list[Any]]:
    """Warm-up records: the first typical (the imputed value, the commoner boolean, the first
    category), the others cycle through each feature's edge values: its training range, the
    other boolean, each category, a category never seen, and missing where that is allowed."""
    variants: dict[str, list[Any]] = {}
    for f in m.features:
        if isinstance(f, NumericFeature):
            values: list[Any] = [f.impute, f.min, f.max]
        elif isinstance(f, BooleanFeature):
            values = [f.rate >= 0.5, f.rate < 0.5]
        else:
            values = [*f.categories[MISSING_INDEX + 1 :], UNKNOWN_TOKEN]
        variants[f.name] = values + [None] * f.nullable
    n = min(max(len(v) for v in variants.values()), WARM_UP_ROWS)
    return {name: [v[i % len(v)] for i in range(n)] for name, v in variants.items()}


def check_runs(bundle: Bundle, model: OnnxModel, *, timeout: float | None = None) -> None:
    """Run the model on the warm-up records, the first alone (a single request) and then all
    together (a coalesced batch), and check every output's shape, type and finiteness. Any
    failure, whatever onnxruntime raises, is a BundleError. With ``timeout``, a run still
    going after that many seconds is stopped (and the model refused)."""
    path, m = bundle.model_path, bundle.manifest
    columns = warm_up_columns(m)
    encode = Encoder(m.features)
    timer = threading.Timer(timeout, model.abort) if timeout else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        for n in (1, len(columns[m.features[0].name])):
            out = model.run(encode({k: v[:n] for k, v in columns.items()}).inputs)
            check_outputs(path, m, out, n)
    except BundleError:
        raise
    except Exception as e:  # onnxruntime's own classes (Fail, ...) are not RuntimeErrors
        raise BundleError(f"{path}: warm-up failed: {type(e).__name__}: {e}") from e
    finally:
        if timer is not None:
            timer.cancel()


def open_bundle(
    path: str | os.PathLike[str] | Bundle, *, intra_op_threads: int = 1
) -> tuple[Bundle, OnnxModel]:
    """Read and verify a bundle, load its model, and check the model matches the manifest."""
    bundle = path if isinstance(path, Bundle) else read_bundle(Path(path))
    m = bundle.manifest
    model = OnnxModel(bundle.model_path, intra_op_threads=intra_op_threads, sha256=m.model.sha256)
    check_signature(bundle.model_path, model, m)
    return bundle, model
