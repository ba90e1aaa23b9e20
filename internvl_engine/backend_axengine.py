"""axengine backend: Pulsar2 ``.axmodel`` files on the AX650N NPU through pyaxengine.

pyaxengine exists only on AXERA boards, so it is imported when a session is opened. Its API mirrors
onnxruntime (``InferenceSession(path, providers=[...])``, ``get_inputs(group)``,
``run(None, feed, shape_group=g)``), checks shapes and dtypes exactly (bf16 as
``ml_dtypes.bfloat16``) and returns outputs by position. Up to 0.1.3rc0 ``run()`` returns views of
its one output buffer, which the next run overwrites, so outputs are copied here. pyaxengine prints
``[INFO]`` lines on stdout; they go to this module's log instead, so stdout stays the program's.

KV cache in place. pyaxengine gives every input one device buffer sized for its largest group and
shared by all groups, and its ``run()`` copies every input in and every output out, which for the
decode group means the whole cache (about 31 MB per token for InternVL2.5-1B). A group with history
capacity C reads the first C rows of the K_cache/V_cache buffers, so the cache can stay in those
buffers: each run writes only the small inputs (hidden states, positions, mask) and then moves the
new K/V rows from the output buffers to their rows in the cache buffers. Two transports do this:

- on-board NPU (AxEngineExecutionProvider): CMM buffers mapped into the host but not coherent with
  the NPU, so every host write is flushed and every NPU output invalidated, over exactly its range;
- PCIe card (AXCLRTExecutionProvider): device memory reached only through ``axclrtMemcpy``; new rows
  move device to device.

Both drive pyaxengine internals (the session's ``_io``, ``_handle``/``_model_id``, ``_context``/
``_context_id``, and its cffi libraries). Whether that works is decided by trying: ``attach_kv``
zeroes the cache buffers (CMM allocations start as garbage, and masked columns still enter the
decode matmul, so a NaN pattern left there poisons every answer), then runs two decode steps in
place and the same two through ``run()``, and keeps the cache in place only if they agree.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import BackendError
from .session import nbytes

PROVIDERS = ("AxEngineExecutionProvider", "AXCLRTExecutionProvider")
MASK_BLOCKED = -65536.0
log = logging.getLogger(__name__)


@contextlib.contextmanager
def _stdout_to_log():
    """pyaxengine reports with print(); keep its lines in the log, off the program's stdout."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        for line in captured.getvalue().splitlines():
            if line.strip():
                log.debug("pyaxengine: %s", line.strip())


def import_axengine():
    try:
        with _stdout_to_log():
            import axengine
    # off-board: no providers, or a library pyaxengine asserts on
    except (
        ImportError,
        AssertionError,
    ) as e:
        raise BackendError(
            f"the axengine backend needs pyaxengine and the board's NPU libraries ({e}); "
            "install pyaxengine's wheel from https://github.com/AXERA-TECH/pyaxengine/releases "
            "(docs/board.md)"
        ) from e
    return axengine


def numpy_dtype(dtype) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


def _owned(array: np.ndarray) -> np.ndarray:
    """A copy when ``array`` is a view of pyaxengine's output buffer (versions before 0.1.3.rc1)."""
    return array if array.flags.owndata else array.copy()


class AxEngineSession:
    def __init__(self, path: Path, provider: str | None = None):
        axengine = import_axengine()
        available = list(axengine.get_available_providers())
        if provider is None:
            provider = next((p for p in PROVIDERS if p in available), None)
        if provider not in available:
            raise BackendError(
                f"axengine provider {provider!r} is not available here (available: {available})"
            )
        self.path, self.provider = Path(path), provider
        try:
            with _stdout_to_log():
                self._session = axengine.InferenceSession(str(path), providers=[provider])
        except Exception as e:  # pyaxengine raises RuntimeError/ValueError/AssertionError
            raise BackendError(f"axengine cannot load {path}: {e}") from e
        self._inputs, self._outputs = [], []
        while True:  # pyaxengine has no public group count; get_inputs(g) fails past the last group
            try:
                inputs, outputs = (
                    self._session.get_inputs(len(self._inputs)),
                    self._session.get_outputs(len(self._inputs)),
                )
            except (ValueError, IndexError):
                break
            self._inputs.append(inputs)
            self._outputs.append(outputs)
        self.groups = [{i.name: tuple(int(d) for d in i.shape) for i in g} for g in self._inputs]
        self.output_dtypes = [numpy_dtype(o.dtype) for o in self._outputs[0]]
        self.bytes_moved = 0
        self.busy_s = 0.0
        self._device: _DeviceIO | None = None  # set when the KV cache stays in the device buffers

    def input_dtype(self, name: str) -> np.dtype:
        return numpy_dtype(next(i.dtype for i in self._inputs[0] if i.name == name))

    def _cast(self, feeds: dict[str, np.ndarray], group: int) -> dict[str, np.ndarray]:
        return {
            spec.name: np.ascontiguousarray(feeds[spec.name], dtype=numpy_dtype(spec.dtype))
            for spec in self._inputs[group]
            if spec.name in feeds
        }

    def run(self, feeds: dict[str, np.ndarray], group: int = 0) -> list[np.ndarray]:
        feeds = self._cast(feeds, group)
        started = time.perf_counter()
        try:
            with _stdout_to_log():
                outputs = [_owned(o) for o in self._session.run(None, feeds, shape_group=group)]
        except Exception as e:
            raise BackendError(
                f"axengine failed running {self.path.name} (group {group}): {e}"
            ) from e
        finally:
            self.busy_s += time.perf_counter() - started
        self.bytes_moved += nbytes(feeds.values()) + nbytes(outputs)
        return outputs

    def attach_kv(self, rows: int, kv_dim: int, dtype: np.dtype) -> None:
        """Keep the KV cache in the K_cache/V_cache device buffers, or raise BackendError saying why
        not."""
        try:
            device = _DeviceIO(self._session, self._inputs, self._outputs)
        except Exception as e:  # anything missing or different in this pyaxengine or provider
            raise BackendError(
                f"{self.path.name}: pyaxengine's {self.provider} buffers cannot be driven directly "
                f"({type(e).__name__}: {e})"
            ) from e
        cache_bytes = rows * kv_dim * np.dtype(dtype).itemsize
        for index in (device.k_in, device.v_in):
            if device.buffers.input_size(index) < cache_bytes:
                raise BackendError(
                    f"{self.path.name}: K/V buffer of {device.buffers.input_size(index)} bytes is "
                    f"smaller than the cache ({cache_bytes} bytes)"
                )
        try:
            device.clear_cache()
            self._probe(device)
            device.clear_cache()
        except Exception as e:
            raise BackendError(
                f"{self.path.name}: the KV cache does not work in the device buffers "
                f"({type(e).__name__}: {e})"
            ) from e
        self._device = device

    def _probe(self, device: "_DeviceIO") -> None:
        """Two decode steps in place and the same two through run(), which must agree."""
        group = next(g for g, shapes in enumerate(self.groups) if shapes["indices"] == (1, 1))
        shapes = self.groups[group]
        dtype = self.input_dtype("input")
        capacity = shapes["K_cache"][1]
        rng = np.random.default_rng(0)
        history = {name: np.zeros(shapes[name], dtype) for name in ("K_cache", "V_cache")}
        for name, index in (("K_cache", device.k_in), ("V_cache", device.v_in)):
            history[name][0, 0] = rng.standard_normal(shapes[name][2]).astype(dtype)
            device.buffers.write(index, history[name][0, :1])
        steps = []
        for position in (1, 2):
            mask = np.full(shapes["mask"], MASK_BLOCKED, dtype)
            mask[0, 0, :position] = 0
            mask[0, 0, capacity] = 0
            steps.append(
                {
                    "indices": np.array([[position]], np.uint32),
                    "mask": mask,
                    "input": rng.standard_normal(shapes["input"]).astype(dtype),
                }
            )
        in_place = [
            device.run(self._cast(feeds, group), group, start=int(feeds["indices"][0, 0]), rows=1)[
                0
            ]
            for feeds in steps
        ]
        for feeds, resident in zip(steps, in_place):
            k, v, hidden = self._session.run(
                None, self._cast(feeds | history, group), shape_group=group
            )
            position = feeds["indices"][0, 0]
            history["K_cache"][0, position], history["V_cache"][0, position] = k[0, -1], v[0, -1]
            expected = np.asarray(hidden, np.float32)
            got = np.asarray(resident, np.float32)
            if not np.isfinite(got).all() or not np.allclose(got, expected, rtol=2e-2, atol=2e-2):
                raise BackendError(
                    f"a decode step in place gave other hidden states than run() at position "
                    f"{position} (max difference {np.nanmax(np.abs(got - expected)):.3g})"
                )

    def run_resident(
        self, feeds: dict[str, np.ndarray], group: int, start: int, rows: int
    ) -> np.ndarray:
        started = time.perf_counter()
        try:
            hidden, moved = self._device.run(self._cast(feeds, group), group, start, rows)
        except Exception as e:
            raise BackendError(
                f"axengine failed running {self.path.name} (group {group}): {e}"
            ) from e
        finally:
            self.busy_s += time.perf_counter() - started
        self.bytes_moved += moved
        return hidden


class _BoardBuffers:
    """The on-board NPU's CMM buffers: mapped into the host, not coherent with the NPU."""

    def __init__(self, inner):
        from axengine._axe_capi import engine_cffi, engine_lib, sys_lib

        self.ffi, self.engine, self.sys = engine_cffi, engine_lib, sys_lib
        self.io = inner._io  # AX_ENGINE_IO_T *: what the run calls take
        self.inputs = [inner._io[0].pInputs[i] for i in range(inner._io[0].nInputSize)]
        self.outputs = [inner._io[0].pOutputs[i] for i in range(inner._io[0].nOutputSize)]
        self.handle, self.context, self.group_count = (
            inner._handle[0],
            inner._context[0],
            inner._shape_count,
        )
        self.host_copies_rows = True

    def input_size(self, index: int) -> int:
        return int(self.inputs[index].nSize)

    def _check(self, what: str, ret: int) -> None:
        if ret != 0:
            raise BackendError(f"{what} returned {ret & 0xFFFFFFFF:#x}")

    def write(self, index: int, data: np.ndarray, offset: int = 0) -> None:
        buffer = self.inputs[index]
        vir = self.ffi.cast("char *", buffer.pVirAddr) + offset
        self.ffi.memmove(vir, self.ffi.cast("void *", data.ctypes.data), data.nbytes)
        self._check(
            "AX_SYS_MflushCache",
            self.sys.AX_SYS_MflushCache(buffer.phyAddr + offset, vir, data.nbytes),
        )

    def run(self, group: int) -> None:
        if self.group_count > 1:
            self._check(
                "AX_ENGINE_RunGroupIOSync",
                self.engine.AX_ENGINE_RunGroupIOSync(self.handle, self.context, group, self.io),
            )
        else:
            self._check(
                "AX_ENGINE_RunSyncV2",
                self.engine.AX_ENGINE_RunSyncV2(self.handle, self.context, self.io),
            )

    def _invalidate(self, buffer, size: int) -> None:
        self._check(
            "AX_SYS_MinvalidateCache",
            self.sys.AX_SYS_MinvalidateCache(buffer.phyAddr, buffer.pVirAddr, size),
        )

    def read(self, index: int, size: int) -> bytes:
        buffer = self.outputs[index]
        self._invalidate(buffer, size)
        return self.ffi.buffer(buffer.pVirAddr, size)[:]

    def move(self, out_index: int, in_index: int, offset: int, size: int) -> None:
        """The first ``size`` bytes of an output to ``offset`` in an input, through the host's
        view."""
        source, target = self.outputs[out_index], self.inputs[in_index]
        self._invalidate(source, size)
        vir = self.ffi.cast("char *", target.pVirAddr) + offset
        self.ffi.memmove(vir, self.ffi.cast("char *", source.pVirAddr), size)
        self._check(
            "AX_SYS_MflushCache", self.sys.AX_SYS_MflushCache(target.phyAddr + offset, vir, size)
        )


class _CardBuffers:
    """The PCIe card's device buffers: not mapped into the host, reached through axclrtMemcpy."""

    def __init__(self, inner):
        from axengine._axclrt_capi import axclrt_cffi, axclrt_lib

        self.ffi, self.lib = axclrt_cffi, axclrt_lib
        self.io, self.model, self.context = inner._io[0], inner._model_id[0], inner._context_id[0]
        self.thread_context = inner._thread_context[0]
        pointer, size = self.ffi.new("void **"), self.ffi.new("uint64_t *")
        self.inputs, self.outputs = [], []
        for count, get, into in (
            (
                self.lib.axclrtEngineGetNumInputs,
                self.lib.axclrtEngineGetInputBufferByIndex,
                self.inputs,
            ),
            (
                self.lib.axclrtEngineGetNumOutputs,
                self.lib.axclrtEngineGetOutputBufferByIndex,
                self.outputs,
            ),
        ):
            for i in range(count(inner._info[0])):
                self._check("axclrtEngineGet*BufferByIndex", get(self.io, i, pointer, size))
                into.append((self.ffi.cast("char *", pointer[0]), int(size[0])))
        self.host_copies_rows = False

    def input_size(self, index: int) -> int:
        return self.inputs[index][1]

    def _check(self, what: str, ret: int) -> None:
        if ret != 0:
            raise BackendError(f"{what} returned {ret & 0xFFFFFFFF:#x}")

    def _copy(self, target, source, size: int, kind) -> None:
        self._check("axclrtMemcpy", self.lib.axclrtMemcpy(target, source, size, kind))

    def write(self, index: int, data: np.ndarray, offset: int = 0) -> None:
        self._copy(
            self.inputs[index][0] + offset,
            self.ffi.cast("void *", data.ctypes.data),
            data.nbytes,
            self.lib.AXCL_MEMCPY_HOST_TO_DEVICE,
        )

    def run(self, group: int) -> None:
        self._check(
            "axclrtSetCurrentContext", self.lib.axclrtSetCurrentContext(self.thread_context)
        )
        self._check(
            "axclrtEngineExecute",
            self.lib.axclrtEngineExecute(self.model, self.context, group, self.io),
        )

    def read(self, index: int, size: int) -> bytes:
        host = bytearray(size)
        self._copy(
            self.ffi.from_buffer(host),
            self.outputs[index][0],
            size,
            self.lib.AXCL_MEMCPY_DEVICE_TO_HOST,
        )
        return bytes(host)

    def move(self, out_index: int, in_index: int, offset: int, size: int) -> None:
        self._copy(
            self.inputs[in_index][0] + offset,
            self.outputs[out_index][0],
            size,
            self.lib.AXCL_MEMCPY_DEVICE_TO_DEVICE,
        )


class _DeviceIO:
    """A decoder-layer session's device buffers, driven directly so the KV cache stays in them."""

    def __init__(self, session, inputs, outputs):
        inner = session._sess  # InferenceSession wraps the provider's session
        kind = type(inner).__name__
        if kind == "AXEngineSession":
            self.buffers = _BoardBuffers(inner)
        elif kind == "AXCLRTSession":
            self.buffers = _CardBuffers(inner)
        else:
            raise BackendError(f"unknown pyaxengine session type {kind}")
        self.inputs, self.outputs = inputs, outputs
        names = [i.name for i in inputs[0]]
        self.k_in, self.v_in = names.index("K_cache"), names.index("V_cache")
        self.hidden_out = len(outputs[0]) - 1  # outputs: K, V, output

    def clear_cache(self) -> None:
        """Zeros over the whole K/V buffers (device allocations start as whatever was there)."""
        for index in (self.k_in, self.v_in):
            self.buffers.write(index, np.zeros(self.buffers.input_size(index), np.uint8))

    def run(
        self, feeds: dict[str, np.ndarray], group: int, start: int, rows: int
    ) -> tuple[np.ndarray, int]:
        """Write the small inputs, run, move the ``rows`` new K/V rows to cache rows ``start`` on;
        return the hidden states and the bytes the host moved."""
        moved = 0
        no_history = feeds["mask"].shape[2] == feeds["indices"].shape[1]
        for i, spec in enumerate(self.inputs[group]):
            if spec.name in feeds:
                self.buffers.write(i, feeds[spec.name])
                moved += feeds[spec.name].nbytes
            elif no_history:  # the no-history group's dummy K/V is zeros, as the seed feeds it
                self.buffers.write(i, np.zeros(tuple(spec.shape), numpy_dtype(spec.dtype)))
        self.buffers.run(group)
        outputs = self.outputs[group]
        for out_index, in_index in ((0, self.k_in), (1, self.v_in)):
            spec = outputs[out_index]
            row_bytes = int(np.prod(spec.shape[2:])) * numpy_dtype(spec.dtype).itemsize
            self.buffers.move(out_index, in_index, start * row_bytes, rows * row_bytes)
            moved += rows * row_bytes if self.buffers.host_copies_rows else 0
        spec = outputs[self.hidden_out]
        dtype = numpy_dtype(spec.dtype)
        data = self.buffers.read(self.hidden_out, int(np.prod(spec.shape)) * dtype.itemsize)
        hidden = np.frombuffer(data, dtype=dtype).reshape(spec.shape)
        return hidden, moved + hidden.nbytes
