"""The stand-in NPU's arithmetic: the board stand-in (standin.c) calls ``run`` for every model run
with the group's ONNX graph and the NPU-side addresses of its inputs and outputs.

Inputs are read in the model's dtypes (bf16 where Pulsar2 compiles bf16), widened to what the ONNX
graph takes, and the outputs are rounded back to the model's dtypes (round to nearest even, as the
NPU's bf16 output does) and written to NPU-side memory. Nothing here touches the CPU's view.
"""

from __future__ import annotations

import ctypes

import ml_dtypes
import numpy as np
import onnxruntime as ort

DTYPES = {
    "u8": np.uint8,
    "s8": np.int8,
    "u16": np.uint16,
    "s16": np.int16,
    "u32": np.uint32,
    "s32": np.int32,
    "f32": np.float32,
    "bf16": ml_dtypes.bfloat16,
}
ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(uint32)": np.uint32, "tensor(int64)": np.int64}

_sessions: dict[tuple[int, int], ort.InferenceSession] = {}
runs: list[tuple[int, int]] = []  # (model, group) of every run, for tests


def _session(model: int, group: int, onnx_address: int, onnx_size: int) -> ort.InferenceSession:
    key = (model, group)
    if key not in _sessions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        _sessions[key] = ort.InferenceSession(
            ctypes.string_at(onnx_address, onnx_size), options, providers=["CPUExecutionProvider"]
        )
    return _sessions[key]


def run(
    model: int, group: int, onnx_address: int, onnx_size: int, inputs: list, outputs: list
) -> None:
    session = _session(model, group, onnx_address, onnx_size)
    wanted = {i.name: ONNX_DTYPES[i.type] for i in session.get_inputs()}
    feeds = {}
    for name, dtype, shape, address, nbytes in inputs:
        data = np.frombuffer(ctypes.string_at(address, nbytes), DTYPES[dtype]).reshape(shape)
        feeds[name] = data.astype(wanted[name])
    for (name, dtype, shape, address, nbytes), value in zip(outputs, session.run(None, feeds)):
        data = np.ascontiguousarray(np.asarray(value).reshape(shape).astype(DTYPES[dtype]))
        assert data.nbytes == nbytes, f"{name}: {data.nbytes} bytes computed, {nbytes} expected"
        ctypes.memmove(address, data.ctypes.data, nbytes)
    runs.append((model, group))
