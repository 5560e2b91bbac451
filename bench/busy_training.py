"""Training beside busy lower-priority processes: seconds per fit, idle and busy, by threads.

    python bench/busy_training.py [--quick] [--runs 3] [--modes default,torch] [--cases small,large]

Two models: ``small`` (6 numeric columns, 8,000 rows, 30 epochs) and ``large`` (30 mixed
columns, 100,000 rows, 3 epochs), both from bench/run.py's telemetry generator. Each fit runs
in its own process (thread settings are per process), in rounds that alternate between the
machine as it is ("idle") and beside ``--spinners`` busy-looping processes per usable CPU at
``nice +5`` relative to the fits ("busy": a batch job, a test run, a noisy neighbour).
Thread settings (``--modes``):

- ``default``: what ``vae-anomaly train`` chooses when given no ``--threads``;
- ``torch``: torch's own default (one thread per core: what training used before);
- ``1``, ``2``: that many torch threads;
- ``2-passive``: 2 threads with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep at barriers
  instead of spinning).

Linux with autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``) shares the CPUs
between sessions first, and niceness only orders processes within a session: the spinners are
started from this process, in its session, so that they are lower-priority neighbours of the
fits. On a machine shared with other sessions, give this one more weight so that their load
does not swamp the experiment (root)::

    setsid sh -c 'echo -10 > /proc/self/autogroup; exec python bench/busy_training.py'

Prints per case and mode the median seconds per whole ``train_bundle`` (fit, export, check,
calibration) idle and busy, every busy run, and busy over the case's best idle median.
Spinners live at most as long as a busy round's budget and are killed on exit, Ctrl-C and
SIGTERM included. Each fit is cut at ``--timeout`` seconds (reported as ">T").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES: dict[
    str, tuple[int, list[str] | int | None, int]
] = {  # name: (rows, columns (None: all 30; a number: that many correlated numerics), epochs)
    "small": (8_000, ["m04", "m05", "m06", "m07", "m08", "m09"], 30),
    "large": (100_000, None, 3),
    "wide": (20_000, 256, 3),  # the largest hidden layers the sizing rule makes (512, 256)
}
MODES: dict[str, tuple[str | None, dict[str, str]]] = {  # name: (threads, extra environment)
    "default": (None, {}),
    "torch": ("torch", {}),
    "1": ("1", {}),
    "2": ("2", {}),
    "2-passive": ("2", {"OMP_WAIT_POLICY": "PASSIVE"}),
}
SPIN = (
    "import os, sys, time\n"
    "os.nice(5)\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


def fit_once(case: str, threads: str | None) -> dict[str, Any]:
    """One fit in this process; ``threads`` None = the chosen default, "torch" = torch's."""
    sys.path.insert(0, str(HERE))
    import numpy as np
    import pandas as pd
    import torch
    from run import telemetry  # type: ignore[import-not-found]

    from training.config import TrainConfig
    from training.train import train_bundle

    rows, columns, epochs = CASES[case]
    if isinstance(columns, int):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(rows, 8)) @ rng.normal(size=(8, columns))
        df = pd.DataFrame(x + 0.3 * rng.normal(size=x.shape)).add_prefix("x")
    else:
        df = telemetry(rows, seed=1)
        df = df[columns] if columns else df.drop(columns=["host_id"])
    n = torch.get_num_threads() if threads == "torch" else int(threads) if threads else None
    cfg = TrainConfig(epochs=epochs, patience=epochs, threads=n)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        r = train_bundle(
            df, Path(tmp) / "m", cfg, source=case, data_fingerprint="bench", progress=False
        )
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "threads": torch.get_num_threads(), "fit": r.history.seconds}


def run_fit(case: str, mode: str, timeout: float) -> float | None:
    """Seconds for one whole training in a fresh process; None if it ran past ``timeout``."""
    threads, env = MODES[mode]
    cmd = [sys.executable, __file__, "--fit", case] + (["--threads", threads] if threads else [])
    try:
        out = subprocess.run(
            cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.splitlines()[-1])
    print(
        f"  {case:5} {mode:9} {r['seconds']:6.1f} s (fit {r['fit']:.1f} s, {r['threads']} threads)"
    )
    return float(r["seconds"])


def start_spinners(count: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", SPIN, str(seconds)]) for _ in range(count)]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def one_round(
    cases: list[str], modes: list[str], timeout: float, times: dict[Any, list[Any]]
) -> None:
    """Every (case, mode) once, appending each fit's seconds (None: cut at ``timeout``)."""
    for case in cases:
        for mode in modes:
            t = run_fit(case, mode, timeout)
            times[case, mode].append(t)
            if t is None:
                print(f"  {case:5} {mode:9} >{timeout:.0f} s")


def fmt(t: float | None, timeout: float) -> str:
    return f">{timeout:.0f}" if t is None else f"{t:.1f}"


def med(ts: list[float | None], timeout: float) -> float:
    return statistics.median(timeout if t is None else t for t in ts)


def table(idle: dict[Any, list[Any]], busy: dict[Any, list[Any]], timeout: float) -> str:
    """busy/idle against the case's best idle median: the time the fit can take."""
    lines = [
        "| model | threads | idle s (median) | busy s (median) | busy runs (s) | busy/best idle |",
        "|---|---|---|---|---|---|",
    ]
    for (case, mode), ts in busy.items():
        i, b = med(idle[case, mode], timeout), med(ts, timeout)
        best = min(med(v, timeout) for (c, _), v in idle.items() if c == case)
        worst = max(timeout if t is None else t for t in ts)
        runs = " / ".join(fmt(t, timeout) for t in ts)
        lines.append(
            f"| {case} | {mode} | {i:.1f} | {b:.1f} | {runs} | {b / best:.1f}x "
            f"(worst {worst / best:.1f}x) |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fit", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--threads", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small model, 2 runs")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--modes", default="default,torch")
    p.add_argument("--cases", default="small,large")
    p.add_argument("--spinners", type=int, default=3, help="busy processes per usable CPU")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a fit is cut")
    a = p.parse_args()
    if a.fit:
        print(json.dumps(fit_once(a.fit, a.threads)))
        return 0
    from service.cpus import usable_cpus

    cases = ["small"] if a.quick else a.cases.split(",")
    modes, runs = a.modes.split(","), 2 if a.quick else a.runs
    cpus = usable_cpus()
    print(f"usable CPUs {cpus}; fits at nice {os.nice(0)}, {a.spinners} spinners per CPU 5 above")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` runs
    idle: dict[Any, list[Any]] = {(c, m): [] for c in cases for m in modes}
    busy: dict[Any, list[Any]] = {(c, m): [] for c in cases for m in modes}
    budget = a.timeout * len(cases) * len(modes) + 60
    for r in range(runs):  # idle and busy rounds alternate, so that drift hits both alike
        print(f"round {r + 1}, idle (the machine as it is):")
        one_round(cases, modes, a.timeout, idle)
        print(f"round {r + 1}, busy:")
        spinners = start_spinners(a.spinners * cpus, budget)
        try:
            one_round(cases, modes, a.timeout, busy)
        finally:
            stop(spinners)
    print(table(idle, busy, a.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
