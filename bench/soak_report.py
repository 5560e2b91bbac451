"""The soak test's record of a run (bench/soak.py) and its report: the verdict, the promotions,
the server's memory, latencies, and every request kind's answers."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from soak_kinds import Kind


@dataclass(eq=False)
class Result:
    kind: Kind
    due: float  # scheduled send time (perf_counter)
    sent: float
    done: float
    status: int | None  # None: lost
    error: str | None = None  # lost: the exception; else what is wrong with the answer
    version: str | None = None

    @property
    def bad(self) -> bool:
        return self.status is None or self.status != self.kind.status or self.error is not None


@dataclass(eq=False, repr=False)
class Run:
    start: float  # perf_counter at the start of the measured part
    end: float
    start_wall: float
    results: list[Result] = field(default_factory=list)
    rss: list[tuple[float, float]] = field(default_factory=list)  # (t from start, MB)
    promotions: list[dict[str, Any]] = field(default_factory=list)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def log_problems(log: Path) -> list[str]:
    """The server's warnings and errors (JSON lines), counted by message."""
    events: Counter[str] = Counter()
    for line in filter(str.strip, log.read_text(errors="replace").splitlines()):
        try:
            e = json.loads(line)
            events[f"{e.get('level')} {e.get('msg', '')}"] += 1
        except ValueError:
            events[line[:200]] += 1
    return [f"{n:>6}  {what}" for what, n in events.most_common()]


def promotions(run: Run, versions: list[str]) -> tuple[list[str], bool]:
    """A table row per promotion; all seen: the first answer naming the new version came after
    it was promoted, and no answer sent after that one named an older version."""
    order = {v: i for i, v in enumerate(versions)}
    seen = sorted((r.done, r.sent, r.version) for r in run.results if r.version)
    rows, ok_all = [], len(run.promotions) == 2
    for p in sorted(run.promotions, key=lambda p: p["began"]):
        first = next((d for d, _, v in seen if v == p["version"]), None)
        late = [v for _, s, v in seen if first and s > first and order[v] < order[p["version"]]]
        early = [d for d, _, v in seen if v == p["version"] and d < p["began"]]
        ok = p["rc"] == 0 and first is not None and not late and not early
        ok_all &= ok
        near = [r for r in run.results if p["began"] - 1 <= r.due <= (first or p["done"]) + 5]
        wall = dt.datetime.fromtimestamp(run.start_wall + p["began"] - run.start, dt.UTC)
        seen_at = f"{first - p['done']:.2f} s after" if first else "never"
        rows.append(
            f"| {p['version']} | {wall:%H:%M:%S} UTC | {p['rc']} | {seen_at} | "
            f"{len(late)} | {len(near)} / {sum(r.bad for r in near)} | "
            f"{'yes' if ok else 'NO'} |"
        )
    return rows, ok_all


def rss_slope(rss: list[tuple[float, float]], since: float) -> float:
    pts = [(t / 60, mb) for t, mb in rss if t >= since]
    return float(np.polyfit(*zip(*pts, strict=True), 1)[0]) if len(pts) >= 3 else float("nan")


def analyse(
    a: argparse.Namespace, run: Run, versions: list[str], server: dict[str, float], log: list[str]
) -> tuple[list[str], bool]:
    rs, dur = run.results, run.end - run.start
    lost = sum(r.status is None for r in rs)
    fives = sum((r.status or 0) >= 500 for r in rs)
    unexpected = sum(r.status is not None and r.status != r.kind.status for r in rs)
    malformed = sum(r.status == r.kind.status and r.error is not None for r in rs)
    measured = [r for r in rs if r.due >= run.start and r.status is not None]
    lat = [(r.done - r.due) * 1000 for r in measured]
    promo_rows, promo_ok = promotions(run, versions)
    settle = max((p["began"] - run.start for p in run.promotions), default=0.0) + 60
    rss = [mb for t, mb in run.rss if t >= 0] or [float("nan")]
    passed = not (lost or fives or unexpected or malformed or server.get("5xx")) and promo_ok
    if a.max_rss_slope is not None and not rss_slope(run.rss, dur / 2) <= a.max_rss_slope:
        passed = False
    groups = Counter(r.kind.group for r in rs)
    lines = [
        "| measure | result |",
        "|---|---|",
        f"| verdict | **{'PASS' if passed else 'FAIL'}** |",
        f"| measured / warm-up | {dur / 60:.1f} min / {a.warmup:.0f} s at {a.rate:g} req/s |",
        f"| requests (incl. warm-up) | {len(rs):,}: valid {groups['valid']:,}, invalid "
        f"{groups['invalid']:,}, GET {groups['get']:,} |",
        f"| 5xx / lost / unexpected status / malformed | {fives} / {lost} / {unexpected} / "
        f"{malformed} (server's own 5xx count: {server.get('5xx', 0):.0f}) |",
        f"| promotions seen | {sum(r.endswith('yes |') for r in promo_rows)} of 2 (server "
        f"reloads: {server.get('reloads success', 0):.0f} ok, "
        f"{server.get('reloads failure', 0):.0f} failed) |",
        f"| server RSS start / end / max | {rss[0]:.1f} / {rss[-1]:.1f} / {max(rss):.1f} MB |",
        f"| RSS slope: second half / from 60 s after the last promotion | "
        f"{rss_slope(run.rss, dur / 2):+.3f} / {rss_slope(run.rss, settle):+.3f} MB/min |",
        f"| latency p50 / p99 / max (from the scheduled time) | {pct(lat, 50):.1f} / "
        f"{pct(lat, 99):.1f} / {max(lat, default=float('nan')):.1f} ms |",
        "",
        "| promoted | at | exit | first answer naming it | older answers after | requests "
        "around / failed | seen |",
        "|---|---|---|---|---|---|---|",
        *promo_rows,
        "",
        "| kind | expected | answers | service p50 / p99 ms |",
        "|---|---|---|---|",
        *per_kind(rs),
    ]
    shown = Counter[str]()
    for r in sorted((r for r in rs if r.bad), key=lambda r: r.due):
        shown[r.kind.name] += 1
        if shown[r.kind.name] <= 3:  # the first three problems of each kind
            got = r.status or "no answer"
            lines.append(f"- t={r.due - run.start:.1f} s {r.kind.name}: got {got}: {r.error}")
    if log:
        lines += ["", "Server log, warnings and errors by message:", "", "```", *log, "```"]
    return lines, passed


def per_kind(rs: list[Result]) -> list[str]:
    by_kind: dict[str, list[Result]] = defaultdict(list)
    for r in rs:
        by_kind[r.kind.name].append(r)
    out = []
    for name, group in sorted(by_kind.items()):
        kind = group[0].kind
        statuses = Counter(str(r.status or "lost") for r in group)
        svc = [(r.done - r.sent) * 1000 for r in group if r.status is not None]
        out.append(
            f"| {name} | {kind.status}{' ' + kind.reason if kind.reason else ''} | "
            f"{', '.join(f'{s}: {n:,}' for s, n in sorted(statuses.items()))} | "
            f"{pct(svc, 50):.1f} / {pct(svc, 99):.1f} |"
        )
    return out
