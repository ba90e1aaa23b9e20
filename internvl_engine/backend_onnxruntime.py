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
import logging
import mmap
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .cpu import int8_gemm_exact
from .errors import BackendError
from .session import HostKV, nbytes, thread_count

MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <linux/mman.h>
HUGE_PAGE = 2 << 20
log = logging.getLogger(__name__)
_DTYPES = {"tensor(float)": np.float32, "tensor(uint32)": np.uint32, "tensor(int64)": np.int64}


def session_options(threads: int | None, spinning: bool = False) -> ort.SessionOptions:
    """Sequential runs on ``thread_count(threads)`` intra-op threads. ``spinning``: let idle threads
    spin between runs, only where sessions take turns seldom (see above)."""
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
    as fast at 384 tokens with huge pages, 1.03× at 2000 (docs/benchmarks.md). Only 2 MiB blocks
    with at least 3/4 of their pages in use are collapsed, so sparse memory (thread stacks, reserved
    heap) does not grow. Linux with transparent huge pages not "never"; MADV_COLLAPSE needs Linux
    6.1, and before it the advice alone lets khugepaged collapse the blocks in the background.
    Elsewhere nothing happens."""
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
        dense = np.concatenate(
            [[0], (resident.reshape(-1, per_block) & 1).sum(1) >= per_block * 3 // 4, [0]]
        )
        # runs of dense blocks: [begin, end) pairs
        edges = np.flatnonzero(np.diff(dense.astype(np.int8)))
        for first, last in zip(edges[::2], edges[1::2]):
            address, size = start + int(first) * HUGE_PAGE, int(last - first) * HUGE_PAGE
            if (
                libc.madvise(address, size, MADV_HUGEPAGE) == 0
                and libc.madvise(address, size, MADV_COLLAPSE) == 0
            ):
                collapsed += size
    return collapsed


def load_session(
    path: Path, options: ort.SessionOptions, many_rows: bool = False
) -> tuple[ort.InferenceSession, list[str]]:
    """A session of ``path`` on the CPU, and how its graph was changed for this CPU
    (``for_this_cpu``; nothing where the CPU multiplies int8 exactly). ``many_rows``: it runs many
    rows at a time (the ViT)."""
    try:
        if not int8_gemm_exact() and names_any(
            path, b"MatMulIntegerToFloat", b"MatMulNBits" if many_rows else None
        ):
            import onnx

            model = onnx.load(str(path))
            changes = for_this_cpu(model, many_rows)
            # Saved with its weights in a file beside it: protobuf takes seconds to serialise them.
            with tempfile.TemporaryDirectory(prefix="internvl-") as scratch:
                changed = Path(scratch) / path.name
                onnx.save_model(
                    model,
                    str(changed),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=changed.name + ".data",
                    size_threshold=1024,
                )
                del model
                session = ort.InferenceSession(
                    str(changed), options, providers=["CPUExecutionProvider"]
                )
            for change in changes:
                log.info("%s: %s", path.name, change)
            return session, changes
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), []
    # onnxruntime raises its own exception types (Fail, InvalidProtobuf, ...)
    except Exception as e:
        raise BackendError(
            f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0]}"
        ) from e


def names_any(path: Path, *names: bytes | None) -> bool:
    """Whether the model file names one of these operators (its weights may be in a file beside
    it)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return any(name and data.find(name) >= 0 for name in names)


def for_this_cpu(model, many_rows: bool) -> list[str]:
    """Change ``model`` (an onnx ModelProto) in place for a CPU whose int8 GEMM is not exact
    (``cpu.int8_gemm_exact``: x86 without VNNI), and say what changed:

    - MatMulIntegerToFloat's int8 weights B become uint8 B + 128, their zero point (0 where none
      is given) zero point + 128: the same products, through onnxruntime's u8 x u8 kernel, which is
      exact on every CPU (a 384-token prompt then took 0.60 of the decode graph's time, and a ViT
      tile 0.80 of fp32's, AVX2). Weights quantised to 7 bits would keep the faster u8 x s8 kernel
      exact (a tile at 0.64 of fp32's time) but left the ViT's features at cosine 0.9990 to fp32's;
      every row quantised to 7 bits instead (0..127, a scale per row) keeps it exact too, but took a
      tile only to 0.90 of u8 x u8's time (2.6 against 2.9 s) for features at 0.99946 (0.99973);
    - with ``many_rows``, an earlier export's ViT in MatMulNBits blocks gets fp32 weights of a plain
      MatMul: its int8 kernels there took a tile 1.24x as long as fp32, and multiplying its blocks
      in float (accuracy level 0) still 1.14x (AVX2, docs/benchmarks.md)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}

    def as_uint8(name: str) -> None:
        tensor = initializers[name]
        values = numpy_helper.to_array(tensor).view(np.uint8) ^ np.uint8(0x80)
        tensor.ClearField("int32_data")
        tensor.data_type, tensor.raw_data = TensorProto.UINT8, values.tobytes()

    converted: set[str] = set()
    nodes, dequantized = [], 0
    for node in list(graph.node):
        if node.op_type == "MatMulNBits" and many_rows:
            nodes += as_float_matmul(node, initializers, graph, helper, numpy_helper)
            dequantized += 1
            continue
        nodes.append(node)
        if node.op_type != "MatMulIntegerToFloat" or node.input[1] not in initializers:
            continue
        weights = node.input[1]
        if weights not in converted:
            if initializers[weights].data_type != TensorProto.INT8:
                continue  # uint8 already
            as_uint8(weights)
            converted.add(weights)
        zero = node.input[5] if len(node.input) > 5 else ""
        if zero and zero not in converted:
            as_uint8(zero)
            converted.add(zero)
        elif not zero:  # a_zero_point may be left out; a bias may follow
            node.input.extend([""] * (6 - len(node.input)))
            node.input[5] = "uint8_weights_zero_point"
    del graph.node[:]
    graph.node.extend(nodes)
    changes = []
    if converted:
        graph.initializer.append(numpy_helper.from_array(np.uint8(128), "uint8_weights_zero_point"))
        changes.append("int8 weights read as uint8 (u8 x u8)")
    if dequantized:
        changes.append("int8 blocks dequantized to fp32")
    return changes


def as_float_matmul(node, initializers: dict, graph, helper, numpy_helper) -> list:
    """MatMulNBits ``node`` as a MatMul of its weights dequantized to fp32 [K, N], then its bias
    added: the nodes to put in its place."""
    attributes = {a.name: a.i for a in node.attribute}
    k, n, bits, block = (
        attributes["K"],
        attributes["N"],
        attributes["bits"],
        attributes["block_size"],
    )
    packed = numpy_helper.to_array(initializers[node.input[1]])  # [N, blocks, block * bits / 8]
    scales = numpy_helper.to_array(initializers[node.input[2]]).reshape(n, -1)
    blocks = scales.shape[1]
    if bits == 4:  # two values a byte, low nibble first; zero points packed the same way
        values = np.stack([packed & 0xF, packed >> 4], -1).reshape(n, blocks, block)
    else:
        values = packed.reshape(n, blocks, block)
    zero_name = node.input[3] if len(node.input) > 3 else ""
    if zero_name:
        zeros = numpy_helper.to_array(initializers[zero_name]).reshape(n, -1)
        if bits == 4:
            zeros = np.stack([zeros & 0xF, zeros >> 4], -1).reshape(n, -1)
        zeros = zeros[:, :blocks].astype(np.float32)
    else:
        zeros = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    weight = ((values.astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(n, -1)[
        :, :k
    ]
    name = f"{node.input[1]}_fp32"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
    bias = node.input[5] if len(node.input) > 5 else ""
    if not bias:
        return [
            helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name)
        ]
    product = f"{node.output[0]}_without_bias"
    return [
        helper.make_node("MatMul", [node.input[0], name], [product], name=node.name),
        helper.make_node("Add", [product, bias], list(node.output)),
    ]


class OrtSession:
    def __init__(
        self, path: Path | list[Path], threads: int | None = None, many_rows: bool = False
    ):
        paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
        options = session_options(threads)
        self._sessions, changes = zip(*(load_session(p, options, many_rows) for p in paths))
        self.cpu_changes = changes[0]  # how the graphs were changed for this CPU (for_this_cpu)
        self.path = paths[0]
        self.groups = [
            {
                i.name: tuple(d if isinstance(d, int) else None for d in i.shape)
                for i in s.get_inputs()
            }
            for s in self._sessions
        ]
        if len({tuple(g) for g in self.groups}) != 1:
            raise BackendError(f"{self.path}: the group files do not share one input list")
        self.bytes_moved = 0
        self.busy_s = 0.0
        self._kv: HostKV | None = None

    def input_dtype(self, name: str) -> np.dtype:
        return np.dtype(
            _DTYPES[next(i.type for i in self._sessions[0].get_inputs() if i.name == name)]
        )

    def run(self, feeds: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]:
        outputs = self._run(feeds, group)
        self.bytes_moved += nbytes(feeds.values()) + nbytes(outputs)
        return outputs

    def attach_kv(self, rows: int, kv_dim: int, dtype: np.dtype) -> None:
        self._kv = HostKV(rows, kv_dim, dtype)

    def run_resident(
        self, feeds: dict[str, np.ndarray], group: int, start: int, rows: int
    ) -> np.ndarray:
        capacity = feeds["mask"].shape[2] - feeds["indices"].shape[1]
        k, v, hidden = self._run(
            feeds | self._kv.history(self.groups[group]["K_cache"], capacity), group
        )
        self.bytes_moved += (
            nbytes(feeds.values()) + hidden.nbytes + self._kv.append(k, v, start, rows)
        )
        return hidden

    def _run(self, feeds: dict[str, np.ndarray], group: int) -> list[np.ndarray]:
        started = time.perf_counter()
        try:
            return self._sessions[group].run(None, feeds)
        except Exception as e:
            raise BackendError(
                f"onnxruntime failed running {self.path.name}: {str(e).strip().splitlines()[0]}"
            ) from e
        finally:
            self.busy_s += time.perf_counter() - started
