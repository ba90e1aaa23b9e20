"""The one interface every backend implements (``backends.py`` chooses and opens one), and what
every backend shares: the CPU threads a session gets, the host-side KV cache.

A session runs one model, which may have several fixed-shape groups (Pulsar2 shape groups; an
``internvl-export --contract axmodel`` layer is one ONNX file per group). ``run(feeds, group)``
takes numpy arrays by input name and returns the outputs as a list in the model's order (pyaxengine
mishandles output-name subsets, so outputs are always taken by position).

Decoder-layer sessions can also keep the KV cache in their own input buffers, as pyaxengine does
with its device buffers: ``attach_kv`` sizes them (or raises BackendError saying why it cannot),
``run_resident`` runs a group on the rows already there and appends the new rows. ``bytes_moved``
counts what the engine hands to and takes from the backend, so the timings can report host traffic
per decode step.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

import numpy as np


class Session(Protocol):
    groups: list[
        dict[str, tuple]
    ]  # input name -> shape, per group; a dimension is an int or None (dynamic)
    bytes_moved: int  # handed to and taken from the backend so far
    busy_s: float  # time inside backend calls so far

    def input_dtype(self, name: str) -> np.dtype: ...

    def run(self, feeds: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]: ...

    def attach_kv(self, rows: int, kv_dim: int, dtype: np.dtype) -> None: ...

    def run_resident(
        self, feeds: dict[str, np.ndarray], group: int, start: int, rows: int
    ) -> np.ndarray: ...


def thread_count(threads: int | None) -> int:
    """The CPU threads a session (or a peer runtime in the bench) gets: ``threads``, or for None or
    0 every core this process may run on (``taskset``, a container's cpuset), and no more than its
    CPU quota rounded up (``docker run --cpus``, a Kubernetes CPU limit). Above the quota every
    thread waits once it is spent: 16 threads on a quota of 2 decoded 5x slower than 2
    (docs/benchmarks.md)."""
    if threads:
        return threads
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # macOS
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cpu_quota(root: Path = Path("/")) -> float | None:
    """The CPUs this process's cgroups allow it (quota / period, the smallest along the way up), or
    None where none is set or there are no cgroups. ``root``: where /proc and /sys are."""
    try:
        memberships = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:  # not Linux
        return None
    quotas = []
    for line in memberships:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: "max 100000" or "150000 100000"
            mount, files = root / "sys/fs/cgroup", ["cpu.max"]
        elif "cpu" in controllers.split(","):  # cgroup v1: a quota of -1 means none
            mount, files = root / "sys/fs/cgroup/cpu", ["cpu.cfs_quota_us", "cpu.cfs_period_us"]
        else:
            continue
        # A limit on any ancestor holds too. In a container the process's own cgroup is the mount's
        # root and the path (the host's) is not found under it: walking up reaches it.
        directory = mount / path.strip("/")
        for d in (directory, *directory.parents):
            try:
                quota, period = " ".join((d / f).read_text() for f in files).split()
                if quota not in ("max", "-1"):
                    quotas.append(int(quota) / int(period))
            except (OSError, ValueError):  # not there (another hierarchy, or no cpu controller)
                pass
            if d == mount:
                break
    return min(quotas, default=None)


def nbytes(arrays) -> int:
    return sum(int(a.nbytes) for a in arrays)


class HostKV:
    """KV rows kept in host arrays shaped like the largest group's K/V inputs, fed to the backend
    as views (no copy). The onnxruntime backend keeps its cache this way."""

    def __init__(self, rows: int, kv_dim: int, dtype: np.dtype):
        self.k = np.zeros((1, rows, kv_dim), dtype)
        self.v = np.zeros((1, rows, kv_dim), dtype)

    def history(self, shape: tuple, capacity: int) -> dict[str, np.ndarray]:
        if shape is None or None in shape or tuple(shape) == (1, capacity, self.k.shape[-1]):
            return {"K_cache": self.k[:, :capacity], "V_cache": self.v[:, :capacity]}
        dummy = np.zeros(shape, self.k.dtype)  # the no-history group's placeholder
        return {"K_cache": dummy, "V_cache": dummy}

    def append(self, k: np.ndarray, v: np.ndarray, start: int, rows: int) -> int:
        self.k[:, start : start + rows] = k[:, :rows]
        self.v[:, start : start + rows] = v[:, :rows]
        return 2 * rows * self.k.shape[-1] * self.k.itemsize
