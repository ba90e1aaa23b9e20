"""onnxruntime backend (CPU).

Thread pools: the engine holds 26+ sessions (ViT, one per decoder layer, post) that run one after
another. With onnxruntime's default spinning intra-op threads, idle pools keep spinning and starve
the pool that is working (measured 372 ms vs 31.5 ms for a 24-layer decode step), so spinning is
off and inter-op parallelism is off.

A model is one ONNX file (dynamic shapes) or one file per fixed-shape group (``--contract
axmodel``). The KV cache of a layer lives in host arrays owned by the session (:class:`HostKV`),
handed to onnxruntime as views; numpy inputs on the CPU are read in place, so only the new rows
are copied per step.
"""
from __future__ import annotations

import ctypes
import mmap
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BackendError
from .session import HostKV, nbytes, thread_count

MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <linux/mman.h>
HUGE_PAGE = 2 << 20
_DTYPES = {"tensor(float)": np.float32, "tensor(uint32)": np.uint32, "tensor(int64)": np.int64}


def session_options(threads: int | None, spinning: bool = False) -> ort.SessionOptions:
    """Sequential runs on ``thread_count(threads)`` intra-op threads. ``spinning``: let idle threads spin
    between runs, only where sessions take turns seldom (see above)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = thread_count(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def back_with_huge_pages() -> int:
    """Back this process's private memory that is in use (chiefly the weights onnxruntime has just
    loaded) with 2 MiB pages, and return how many bytes now are. A decode step streams every weight
    once, and with 4 KiB pages the CPU also walks the page tables for each: int4 decoding ran 1.06×
    as fast at 384 tokens with huge pages, 1.03× at 2000 (docs/benchmarks.md). Only 2 MiB blocks with
    at least 3/4 of their pages in use are collapsed, so sparse memory (thread stacks, reserved heap)
    does not grow.
    Linux with transparent huge pages not "never"; MADV_COLLAPSE needs Linux 6.1, and before it the
    advice alone lets khugepaged collapse the blocks in the background. Elsewhere nothing happens."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    per_block = HUGE_PAGE // mmap.PAGESIZE
    collapsed = 0
    for line in maps.read_text().splitlines():
        fields = line.split()  # range, perms, offset, device, inode, path (none: anonymous)
        named = fields[5] if len(fields) > 5 else ""
        if fields[1] != "rw-p" or (named and named != "[heap]" and not named.startswith("[anon")):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        start, end = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
        if end <= start:
            continue
        resident = np.zeros((end - start) // mmap.PAGESIZE, np.uint8)
        if libc.mincore(start, end - start, resident.ctypes.data) != 0:
            continue
        dense = np.concatenate([[0], (resident.reshape(-1, per_block) & 1).sum(1) >= per_block * 3 // 4, [0]])
        edges = np.flatnonzero(np.diff(dense.astype(np.int8)))  # runs of dense blocks: [begin, end) pairs
        for first, last in zip(edges[::2], edges[1::2]):
            address, size = start + int(first) * HUGE_PAGE, int(last - first) * HUGE_PAGE
            if libc.madvise(address, size, MADV_HUGEPAGE) == 0 and libc.madvise(address, size, MADV_COLLAPSE) == 0:
                collapsed += size
    return collapsed


def load_session(path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf, ...)
        raise BackendError(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0]}") from e


class OrtSession:
    def __init__(self, path: Path | list[Path], threads: int | None = None):
        paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
        options = session_options(threads)
        self._sessions = [load_session(p, options) for p in paths]
        self.path = paths[0]
        self.groups = [{i.name: tuple(d if isinstance(d, int) else None for d in i.shape) for i in s.get_inputs()}
                       for s in self._sessions]
        if len({tuple(g) for g in self.groups}) != 1:
            raise BackendError(f"{self.path}: the group files do not share one input list")
        self.bytes_moved = 0
        self.busy_s = 0.0
        self._kv: HostKV | None = None

    def input_dtype(self, name: str) -> np.dtype:
        return np.dtype(_DTYPES[next(i.type for i in self._sessions[0].get_inputs() if i.name == name)])

    def run(self, feeds: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]:
        outputs = self._run(feeds, group)
        self.bytes_moved += nbytes(feeds.values()) + nbytes(outputs)
        return outputs

    def attach_kv(self, rows: int, kv_dim: int, dtype: np.dtype) -> None:
        self._kv = HostKV(rows, kv_dim, dtype)

    def run_resident(self, feeds: dict[str, np.ndarray], group: int, start: int, rows: int) -> np.ndarray:
        capacity = feeds["mask"].shape[2] - feeds["indices"].shape[1]
        k, v, hidden = self._run(feeds | self._kv.history(self.groups[group]["K_cache"], capacity), group)
        self.bytes_moved += nbytes(feeds.values()) + hidden.nbytes + self._kv.append(k, v, start, rows)
        return hidden

    def _run(self, feeds: dict[str, np.ndarray], group: int) -> list[np.ndarray]:
        started = time.perf_counter()
        try:
            return self._sessions[group].run(None, feeds)
        except Exception as e:
            raise BackendError(f"onnxruntime failed running {self.path.name}: {str(e).strip().splitlines()[0]}") from e
        finally:
            self.busy_s += time.perf_counter() - started
