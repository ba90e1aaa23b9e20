"""The whole decoder as one onnxruntime graph (``internvl-export --contract fused``), the CPU's way.

Per step the engine hands onnxruntime only the new rows' embeddings and two positions and gets back
the last row's logits: every layer's K/V stay in two buffers per layer that are bound once as both
GroupQueryAttention's past and its present, so the cache is read and written in place; the logits
land in a buffer bound once too. A prompt runs in one call (its K/V rows after the cached ones), a
decode step is one call for all layers and the lm_head.

One session, so onnxruntime's intra-op threads may spin between calls (the per-layer layout turns
spinning off: there, idle sessions' spinning pools starve the working one).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .config import LayerBuild, TextSpec
from .errors import BackendError, ModelDirError
from .llm import Decoder

MIN_ORT = (1, 20)  # GroupQueryAttention with shared past/present buffers and chunked prefill on the CPU


def runs_here() -> bool:
    """Whether this onnxruntime has the operators the fused graph needs."""
    return tuple(int(v) for v in ort.__version__.split(".")[:2]) >= MIN_ORT


class FusedLLM(Decoder):
    def __init__(self, path: Path, embeddings: np.ndarray, build: LayerBuild, text: TextSpec,
                 threads: int | None = None):
        super().__init__(embeddings, build)
        if not runs_here():
            raise BackendError(f"{Path(path).name} needs onnxruntime >= {'.'.join(map(str, MIN_ORT))} "
                               f"(GroupQueryAttention), this is {ort.__version__}: export with --contract dynamic "
                               "for an older onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf, ...)
            raise BackendError(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0]}") from None
        self.path = Path(path)
        cache = (1, text.num_kv_heads, build.kv_cache_len, text.head_dim)
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        if tuple(inputs.get("past_key_0", ())) != cache or inputs["inputs_embeds"][-1] != text.hidden_size:
            raise ModelDirError(f"{self.path.name} takes a cache of {inputs.get('past_key_0')} and rows of "
                                f"{inputs['inputs_embeds'][-1]}; config.json and the manifest say {list(cache)} and "
                                f"{text.hidden_size}: they are not of the same export")
        self._binding = self.session.io_binding()
        self._cache = []
        for i in range(text.num_layers):  # zeros: rows past the cached length are masked, never read as NaN
            for kind in ("key", "value"):
                buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(cache, np.float32))
                self._binding.bind_ortvalue_input(f"past_{kind}_{i}", buffer)
                self._binding.bind_ortvalue_output(f"present_{kind}_{i}", buffer)
                self._cache.append(buffer)
        self._logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, text.vocab_size), np.float32))
        self._binding.bind_ortvalue_output("logits", self._logits)
        self._bytes, self._busy = 0, 0.0

    def _run_prompt(self, rows: np.ndarray) -> np.ndarray:
        return self._run(rows)

    def _run(self, rows: np.ndarray) -> np.ndarray:
        start = self._make_room(len(rows))
        total = start + len(rows)
        embeds = np.ascontiguousarray(rows[None], dtype=np.float32)
        self._binding.bind_cpu_input("inputs_embeds", embeds)
        self._binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        self._binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        started = time.perf_counter()
        try:
            self.session.run_with_iobinding(self._binding)
        except Exception as e:
            raise BackendError(f"onnxruntime failed running {self.path.name}: {str(e).strip().splitlines()[0]}") from None
        finally:
            self._busy += time.perf_counter() - started
        self.length = total
        logits = self._logits.numpy().reshape(-1).copy()
        self._bytes += embeds.nbytes + 8 + logits.nbytes
        return logits

    def bytes_moved(self) -> int:
        return self._bytes

    def backend_seconds(self) -> float:
        return self._busy
