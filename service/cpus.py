"""How many CPUs this process may really use, for choosing thread counts.

``os.cpu_count()`` is the host's count. A process may be pinned to fewer (``taskset``,
``docker --cpuset-cpus``: the affinity mask) or given a CPU-time quota (``docker --cpus``,
Kubernetes limits: the cgroup's ``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us`` in v1). More threads than that gain nothing: a thread pool whose threads
cannot all run at once waits at every barrier for the one that is descheduled (and spins while
it waits), so work that took 12 s can take minutes.

The quota is rounded down (1.5 CPUs -> 1 thread: a second thread would run only half the time).
Parent cgroups are read too, since their limits bind their children. No limit found -> the
affinity mask alone. Always at least 1.

Bulk scoring (``vae-anomaly score``) runs one onnxruntime thread per usable CPU.

Training runs ``TRAINING_THREADS`` = 1 torch thread unless ``--threads`` (config ``threads``)
says otherwise. Measured by bench/busy_training.py (bench/results/busy_training.md), whole
trainings of the smallest and largest models the sizing rule makes (6 columns x 8,000 rows; 30
columns x 100,000 rows; 256 columns x 20,000 rows, hidden layers 512 and 256) were no faster with
a second thread without neighbours (the layers are too small for the work split to pay for its
barriers); torch's default (a thread per core, spinning at barriers) was 1.4-3.6x slower, or
past 90 s, as soon as other work shared the cores, and beside busy lower-priority processes
1 thread stayed near the fair-share slowdown (1.7x; 3.2-3.5x with a shared machine's load on
top). So the model's size does not change the choice, and neither does the
number of usable CPUs (which only matters to bulk scoring).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
V1_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
TRAINING_THREADS = 1  # torch threads when the config does not say; see above

# the most threads a user may ask for (--threads, config threads): more than any machine we run
# on has cores; past it is a typo (100000 made thread stacks exhaust memory: a hang, a crash)
MAX_THREADS = 256


def affinity_cpus() -> int:
    """CPUs in the affinity mask (all the host's where the platform has no mask)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process may keep busy: the affinity mask's size, capped by any cgroup quota."""
    quota = cgroup_quota(cgroup_root, proc_cgroup)
    cpus = affinity_cpus()
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)


def cgroup_quota(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The smallest CPU quota (in CPUs) on this process's cgroup and its parents; None if none."""
    v2_path, v1_path = _own_cgroups(proc_cgroup)
    quotas: list[float | None] = []
    if v2_path is not None:
        quotas += (_v2_quota(d) for d in _lineage(cgroup_root, v2_path))
    if v1_path is not None:
        for mount in V1_MOUNTS:
            quotas += (_v1_quota(d) for d in _lineage(cgroup_root / mount, v1_path))
    found = [q for q in quotas if q is not None and q > 0]
    return min(found) if found else None


def _own_cgroups(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup path in the v2 hierarchy and in v1's cpu controller (if any).

    An unreadable file means no cgroup information: treat the process's path as the root."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return "/", "/"
    v2 = v1 = None
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _lineage(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and each of its parents up to ``mount``. In a container the path is often
    that of the host's hierarchy and absent from the container's view, where the mount point
    itself is the container's cgroup: reading every level covers both."""
    parts = [p for p in path.split("/") if p and p != ".."]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _v2_quota(d: Path) -> float | None:
    """``cpu.max`` holds "<quota> <period>" in microseconds, or "max <period>" (no limit)."""
    text = _read(d / "cpu.max")
    if text is None:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_quota(d: Path) -> float | None:
    """``cpu.cfs_quota_us`` is -1 when there is no limit."""
    quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None
