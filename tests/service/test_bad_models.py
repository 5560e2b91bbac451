"""Hostile and broken model files, against the real command line and the real service.

Three classes: a model that loads but fails or misbehaves when run (built with the ``onnx``
package by editing a really exported model), a file in the bundle that is not a regular file or
is too large (a FIFO, a link to /dev/zero, a directory, a sparse 1 GiB file), and a manifest
with numbers that are not numbers or structure that is not sane (NaN, 1e999, decreasing
quantiles, ten thousand levels of nesting). Each must be refused with its reason, promptly,
without a traceback, while the previous version keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import REGISTRY

from service.bundle import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MAX_MODEL_BYTES,
    MODEL_FILE,
    BundleError,
    read_bundle,
)
from service.lifecycle import ModelManager
from service.registry import POINTER, Registry, new_version
from service.scoring import Scorer
from service.settings import load_settings
from tests.conftest import (
    POLL,
    REFUSED,
    Load,
    add_version,
    failures,
    free_port,
    log_entries,
    records,
    run_cli,
    run_server,
    wait_until,
)
from training.demo_data import generate_payments

ADMIN = "adm1n-t0ken"
Edit = Callable[[Path], None]  # damages a staged copy of a bundle directory


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A registry whose one version, v1, serves."""
    reg = Registry(tmp_path_factory.mktemp("bad") / "registry", create=True)
    v1 = add_version(reg, generate_payments(1000, seed=120), promote=True, epochs=3)
    return reg.root, v1


def registry_copy(good: tuple[Path, str], tmp: Path) -> tuple[Registry, str]:
    shutil.copytree(good[0], tmp / "registry")
    return Registry(tmp / "registry"), good[1]


def add_variant(reg: Registry, src: str, edit: Edit | None = None) -> str:
    """A new version holding ``src``'s bundle damaged by ``edit``, entered by one rename."""
    v = new_version()
    stage = reg.root / f"stage-{v}"
    shutil.copytree(reg.version_path(src), stage)
    manifest = json.loads((stage / MANIFEST_FILE).read_text())
    manifest["version"], manifest["parent_version"] = v, src
    (stage / MANIFEST_FILE).write_text(json.dumps(manifest))
    if edit is not None:
        edit(stage)
    os.rename(stage, reg.version_path(v))
    return v


# ---------------------------------------------------------------- damage: the manifest


def manifest_edit(change: Callable[[dict[str, Any]], None]) -> Edit:
    def edit(d: Path) -> None:
        raw = json.loads((d / MANIFEST_FILE).read_text())
        change(raw)
        (d / MANIFEST_FILE).write_text(json.dumps(raw))  # writes NaN and Infinity as such

    return edit


def nested(depth: int) -> Edit:
    def edit(d: Path) -> None:
        raw = (d / MANIFEST_FILE).read_text()
        deep = '{"a": ' * depth + "1" + "}" * depth
        (d / MANIFEST_FILE).write_text(raw.replace('"config": {', f'"config": {{"x": {deep}, ', 1))

    return edit


def first(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(f for f in raw["features"] if f["kind"] == kind)


def reverse_quantiles(raw: dict[str, Any]) -> None:
    raw["distributions"]["elbo"]["quantiles"].reverse()


MANIFESTS: dict[str, tuple[Edit, str]] = {
    "nan threshold": (
        manifest_edit(lambda r: r["thresholds"]["elbo"].update(value=float("nan"))),
        "thresholds.elbo.value is nan, not a finite number",
    ),
    "infinite quantile": (
        manifest_edit(lambda r: r["distributions"]["recon"]["quantiles"].__setitem__(-1, 1e999)),
        "distributions.recon.quantiles.",
    ),
    "nan scale": (
        manifest_edit(lambda r: first(r, "numeric").update(scale=float("nan"))),
        "features.",
    ),
    "infinite metric": (
        manifest_edit(lambda r: r["metrics"].update(validation_loss=-float("inf"))),
        "metrics.validation_loss is -inf",
    ),
    "decreasing quantiles": (manifest_edit(reverse_quantiles), "quantiles must be non-decreasing"),
    "probs in percent": (
        manifest_edit(
            lambda r: r["distributions"]["iwae"].update(
                probs=[p * 100 for p in r["distributions"]["iwae"]["probs"]]
            )
        ),
        "probs must lie in [0, 1]",
    ),
    "min above max": (
        manifest_edit(lambda r: first(r, "numeric").update(min=1e9, max=0.0)),
        "is above max",
    ),
    "deep nesting": (nested(100_000), "nested more than 32 levels deep"),
    "nesting just too deep": (nested(40), "nests more than 32 levels deep"),
    "huge integer": (
        lambda d: (d / MANIFEST_FILE).write_text(
            (d / MANIFEST_FILE).read_text().replace('"rows": ', '"rows": ' + "9" * 5000, 1)
        ),
        "unreadable manifest",
    ),
}


# ---------------------------------------------------------------- damage: the files


def fifo(name: str) -> Edit:
    def edit(d: Path) -> None:
        (d / name).unlink()
        os.mkfifo(d / name)

    return edit


def to_dev_zero(d: Path) -> None:
    (d / MODEL_FILE).unlink()
    (d / MODEL_FILE).symlink_to("/dev/zero")


def link_inside(d: Path) -> None:
    (d / MODEL_FILE).rename(d / "real.onnx")
    (d / MODEL_FILE).symlink_to("real.onnx")


def directory(d: Path) -> None:
    (d / MODEL_FILE).unlink()
    (d / MODEL_FILE).mkdir()


def sparse(name: str, size: int) -> Edit:
    def edit(d: Path) -> None:
        with (d / name).open("r+b") as f:
            f.truncate(size)

    return edit


FILES: dict[str, tuple[Edit, str]] = {
    "model is a FIFO": (fifo(MODEL_FILE), "a FIFO, not a regular file"),
    "manifest is a FIFO": (fifo(MANIFEST_FILE), "a FIFO, not a regular file"),
    "model links to /dev/zero": (to_dev_zero, "a symbolic link, not a regular file"),
    "model links inside the bundle": (link_inside, "a symbolic link, not a regular file"),
    "model is a directory": (directory, "a directory, not a regular file"),
    "model over 1 GiB": (sparse(MODEL_FILE, MAX_MODEL_BYTES + 1), "over the limit"),
    "manifest over 8 MiB": (sparse(MANIFEST_FILE, MAX_MANIFEST_BYTES + 1), "over the limit"),
}


# ---------------------------------------------------------------- damage: the ONNX model


def onnx_edit(change: Callable[[onnx.ModelProto, dict[str, Any]], None]) -> Edit:
    """Edit the ONNX graph (and the manifest with it); the sha256 is updated: the file is
    exactly what its manifest says, it just does not work as a model should."""

    def edit(d: Path) -> None:
        model = onnx.load(str(d / MODEL_FILE))
        raw = json.loads((d / MANIFEST_FILE).read_text())
        change(model, raw)
        data = model.SerializeToString()
        (d / MODEL_FILE).write_bytes(data)
        raw["model"]["sha256"] = hashlib.sha256(data).hexdigest()
        (d / MANIFEST_FILE).write_text(json.dumps(raw))

    return edit


def replace_output(
    model: onnx.ModelProto, name: str, nodes: Callable[[str], list[onnx.NodeProto]]
) -> None:
    """The graph output ``name`` becomes ``nodes(original)``'s result."""
    g = model.graph
    orig = f"{name}__orig"
    for node in g.node:
        node.output[:] = [orig if o == name else o for o in node.output]
        node.input[:] = [orig if i == name else i for i in node.input]
    g.node.extend(nodes(orig))


def const(model: onnx.ModelProto, name: str, value: Any, dtype: Any = np.int64) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


def output(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    return next(o for o in model.graph.output if o.name == name)


def score_of_first_row(model: onnx.ModelProto, raw: dict[str, Any], declared: bool) -> None:
    """``recon`` is cut to its first row: right for one record, wrong for more. ``declared``:
    the graph also declares the shape [1] (as a model exported with a fixed batch would)."""
    c = {k: const(model, f"slice_{k}", [v]) for k, v in (("s", 0), ("e", 1), ("a", 0))}
    replace_output(
        model,
        "recon",
        lambda orig: [
            helper.make_node("Slice", [orig, c["s"], c["e"], c["a"]], ["recon"]),
        ],
    )
    if declared:
        dims = output(model, "recon").type.tensor_type.shape.dim
        dims[0].ClearField("dim_param")
        dims[0].dim_value = 1


def extra_output(model: onnx.ModelProto, raw: dict[str, Any]) -> None:
    """An extra output of a wrong shape (the manifest lists it, as training writes whatever
    the session has): it fails every call whatever the rows."""
    shape = const(model, "debug_shape", [2])
    model.graph.node.append(helper.make_node("Reshape", ["elbo", shape], ["debug"]))
    model.graph.output.append(helper.make_tensor_value_info("debug", TensorProto.FLOAT, [2]))
    raw["model"]["outputs"].append("debug")


def double_scores(model: onnx.ModelProto, raw: dict[str, Any]) -> None:
    replace_output(
        model,
        "iwae",
        lambda orig: [helper.make_node("Cast", [orig], ["iwae"], to=TensorProto.DOUBLE)],
    )
    output(model, "iwae").type.tensor_type.elem_type = TensorProto.DOUBLE


def narrow_attribution(model: onnx.ModelProto, raw: dict[str, Any]) -> None:
    """One feature fewer in the attribution: its share would be silently lost."""
    n = len(raw["features"])
    c = {k: const(model, f"narrow_{k}", [v]) for k, v in (("s", 0), ("e", n - 1), ("a", 1))}
    replace_output(
        model,
        "attribution",
        lambda orig: [
            helper.make_node("Slice", [orig, c["s"], c["e"], c["a"]], ["attribution"]),
        ],
    )
    output(model, "attribution").type.tensor_type.shape.dim[1].dim_value = n - 1


def nan_when_missing(model: onnx.ModelProto, raw: dict[str, Any]) -> None:
    """The default score turns NaN when a nullable numeric feature is missing: a typical
    record scores fine, a record with a missing value never alarms."""
    col = next(f["column"] for f in raw["features"] if f["kind"] == "numeric" and f["nullable"])
    idx, zero = const(model, "nan_col", col), const(model, "nan_zero", 0.0, np.float32)
    replace_output(
        model,
        raw["default_score"],
        lambda orig: [
            helper.make_node("Gather", ["x_num", idx], ["nan_g"], axis=1),
            helper.make_node("Mul", ["nan_g", zero], ["nan_z"]),
            helper.make_node("Add", [orig, "nan_z"], [raw["default_score"]]),
        ],
    )


def endless_loop(model: onnx.ModelProto, raw: dict[str, Any]) -> None:
    """A Loop of 2^40 iterations feeding ``elbo``: any call runs (practically) forever."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["acc_in"], ["acc_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, []),
        ],
    )
    trips, cond = const(model, "spin_n", 1 << 40), const(model, "spin_c", True, np.bool_)
    zero = const(model, "spin_zero", 0.0, np.float32)
    replace_output(
        model,
        "elbo",
        lambda orig: [
            helper.make_node("Loop", [trips, cond, zero], ["spun"], body=body),
            helper.make_node("Add", [orig, "spun"], ["elbo"]),
        ],
    )


SLOW_PRODUCTS = 250  # 0.04 s each on an idle core here: ten times the 1 s timeout below


def slow_to_build(model: onnx.ModelProto, raw: dict[str, Any]) -> None:
    """A constant computation (matrix products of a 1500 x 1500 constant) feeding ``elbo``:
    onnxruntime folds it while it builds the session, which takes seconds of CPU and cannot be
    interrupted (a session, unlike a run, has no terminate flag)."""
    shape = const(model, "slow_shape", [1500, 1500])
    fill = helper.make_tensor("slow_fill", TensorProto.FLOAT, [1], [1e-3])
    nodes = [helper.make_node("ConstantOfShape", [shape], ["slow0"], value=fill)]
    for i in range(SLOW_PRODUCTS):
        nodes.append(helper.make_node("MatMul", [f"slow{i}", "slow0"], [f"slow{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"slow{SLOW_PRODUCTS}"], ["slow_sum"], keepdims=0),
        helper.make_node("Mul", ["slow_sum", const(model, "slow_0", 0.0, np.float32)], ["slow_z"]),
    ]
    replace_output(
        model, "elbo", lambda orig: [*nodes, helper.make_node("Add", [orig, "slow_z"], ["elbo"])]
    )


MODELS: dict[str, tuple[Edit, str]] = {
    "extra output of a wrong shape": (onnx_edit(extra_output), "unknown model outputs ['debug']"),
    "score of the first row only": (
        onnx_edit(lambda m, r: score_of_first_row(m, r, declared=False)),
        "output recon over",
    ),
    "fixed batch of one": (
        onnx_edit(lambda m, r: score_of_first_row(m, r, declared=True)),
        "output recon has shape [1], not ['N']",
    ),
    "double scores": (onnx_edit(double_scores), "output iwae is tensor(double)"),
    "attribution one feature short": (onnx_edit(narrow_attribution), "output attribution"),
    "NaN when a value is missing": (onnx_edit(nan_when_missing), "is not finite"),
}


# ---------------------------------------------------------------- in process: each is refused


def run_within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``'s result or exception, failing the test if it takes longer (a daemon thread:
    a call stuck for good does not hang the test session)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s: it blocks"
    if "error" in box:
        raise box["error"]
    return box.get("result")


@pytest.mark.parametrize("case", list(MANIFESTS) + list(FILES))
def test_bad_manifest_or_file_is_refused_at_once(
    good: tuple[Path, str], tmp_path: Path, case: str
) -> None:
    reg, v1 = registry_copy(good, tmp_path)
    edit, reason = {**MANIFESTS, **FILES}[case]
    v = add_variant(reg, v1, edit)
    with pytest.raises(BundleError) as e:
        run_within(20, lambda: read_bundle(reg.version_path(v)))
    assert reason in str(e.value)
    assert "\n" not in str(e.value)
    assert e.value.__cause__ is None or not isinstance(e.value.__cause__, OSError), (
        "a bad bundle must not look like a read error (those are retried at every poll)"
    )


@pytest.mark.parametrize("case", list(MODELS))
def test_model_that_misbehaves_when_run_is_refused_at_warm_up(
    good: tuple[Path, str], tmp_path: Path, case: str
) -> None:
    reg, v1 = registry_copy(good, tmp_path)
    edit, reason = MODELS[case]
    v = add_variant(reg, v1, edit)
    bundle = read_bundle(reg.version_path(v))  # the files are what the manifest says ...
    with pytest.raises(BundleError) as e:  # ... but the model is not what it says
        Scorer(bundle).warm_up()
    assert reason in str(e.value), str(e.value)


def test_the_good_model_passes_the_same_checks(good: tuple[Path, str]) -> None:
    reg = Registry(good[0])
    scorer = Scorer(reg.read(good[1]))
    scorer.warm_up()
    assert scorer.ready


# ---------------------------------------------------------------- the command line


@pytest.mark.slow  # the real `vae-anomaly models`
def test_models_commands_refuse_bad_versions_and_list_the_rest(
    good: tuple[Path, str], tmp_path: Path
) -> None:
    reg, v1 = registry_copy(good, tmp_path)
    cases = ["model is a FIFO", "model links to /dev/zero", "deep nesting", "nan threshold"]
    bad = {add_variant(reg, v1, {**FILES, **MANIFESTS}[c][0]): c for c in cases}
    bad[add_variant(reg, v1, MODELS["score of the first row only"][0])] = "runs badly"
    pointer = (reg.root / POINTER).read_bytes()
    r = run_cli("models", "list", "--registry", str(reg.root), timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = {line.lstrip("* ").split()[0]: line for line in r.stdout.splitlines()}
    assert set(lines) == {v1, *bad}
    assert "BROKEN" not in lines[v1]
    for v, case in bad.items():
        if case != "runs badly":  # listing verifies files, it does not run models
            assert "BROKEN" in lines[v] and {**FILES, **MANIFESTS}[case][1] in lines[v]
    for v, case in bad.items():
        for action in ("promote", "show"):
            if case == "runs badly" and action == "show":
                continue
            r = run_cli("models", action, v, "--registry", str(reg.root), timeout=60)
            assert r.returncode == 2, (case, action, r.stdout)
            assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    # promote runs the model as the service would, so one that fails when run is refused too
    assert (reg.root / POINTER).read_bytes() == pointer
    # a FIFO in place of the pointer is refused, not waited on
    (reg.root / POINTER).unlink()
    os.mkfifo(reg.root / POINTER)
    r = run_cli("models", "list", "--registry", str(reg.root), timeout=60)
    assert r.returncode == 2 and "a FIFO, not a regular file" in r.stderr, r.stderr


# ---------------------------------------------------------------- the service


@pytest.mark.slow  # a real server
def test_service_refuses_every_bad_version_and_keeps_serving(
    good: tuple[Path, str], tmp_path: Path
) -> None:
    reg, v1 = registry_copy(good, tmp_path)
    cases = {
        **{c: MODELS[c] for c in ("extra output of a wrong shape", "score of the first row only")},
        **{c: MODELS[c] for c in ("NaN when a value is missing", "double scores")},
        **{c: FILES[c] for c in ("model is a FIFO", "model links to /dev/zero")},
        **{c: FILES[c] for c in ("model is a directory", "manifest is a FIFO")},
        **{c: MANIFESTS[c] for c in ("nan threshold", "deep nesting")},
    }
    bad = {add_variant(reg, v1, edit): (case, reason) for case, (edit, reason) in cases.items()}
    v2 = add_variant(reg, v1)  # good: v1's model under a newer version
    recs = records(generate_payments(6, seed=121))
    env = {"VAE_ANOMALY_POLL_INTERVAL": POLL, "VAE_ANOMALY_ADMIN_TOKEN": ADMIN}
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with (
        run_server(["serve", "--registry", str(reg.root)], tmp_path, env=env) as s,
        httpx.Client(base_url=s.url, timeout=30) as c,
        Load(
            s.url, recs[:1], pace=0.02
        ) as singles,  # two threads of one-record requests: coalesced
        Load(s.url, recs[:2], pace=0.02) as pairs,
    ):
        for v, (case, reason) in bad.items():
            before = failures(c)
            reg.promote(v, verify=False)  # broken after promotion, or promoted by hand
            wait_until(lambda b=before: failures(c) > b, f"{case}: refused")
            refusals = [e for e in log_entries(s, REFUSED) if e.get("wanted") == v]
            assert refusals and reason in refusals[0]["reason"], (case, refusals)
            r = c.post("/v1/admin/reload", headers=auth)
            assert r.status_code == 409 and reason in r.json()["error"], (case, r.text)
            time.sleep(4 * float(POLL))  # a few polls: refused once, not at every poll
            assert failures(c) == before + 2, case  # the poll's refusal and the admin's
            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["version"] == v1
            assert ready.json()["loading"] == []
        reg.promote(v2)  # nothing is wedged: a good promotion is picked up at once
        singles.wait_for(v2)
        pairs.wait_for(v2)
    for load in (singles, pairs):
        statuses = [st for st, _ in load.results]
        assert len(statuses) > 20 and set(statuses) == {200}, statuses
        assert {v for _, v in load.results} == {v1, v2}
    assert "model watch failed" not in s.logs()


@pytest.mark.slow  # a real server
def test_fresh_serve_falls_back_from_a_model_that_fails_when_run(
    good: tuple[Path, str], tmp_path: Path
) -> None:
    reg, v1 = registry_copy(good, tmp_path)
    bad = add_variant(reg, v1, MODELS["score of the first row only"][0])
    reg.promote(bad, verify=False)
    recs = records(generate_payments(3, seed=122))
    with (
        run_server(["serve", "--registry", str(reg.root)], tmp_path) as s,
        httpx.Client(base_url=s.url, timeout=30) as c,
    ):
        r = c.post("/v1/score", json={"records": recs})
        assert r.status_code == 200 and r.json()["model"]["version"] == v1
        assert failures(c) == 1
        fallbacks = log_entries(s, "serving an earlier version: the serving one cannot be loaded")
        assert [e["version"] for e in fallbacks] == [v1]
        assert "output recon over" in fallbacks[0]["reason"]
    assert "warning: the serving version cannot be loaded" in s.logs()
    # a bundle served alone has nothing to fall back to: the start stops, with the reason
    r = run_cli(
        "serve", "--bundle", str(reg.version_path(bad)), "--port", str(free_port()), timeout=60
    )
    assert r.returncode == 2 and "output recon over" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # a real server
def test_a_load_that_takes_too_long_is_shown_then_given_up(
    good: tuple[Path, str], tmp_path: Path
) -> None:
    reg, v1 = registry_copy(good, tmp_path)
    endless = add_variant(reg, v1, onnx_edit(endless_loop))
    v2 = add_variant(reg, v1)
    env = {"VAE_ANOMALY_POLL_INTERVAL": POLL, "VAE_ANOMALY_RELOAD_TIMEOUT": "5"}
    recs = records(generate_payments(2, seed=123))
    with (
        run_server(["serve", "--registry", str(reg.root)], tmp_path, env=env) as s,
        httpx.Client(base_url=s.url, timeout=30) as c,
        Load(s.url, recs, pace=0.02) as load,
    ):
        before = failures(c)
        reg.promote(endless, verify=False)

        def loading() -> list[dict[str, Any]]:
            r = c.get("/readyz")
            assert r.status_code == 200 and r.json()["version"] == v1  # still ready, on v1
            return list(r.json()["loading"])

        wait_until(lambda: any(x["version"] == endless for x in loading()), "the load shows")
        wait_until(lambda: failures(c) > before, "given up at the timeout", timeout=30)
        refusals = [e for e in log_entries(s, REFUSED) if e.get("wanted") == endless]
        assert refusals and "took over 5 s" in refusals[0]["reason"], refusals
        # its warm-up run was stopped: nothing keeps running, nothing is stuck
        wait_until(lambda: loading() == [], "the load has ended")
        assert "vae_anomaly_model_loads_stuck 0.0" in c.get("/metrics").text
        reg.promote(v2)
        load.wait_for(v2)
    statuses = [st for st, _ in load.results]
    assert len(statuses) > 20 and set(statuses) == {200}, statuses


@pytest.mark.slow  # a real server
def test_a_load_that_cannot_be_stopped_is_shown_as_stuck_and_blocks_nothing(
    good: tuple[Path, str], tmp_path: Path
) -> None:
    """In process (the same ModelManager the service runs): the slow version is given up at the
    timeout, shows as stuck while onnxruntime keeps building it, and a promotion made meanwhile
    loads at once."""
    reg, v1 = registry_copy(good, tmp_path)
    slow = add_variant(reg, v1, onnx_edit(slow_to_build))
    v2 = add_variant(reg, v1)
    manager = ModelManager(load_settings(registry=reg.root, reload_timeout=1))

    def stuck_gauge() -> float | None:
        return REGISTRY.get_sample_value("vae_anomaly_model_loads_stuck")

    async def scenario() -> None:
        await manager.start()
        assert manager.scorer is not None and manager.scorer.version == v1
        reg.promote(slow, verify=False)
        r = await manager.reload()
        assert r.version == v1 and r.error is not None and "took over 1 s" in r.error, r
        (load,) = manager.loading()
        assert load["version"] == slow and load["stuck"] is True and load["seconds"] >= 1
        assert stuck_gauge() == 1
        assert (await manager.reload()).error == "refused before"  # not started again
        retry = await manager.reload(retry_refused=True)  # as an admin reload: not twice at once
        assert retry.error is not None and "still stuck" in retry.error, retry
        assert len(manager.loading()) == 1
        reg.promote(v2)
        r = await manager.reload()
        assert r.changed and r.version == v2, r
        deadline = time.monotonic() + 300
        while manager.loading() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert manager.loading() == [] and stuck_gauge() == 0
        assert manager.scorer.version == v2  # the slow one, built at last, was dropped

    asyncio.run(scenario())
