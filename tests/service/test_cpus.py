"""How many CPUs the process may use: affinity and cgroup quotas, read from fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.cpus import affinity_cpus, cgroup_quota, usable_cpus

V2_SELF = "0::/system.slice/job.service\n"
V1_SELF = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"


def tree(root: Path, files: dict[str, str], self_cgroup: str) -> tuple[Path, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(parents=True, exist_ok=True)
    proc = root / "proc-self-cgroup"
    proc.write_text(self_cgroup)
    return root / "sys", proc


@pytest.mark.parametrize(
    "files,quota",
    [
        ({"sys/system.slice/job.service/cpu.max": "150000 100000\n"}, 1.5),
        ({"sys/system.slice/job.service/cpu.max": "max 100000\n"}, None),
        # the parent's limit binds the child that has none of its own
        (
            {
                "sys/system.slice/cpu.max": "50000 100000\n",
                "sys/system.slice/job.service/cpu.max": "max 100000\n",
            },
            0.5,
        ),
        # the tightest of child and parent
        (
            {
                "sys/system.slice/cpu.max": "400000 100000\n",
                "sys/system.slice/job.service/cpu.max": "300000 100000\n",
            },
            3.0,
        ),
        # in a container the host's path is absent; the mount point is the container's cgroup
        ({"sys/cpu.max": "200000 100000\n"}, 2.0),
        ({}, None),
        ({"sys/cpu.max": "garbage\n"}, None),
        ({"sys/cpu.max": "0 100000\n"}, None),
    ],
)
def test_cgroup_v2_quota(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    root, proc = tree(tmp_path, files, V2_SELF)
    assert cgroup_quota(root, proc) == quota


@pytest.mark.parametrize(
    "files,quota",
    [
        (
            {
                "sys/cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
                "sys/cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            },
            2.5,
        ),
        (
            {"sys/cpu/cpu.cfs_quota_us": "100000\n", "sys/cpu/cpu.cfs_period_us": "50000\n"},
            2.0,
        ),
        ({"sys/cpu/cpu.cfs_quota_us": "-1\n", "sys/cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"sys/cpu/cpu.cfs_quota_us": "100000\n"}, None),  # no period: no reading
        ({}, None),
    ],
)
def test_cgroup_v1_quota(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    root, proc = tree(tmp_path, files, V1_SELF)
    assert cgroup_quota(root, proc) == quota


def test_unreadable_proc_file_still_reads_the_mount_points_own_limit(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert cgroup_quota(tmp_path, tmp_path / "no-such-file") == 1.0


def test_usable_cpus_is_the_quota_rounded_down_within_the_affinity_mask(tmp_path: Path) -> None:
    mask = affinity_cpus()
    assert mask == len(os.sched_getaffinity(0))
    for text, expected in [
        ("150000 100000", 1),  # 1.5 CPUs: a second thread would run half the time
        ("20000 100000", 1),  # a fifth of a CPU: still one thread
        ("6400000 100000", mask),  # a quota above the mask: the mask
        ("max 100000", mask),
    ]:
        root, proc = tree(tmp_path, {"sys/cpu.max": text}, "0::/\n")
        assert usable_cpus(root, proc) == expected, text
    root, proc = tree(tmp_path / "none", {}, "0::/\n")
    assert usable_cpus(root, proc) == mask


def test_usable_cpus_follows_the_affinity_mask() -> None:
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip("needs 2 CPUs")
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert usable_cpus() == len(before)
