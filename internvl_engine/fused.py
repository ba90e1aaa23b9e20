"""The whole decoder as one onnxruntime graph (``internvl-export --contract fused``), the CPU's way.

Per step the engine hands onnxruntime only the new rows' embeddings and two positions and gets back
the last row's logits: every layer's K/V stay in two buffers per layer that are bound once as both
GroupQueryAttention's past and its present, so the cache is read and written in place; the logits
land in a buffer bound once too. A prompt runs in one call (its K/V rows after the cached ones), a
decode step is one call for all layers and the lm_head.

An export with ``--prefill int8`` has a second graph for prompts (``prompt_decoder.onnx``: int8
weights for many rows, used from ``PROMPT_GRAPH_MIN_ROWS`` rows); its session binds the same K/V and
logits buffers, so a prompt's rows are where the decode steps after it read them. Both sessions'
intra-op threads may spin between calls: they take turns once per question, not at every step as
the per-layer layout's sessions do (there, idle spinning pools starve the working one).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from .backend_onnxruntime import load_session, session_options
from .config import LayerBuild
from .errors import BackendError, ModelDirError
from .llm import Decoder
from .models.qwen2 import Qwen2Args

# GroupQueryAttention with shared past/present buffers and chunked prefill on the CPU Fewer rows go
# through the decode graph even where a prompt graph exists: right after decode steps the decode
# session's threads still spin, and the prompt session then paid 20-30 ms for it (a second question
# reusing its prefix, int8 at InternVL2.5-1B's sizes, AMD EPYC, 2 threads: 8 / 25 / 64 / 128 new
# rows took 53 / 89 / 153 / 256 ms through the prompt graph, 30 / 69 / 150 / 287 through the decode
# graph; 50 ms later the prompt graph was as fast or faster at every size).
MIN_ORT = (
    1,
    20,
)
PROMPT_GRAPH_MIN_ROWS = 64


def runs_here() -> bool:
    """Whether this onnxruntime has the operators the fused graph needs."""
    return tuple(int(v) for v in ort.__version__.split(".")[:2]) >= MIN_ORT


class _Bound(NamedTuple):
    path: Path
    session: ort.InferenceSession
    binding: ort.IOBinding


class FusedLLM(Decoder):
    def __init__(
        self,
        path: Path,
        embeddings: np.ndarray,
        build: LayerBuild,
        text: Qwen2Args,
        threads: int | None = None,
        prompt_path: Path | None = None,
    ):
        super().__init__(embeddings, build)
        if not runs_here():
            raise BackendError(
                f"{Path(path).name} needs onnxruntime >= {'.'.join(map(str, MIN_ORT))} "
                f"(GroupQueryAttention), this is {ort.__version__}: export with --contract dynamic "
                "for an older onnxruntime"
            )
        self.path = Path(path)
        self.prompt_path = Path(prompt_path) if prompt_path else None
        self.cpu_changes: dict[
            str, list[str]
        ] = {}  # how graphs were changed for this CPU (backend_onnxruntime)
        cache = (1, text.num_kv_heads, build.kv_cache_len, text.head_dim)
        decode = self._open(self.path, threads, cache, text)
        prompt = self._open(self.prompt_path, threads, cache, text) if self.prompt_path else None
        # checked against the graphs before the buffers are made: a manifest's wrong kv_cache_len is
        # an error saying so, not an allocation failure. Zeros: rows past the cached length are
        # masked, never read as NaN.
        self._cache = {
            f"{kind}_{i}": ort.OrtValue.ortvalue_from_numpy(np.zeros(cache, np.float32))
            for i in range(text.num_layers)
            for kind in ("key", "value")
        }
        self._logits = ort.OrtValue.ortvalue_from_numpy(
            np.zeros((1, 1, text.vocab_size), np.float32)
        )
        self._decode_graph = self._bind(self.path, decode)
        self._prompt_graph = self._bind(self.prompt_path, prompt) if prompt else self._decode_graph
        self._bytes, self._busy = 0, 0.0

    def _open(
        self, path: Path, threads: int | None, cache: tuple, text: Qwen2Args
    ) -> ort.InferenceSession:
        """A session of ``path``, checked to take the manifest's cache and rows."""
        session, changes = load_session(path, session_options(threads, spinning=True))
        inputs = {i.name: i.shape for i in session.get_inputs()}
        layers = len([name for name in inputs if name.startswith("past_key_")])
        past, rows = inputs.get("past_key_0"), inputs.get("inputs_embeds", [None])[-1]
        if tuple(past or ()) != cache or rows != text.hidden_size or layers != text.num_layers:
            raise ModelDirError(
                f"{path.name} takes {layers} layers' caches of {past} and rows of {rows}; the "
                "manifest "
                f"says {text.num_layers} of {list(cache)} and {text.hidden_size}: they are not of "
                "the "
                "same export"
            )
        if changes:
            self.cpu_changes[path.name] = changes
        return session

    def _bind(self, path: Path, session: ort.InferenceSession) -> _Bound:
        """``session`` with the shared K/V and logits buffers bound."""
        binding = session.io_binding()
        for name, buffer in self._cache.items():
            binding.bind_ortvalue_input(f"past_{name}", buffer)
            binding.bind_ortvalue_output(f"present_{name}", buffer)
        binding.bind_ortvalue_output("logits", self._logits)
        return _Bound(path, session, binding)

    def _run_prompt(self, rows: np.ndarray) -> np.ndarray:
        return self._run(
            rows, self._prompt_graph if len(rows) >= PROMPT_GRAPH_MIN_ROWS else self._decode_graph
        )

    def _run(self, rows: np.ndarray, graph: _Bound | None = None) -> np.ndarray:
        graph = graph or self._decode_graph
        start = self._make_room(len(rows))
        total = start + len(rows)
        embeds = np.ascontiguousarray(rows[None], dtype=np.float32)
        graph.binding.bind_cpu_input("inputs_embeds", embeds)
        graph.binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        graph.binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        started = time.perf_counter()
        try:
            graph.session.run_with_iobinding(graph.binding)
        except Exception as e:
            raise BackendError(
                f"onnxruntime failed running {graph.path.name}: {str(e).strip().splitlines()[0]}"
            ) from e
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
