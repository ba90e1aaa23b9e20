"""What this CPU computes: whether onnxruntime's int8 GEMM is exact here, and the instruction sets
that decide how fast it is.

A quantised export's prompt decoder multiplies uint8 rows by int8 weights (MatMulIntegerToFloat).
Where the CPU has VNNI (AVX-512 or AVX), AMX or Arm's NEON, onnxruntime accumulates those products
in int32 and the result is exact. On x86 without them it multiplies with ``vpmaddubsw``, which adds
each pair of products in int16 and saturates (onnxruntime's quantization guide names this): a row of
large values came out wrong by up to 13 % on an AMD EPYC Zen 3, and the same export's answers then
depended on the CPU. So the engine asks the CPU, not a list of CPU names: ``int8_gemm_exact`` runs
u8 x s8 once on values that saturate any int16 pair sum and compares with the definition. Where it
is not exact, ``backend_onnxruntime.for_this_cpu`` changes the graphs as they load: the int8 weights
are read as uint8 (onnxruntime's u8 x u8 kernel widens to int16 first and is exact everywhere, but
takes 1.8x as long as u8 x s8 on an AVX-512 VNNI core, so it is not the default); an earlier
export's ViT in int8 blocks (MatMulNBits), whose int8 kernels there are slower than fp32, gets fp32
weights.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Flags as Linux's /proc/cpuinfo spells them, and the names a user knows them by.
X86_FEATURES = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_int8": "AMX-INT8",
}
ARM_FEATURES = {
    "asimd": "NEON",
    "asimddp": "dot product",
    "i8mm": "i8mm",
    "sve": "SVE",
    "sve2": "SVE2",
}


@dataclass(frozen=True)
class CpuInfo:
    machine: str  # x86_64, aarch64, ...
    model: str  # the model name, or "" where the kernel does not give one (most Arm cores)
    features: tuple[str, ...]  # those of X86_FEATURES / ARM_FEATURES the CPU has, by their names

    def describe(self) -> str:
        name = f"{self.model} ({self.machine})" if self.model else self.machine
        return f"{name}: {', '.join(self.features) or 'none of ' + ', '.join(self._known())}"

    def _known(self) -> list[str]:
        return list(
            (ARM_FEATURES if self.machine in ("aarch64", "arm64") else X86_FEATURES).values()
        )


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """The CPU as Linux describes it (first processor); elsewhere only the machine's name."""
    machine = platform.machine()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return CpuInfo(machine, "", ())
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    names = ARM_FEATURES if machine in ("aarch64", "arm64") else X86_FEATURES
    return CpuInfo(
        machine, fields.get("model name", ""), tuple(v for k, v in names.items() if k in flags)
    )


# Every int16 pair sum of these saturates: 2 x 255 x 127 > 32767. A row of 64 and 16 columns takes
# the GEMM kernel, not a matrix-vector shortcut, whatever the CPU.
_PROBE_ROWS, _PROBE_DEPTH, _PROBE_COLUMNS = 64, 64, 16


@functools.cache
def int8_gemm_exact() -> bool:
    """Whether onnxruntime multiplies uint8 rows by int8 weights exactly on this CPU (measured once
    per process, in a few milliseconds)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    rows = rng.integers(200, 256, (_PROBE_ROWS, _PROBE_DEPTH), dtype=np.uint8)
    weights = rng.choice(np.array([-128, -127, 126, 127], np.int8), (_PROBE_DEPTH, _PROBE_COLUMNS))
    zero = np.uint8(128)
    node = helper.make_node(
        "MatMulIntegerToFloat",
        ["a", "b", "a_scale", "b_scale", "a_zero"],
        ["y"],
        domain="com.microsoft",
    )
    graph = helper.make_graph(
        [node],
        "int8_gemm_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, list(rows.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [_PROBE_ROWS, _PROBE_COLUMNS])],
        [
            numpy_helper.from_array(weights, "b"),
            numpy_helper.from_array(np.float32(1), "a_scale"),
            numpy_helper.from_array(np.float32(1), "b_scale"),
            numpy_helper.from_array(zero, "a_zero"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"a": rows})[0]
    # |values| < 2**24: exact in float32
    expected = (rows.astype(np.int64) - int(zero)) @ weights.astype(np.int64)
    return bool(np.array_equal(got, expected.astype(np.float32)))


def int8_path() -> str:
    """How the int8 graphs multiply here, in words (the doctor's line)."""
    if int8_gemm_exact():
        return "int8 GEMM u8 x s8, exact here"
    return (
        "int8 GEMM u8 x s8 saturates here (x86 without VNNI): int8 weights are read as uint8 "
        "(u8 x u8), an earlier export's int8 ViT blocks as fp32"
    )
