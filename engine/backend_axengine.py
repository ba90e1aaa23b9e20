"""axengine backend: Pulsar2 ``.axmodel`` files on the AX650N NPU through pyaxengine.

pyaxengine exists only on AXERA boards, so it is imported when a session is opened. Its API mirrors
onnxruntime (``InferenceSession(path, providers=[...])``, ``get_inputs(group)``,
``run(None, feed, shape_group=g)``), checks shapes and dtypes exactly (bf16 as
``ml_dtypes.bfloat16``) and returns outputs by position.

KV cache in place. pyaxengine gives every input one device buffer sized for its largest group and
shared by all groups, and its ``run()`` copies every input in and every output out, which for the
decode group means the whole cache (about 31 MB per token for InternVL2.5-1B). A group with history
capacity C reads the first C rows of the K_cache/V_cache buffers, so the cache can stay in those
buffers: each run writes only the small inputs (hidden states, positions, mask) and then moves the
new K/V rows from the output buffers to their rows in the cache buffers. That relies on these
pyaxengine internals (both the 0.1.x ``ax_session`` and the later ``_axe`` layouts have them):
the session's ``_io`` (``AX_ENGINE_IO_T`` with ``pInputs``/``pOutputs``: ``phyAddr``, ``pVirAddr``,
``nSize``), ``_handle``, ``_context``, ``_shape_count``, and the C API ``AX_ENGINE_RunGroupIOSync`` /
``AX_ENGINE_RunSyncV2``, ``AX_SYS_MflushCache``, ``AX_SYS_MinvalidateCache`` through its cffi
objects. Where they are missing (another pyaxengine, or the AXCLRT PCIe provider, whose buffers
are not host-mapped), the session logs a warning and the engine keeps the cache and calls ``run()``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import BackendError
from .session import nbytes

PROVIDERS = ("AxEngineExecutionProvider", "AXCLRTExecutionProvider")
log = logging.getLogger(__name__)


def _import_axengine():
    try:
        import axengine
    except ImportError as e:
        raise BackendError(f"the axengine backend needs pyaxengine, which exists only on AXERA boards ({e}); "
                           "install its wheel from https://github.com/AXERA-TECH/pyaxengine/releases "
                           "(pip3 install axengine-x.y.z-py3-none-any.whl)") from None
    return axengine


class AxEngineSession:
    def __init__(self, path: Path, provider: str | None = None):
        axengine = _import_axengine()
        available = list(axengine.get_available_providers())
        if provider is None:
            provider = next((p for p in PROVIDERS if p in available), None)
        if provider not in available:
            raise BackendError(f"axengine provider {provider!r} is not available here (available: {available})")
        self.path, self.provider = Path(path), provider
        try:
            self._session = axengine.InferenceSession(str(path), providers=[provider])
        except Exception as e:  # pyaxengine raises RuntimeError/ValueError/AssertionError
            raise BackendError(f"axengine cannot load {path}: {e}") from None
        self._inputs, self._outputs = [], []
        while True:  # pyaxengine has no public group count; get_inputs(g) fails past the last group
            try:
                inputs, outputs = self._session.get_inputs(len(self._inputs)), self._session.get_outputs(len(self._inputs))
            except (ValueError, IndexError):
                break
            self._inputs.append(inputs)
            self._outputs.append(outputs)
        self.groups = [{i.name: tuple(int(d) for d in i.shape) for i in g} for g in self._inputs]
        self.bytes_moved = 0
        self.busy_s = 0.0
        self._device = None  # pyaxengine internals, when the KV cache stays in its buffers

    def input_dtype(self, name: str) -> np.dtype:
        return np.dtype(next(i.dtype for i in self._inputs[0] if i.name == name))

    def _cast(self, feeds: dict[str, np.ndarray], group: int) -> dict[str, np.ndarray]:
        out = {}
        for spec in self._inputs[group]:
            if spec.name in feeds:
                out[spec.name] = np.ascontiguousarray(feeds[spec.name], dtype=_numpy_dtype(spec.dtype))
        return out

    def run(self, feeds: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]:
        feeds = self._cast(feeds, group)
        started = time.perf_counter()
        try:
            outputs = self._session.run(None, feeds, shape_group=group)
        except Exception as e:
            raise BackendError(f"axengine failed running {self.path.name} (group {group}): {e}") from None
        finally:
            self.busy_s += time.perf_counter() - started
        self.bytes_moved += nbytes(feeds.values()) + nbytes(outputs)
        return outputs

    def attach_kv(self, rows: int, kv_dim: int, dtype: np.dtype) -> bool:
        try:
            self._device = _DeviceIO(self._session, self._inputs, self._outputs)
            self._device.check_kv(rows * kv_dim * np.dtype(dtype).itemsize)
        except Exception as e:  # anything missing or different in this pyaxengine
            log.warning("%s: the KV cache cannot stay in pyaxengine's buffers (%s); falling back to run(), "
                        "which copies the whole cache every token", self.path.name, e)
            self._device = None
            return False
        return True

    def run_resident(self, feeds: dict[str, np.ndarray], group: int, start: int, rows: int) -> np.ndarray:
        feeds = self._cast(feeds, group)
        capacity = feeds["mask"].shape[2] - feeds["indices"].shape[1]
        started = time.perf_counter()
        try:
            hidden, moved = self._device.run(feeds, group, start, rows, no_history=capacity == 0)
        except Exception as e:
            raise BackendError(f"axengine failed running {self.path.name} (group {group}): {e}") from None
        finally:
            self.busy_s += time.perf_counter() - started
        self.bytes_moved += moved
        return hidden


def _numpy_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


class _DeviceIO:
    """pyaxengine's device buffers, driven directly (see the module docstring for what it relies on)."""

    def __init__(self, session, inputs, outputs):
        inner = getattr(session, "_sess", session)  # InferenceSession wraps the provider's session
        self.io, self.handle, self.context = inner._io[0], inner._handle[0], inner._context[0]
        self.group_count = inner._shape_count
        if hasattr(inner, "_engine_lib"):  # pyaxengine 0.1.x keeps the libraries on the session
            self.ffi, self.engine, self.sys = inner._engine_ffi, inner._engine_lib, inner._sys_lib
        else:
            from axengine import _axe_capi

            self.ffi, self.engine, self.sys = _axe_capi.engine_cffi, _axe_capi.engine_lib, _axe_capi.sys_lib
        for name in ("AX_ENGINE_RunGroupIOSync", "AX_ENGINE_RunSyncV2"):
            getattr(self.engine, name)
        for name in ("AX_SYS_MflushCache", "AX_SYS_MinvalidateCache"):
            getattr(self.sys, name)
        self.inputs, self.outputs = inputs, outputs
        names = [i.name for i in inputs[0]]
        self.k_in, self.v_in = names.index("K_cache"), names.index("V_cache")
        self.hidden_out = len(outputs[0]) - 1  # outputs: K, V, output

    def check_kv(self, cache_bytes: int) -> None:
        for i in (self.k_in, self.v_in):
            if self.io.pInputs[i].nSize < cache_bytes:
                raise BackendError(f"K/V buffer of {self.io.pInputs[i].nSize} bytes is smaller than the cache "
                                   f"({cache_bytes} bytes)")

    def _addr(self, buffer, offset: int):
        return self.ffi.cast("char *", buffer.pVirAddr) + offset, buffer.phyAddr + offset

    def _write(self, buffer, data: np.ndarray, offset: int = 0) -> None:
        vir, phy = self._addr(buffer, offset)
        self.ffi.memmove(vir, self.ffi.cast("void *", data.ctypes.data), data.nbytes)
        self.sys.AX_SYS_MflushCache(phy, vir, data.nbytes)

    def run(self, feeds: dict[str, np.ndarray], group: int, start: int, rows: int, no_history: bool):
        moved = 0
        for i, spec in enumerate(self.inputs[group]):
            if spec.name in feeds:
                self._write(self.io.pInputs[i], feeds[spec.name])
                moved += feeds[spec.name].nbytes
            elif no_history:  # the no-history group's dummy K/V is zeros
                shape = tuple(spec.shape)
                self._write(self.io.pInputs[i], np.zeros(shape, _numpy_dtype(spec.dtype)))
        if self.group_count > 1:
            ret = self.engine.AX_ENGINE_RunGroupIOSync(self.handle, self.context, group, self.io)
        else:
            ret = self.engine.AX_ENGINE_RunSyncV2(self.handle, self.context, self.io)
        if ret != 0:
            raise BackendError(f"AX_ENGINE run returned {ret:#x}")
        outputs = self.outputs[group]
        for out_index, in_index in ((0, self.k_in), (1, self.v_in)):  # new K/V rows -> their cache rows
            spec, buffer = outputs[out_index], self.io.pOutputs[out_index]
            row_bytes = int(np.prod(spec.shape[2:])) * _numpy_dtype(spec.dtype).itemsize
            self.sys.AX_SYS_MinvalidateCache(buffer.phyAddr, buffer.pVirAddr, rows * row_bytes)
            vir, phy = self._addr(self.io.pInputs[in_index], start * row_bytes)
            self.ffi.memmove(vir, self.ffi.cast("char *", buffer.pVirAddr), rows * row_bytes)
            self.sys.AX_SYS_MflushCache(phy, vir, rows * row_bytes)
            moved += rows * row_bytes
        spec, buffer = outputs[self.hidden_out], self.io.pOutputs[self.hidden_out]
        dtype = _numpy_dtype(spec.dtype)
        size = int(np.prod(spec.shape)) * dtype.itemsize
        self.sys.AX_SYS_MinvalidateCache(buffer.phyAddr, buffer.pVirAddr, size)
        hidden = np.frombuffer(self.ffi.buffer(buffer.pVirAddr, size), dtype=dtype).reshape(spec.shape).copy()
        return hidden, moved + hidden.nbytes
