"""The decoder stack over the per-layer contract: host embedding lookup, a KV cache, chunked
prefill, one-token decode steps and the post model.

Layer models come in two kinds, told apart by their input shapes:

- dynamic (the exporter's default ONNX): any history length C and any chunk length T;
- fixed-shape groups (Pulsar2 ``llm_build`` axmodels, or ``internvl-export --contract axmodel``):
  group 0 decodes one token against the full cache; each other group runs a prefill chunk of T
  tokens after a history of capacity C (C = 0: no history, the K/V inputs are a dummy).

:class:`LayerShapes` reads the groups from the sessions and picks one per step; ``LLM._forward``
builds the mask, positions and padded input the chosen group expects. The cache lives in the
sessions' own buffers when every layer session supports it (``attach_kv``), so a decode step hands
the backend only the new token's rows; otherwise, as the seed demo does, the engine keeps the cache
and hands each run the full history. ``resident_kv``: "auto" tries the first and falls back to the
second with a logged warning, "on" requires the first, "off" takes the second without trying.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import LayerBuild
from .errors import BackendError, ModelDirError, PromptTooLongError
from .session import HostKV, Session

MASK_BLOCKED = -65536.0  # additive mask value of the contract (exact in bf16)
RESIDENT_KV = ("auto", "on", "off")
log = logging.getLogger(__name__)


def load_embeddings(path: Path, vocab_size: int, hidden_size: int) -> np.ndarray:
    """The embedding table, memory-mapped: ``.npy`` (float32), or the seed's raw
    ``*.bfloat16.bin`` (fp32 truncated to bf16) / ``*.float32.bin``."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            table = np.load(path, mmap_mode="r")
        elif path.name.endswith(".bfloat16.bin"):
            table = np.memmap(path, dtype=np.uint16, mode="r").view(ml_dtypes.bfloat16)
        elif path.name.endswith(".float32.bin"):
            table = np.memmap(path, dtype=np.float32, mode="r")
        else:
            raise ModelDirError(
                f"{path}: unknown embedding file type (need .npy, .bfloat16.bin or .float32.bin)"
            )
        if table.ndim == 1 and table.size == vocab_size * hidden_size:
            table = table.reshape(vocab_size, hidden_size)
    except ValueError as e:
        raise ModelDirError(f"{path}: unreadable embedding table ({e})") from e
    if table.shape != (vocab_size, hidden_size):
        raise ModelDirError(
            f"{path}: embedding table has shape {table.shape}, the model needs "
            f"({vocab_size}, {hidden_size})"
        )
    return table


@dataclass(frozen=True)
class Group:
    index: int
    tokens: int | None  # T: rows per run (None: any)
    capacity: int | None  # C: history rows the mask covers before the chunk (None: any)
    history_shape: tuple | None  # K_cache/V_cache input shape (None: dynamic)


@dataclass(frozen=True)
class LayerShapes:
    decode: Group
    prefill: tuple[Group, ...]  # by capacity, smallest first
    dynamic: bool

    @classmethod
    def read(cls, session: Session) -> "LayerShapes":
        groups = []
        for index, shapes in enumerate(session.groups):
            try:
                t, total, history = shapes["indices"][1], shapes["mask"][2], shapes["K_cache"]
            except (KeyError, IndexError) as e:
                raise BackendError(
                    f"layer model inputs {sorted(shapes)} are not the decoder-layer contract "
                    "(K_cache, V_cache, indices, input, mask)"
                ) from e
            static = (
                isinstance(t, int)
                and isinstance(total, int)
                and all(isinstance(d, int) for d in history)
            )
            groups.append(
                Group(index, t, total - t, tuple(history))
                if static
                else Group(index, None, None, None)
            )
        if any(g.tokens is None for g in groups):
            if len(groups) != 1:
                raise BackendError("a layer model mixes dynamic and fixed-shape groups")
            return cls(groups[0], (groups[0],), dynamic=True)
        decode = [g for g in groups if g.tokens == 1]
        prefill = sorted((g for g in groups if g.tokens > 1), key=lambda g: g.capacity)
        if (
            len(decode) != 1
            or not prefill
            or prefill[0].capacity != 0
            or len({g.tokens for g in prefill}) != 1
        ):
            raise BackendError(
                "layer model groups are not one decode group plus prefill groups of one chunk "
                "length starting with a no-history group: "
                f"{[(g.tokens, g.capacity) for g in groups]}"
            )
        return cls(decode[0], tuple(prefill), dynamic=False)

    def build(self) -> LayerBuild:
        """The limits these groups imply (fixed shapes only)."""
        chunk = self.prefill[0].tokens
        return LayerBuild(
            prefill_chunk=chunk,
            kv_cache_len=self.decode.capacity,
            max_prompt_tokens=self.prefill[-1].capacity + chunk,
        )

    def plan(self, start: int, t: int) -> tuple[Group, int, int]:
        """(group, capacity C, rows T) for ``t`` new tokens after ``start`` cached ones."""
        if self.dynamic:
            return self.decode, start, t
        if t == 1:
            return self.decode, self.decode.capacity, 1
        for g in self.prefill:  # the smallest group whose history capacity holds the cached tokens
            if g.capacity >= start and t <= g.tokens:
                return g, g.capacity, g.tokens
        raise PromptTooLongError(
            f"no prefill group takes {t} tokens after {start}: the largest holds "
            f"{self.prefill[-1].capacity} history tokens"
        )


class Decoder:
    """What the engine drives, whatever runs the layers: the host embedding lookup, a KV cache of
    ``build.kv_cache_len`` rows, prefill with prefix reuse, one-token decode steps, rewinding.
    Subclasses run rows through the model: ``_run_prompt`` (a prompt's rows after the cached ones,
    in as many runs as the model needs) and ``_run`` (one run); both return the last row's
    logits."""

    resident = True  # the KV cache stays in the backend's buffers

    def __init__(self, embeddings: np.ndarray, build: LayerBuild):
        self.embeddings, self.build = embeddings, build
        self.length = 0  # tokens held in the cache
        self.reused = 0  # prompt tokens the last prefill took from the cache
        # the last prompt's embeddings, to find a shared prefix
        self._prompt: np.ndarray | None = None

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        return np.asarray(self.embeddings[np.asarray(token_ids, dtype=np.int64)], dtype=np.float32)

    def check_prompt_length(self, n: int) -> None:
        if n > self.build.max_prompt_tokens:
            raise PromptTooLongError(
                f"prompt has {n} tokens; this model build accepts at most "
                f"{self.build.max_prompt_tokens} (use fewer images, frames or tiles)"
            )

    @property
    def full(self) -> bool:
        return self.length >= self.build.kv_cache_len

    def prefill(self, embeds: np.ndarray, reuse_prefix: bool = True) -> np.ndarray:
        """Run the prompt (rows of ``embeds``); return the last token's logits. With
        ``reuse_prefix``, the cached K/V of the rows this prompt shares with the previous one (the
        system prompt, the same frames) are kept and only the rest is run."""
        n = len(embeds)
        if n == 0:
            raise PromptTooLongError("prompt is empty")
        self.check_prompt_length(n)
        start = self._shared_prefix(embeds) if reuse_prefix else 0
        self._prompt = None  # the cache is being rewritten: nothing to reuse if this fails
        self.length = self.reused = start
        logits = self._run_prompt(embeds[start:])
        self._prompt = np.array(embeds, copy=True)
        return logits

    def _shared_prefix(self, embeds: np.ndarray) -> int:
        """Leading rows equal to the previous prompt's, leaving at least one row to run."""
        if self._prompt is None:
            return 0
        m = min(len(self._prompt), len(embeds) - 1)
        same = np.all(self._prompt[:m] == embeds[:m], axis=1)
        return self._reusable(m if same.all() else int(np.argmin(same)))

    def _reusable(self, shared: int) -> int:
        """How many of the ``shared`` cached rows the next run can start after."""
        return shared

    def rewind(self, length: int) -> None:
        """Forget the cached tokens after the first ``length`` (their rows are overwritten next)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length} of {self.length} cached tokens")
        self.length = length

    def decode(self, token_id: int) -> np.ndarray:
        """Feed one token at the next position; return its logits."""
        return self._run(self.embed([token_id]))

    def _make_room(self, t: int) -> int:
        """The first position of ``t`` new rows, which must fit the cache."""
        if self.length + t > self.build.kv_cache_len:
            raise PromptTooLongError(
                f"context full: {self.length + t} tokens exceed the KV cache of "
                f"{self.build.kv_cache_len}"
            )
        return self.length

    def _run_prompt(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _run(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def bytes_moved(self) -> int:
        """Bytes handed to and taken from the backend so far."""
        raise NotImplementedError

    def backend_seconds(self) -> float:
        """Time spent inside backend calls so far."""
        raise NotImplementedError


class LLM(Decoder):
    """The decoder as per-layer models (the AX650N contract; ``internvl-export --contract dynamic``
    or ``axmodel``), driven one layer at a time, then the post model."""

    def __init__(
        self,
        layers: Sequence[Session],
        post: Session,
        embeddings: np.ndarray,
        build: LayerBuild | None,
        kv_dim: int,
        dtype=np.float32,
        resident_kv: str = "auto",
    ):
        self.layers, self.post = list(layers), post
        self.shapes = LayerShapes.read(self.layers[0])
        if self.shapes.dynamic and build is None:
            raise BackendError("dynamic-shape layer models need the build limits (manifest.json)")
        if not self.shapes.dynamic and build not in (None, self.shapes.build()):
            raise BackendError(
                f"the manifest says {build}, the layer models' shape groups say "
                f"{self.shapes.build()}"
            )
        super().__init__(embeddings, build or self.shapes.build())
        decode = self.layers[0].groups[self.shapes.decode.index]
        for name, want in (
            ("K_cache", kv_dim),
            ("V_cache", kv_dim),
            ("input", embeddings.shape[1]),
        ):
            if decode[name][-1] != want:
                raise ModelDirError(
                    f"the layer models' {name} has {decode[name][-1]} columns, config.json says "
                    f"{want}: "
                    "config.json and the models are not of the same checkpoint"
                )
        self.dtype = np.dtype(dtype)
        # Where the cache lives: in the sessions' buffers (new rows only per step), else here.
        self.resident = self._attach_kv(resident_kv, kv_dim)
        self.host_kv = (
            []
            if self.resident
            else [HostKV(self.build.kv_cache_len, kv_dim, self.dtype) for _ in layers]
        )

    def _attach_kv(self, mode: str, kv_dim: int) -> bool:
        if mode not in RESIDENT_KV:
            raise BackendError(f"resident_kv must be one of {', '.join(RESIDENT_KV)}, not {mode!r}")
        if mode == "off":
            return False
        try:
            for layer in self.layers:
                layer.attach_kv(self.build.kv_cache_len, kv_dim, self.dtype)
        except BackendError as e:
            if mode == "on":
                raise BackendError(f"resident_kv is on, but {e}") from e
            log.warning(
                "%s; the KV cache stays on the host and every run is handed the whole history "
                "(resident_kv=off skips this check)",
                e,
            )
            return False
        return True

    def bytes_moved(self) -> int:
        return sum(s.bytes_moved for s in (*self.layers, self.post))

    def backend_seconds(self) -> float:
        return sum(s.busy_s for s in (*self.layers, self.post))

    def _reusable(self, shared: int) -> int:
        # A fixed-shape build's largest prefill group holds a bounded history.
        return shared if self.shapes.dynamic else min(shared, self.shapes.prefill[-1].capacity)

    def _run_prompt(self, rows: np.ndarray) -> np.ndarray:
        chunk, start, n = self.build.prefill_chunk, self.length, len(rows)
        done = 0
        while done < n:  # chunk ends on multiples of the chunk length: every chunk fits a group
            end = min(n, ((start + done) // chunk + 1) * chunk - start)
            hidden = self._forward(rows[done:end])
            done = end
        return self._logits(hidden)

    def _run(self, rows: np.ndarray) -> np.ndarray:
        return self._logits(self._forward(rows))

    def _forward(self, rows: np.ndarray) -> np.ndarray:
        """All layers on ``rows`` [t, H] at positions length .. length+t-1; their K/V join the
        cache. Returns the hidden state of the last row, [1, 1, H]."""
        t = len(rows)
        start = self._make_room(t)
        end = start + t
        group, capacity, width = self.shapes.plan(start, t)
        # Row r attends to the cached tokens [0, start) and to chunk rows 0..r (columns capacity +
        # 0..r); rows past t are padding and their K/V are never stored.
        mask = np.full((1, width, capacity + width), MASK_BLOCKED, self.dtype)
        mask[0, :, :start] = 0
        mask[0, :, capacity:] = np.triu(np.full((width, width), MASK_BLOCKED, self.dtype), k=1)
        indices = np.arange(start, start + width, dtype=np.uint32)[None]
        hidden = np.zeros((1, width, rows.shape[1]), self.dtype)
        hidden[0, :t] = rows
        for i, layer in enumerate(self.layers):
            feeds = {"indices": indices, "input": hidden, "mask": mask}
            if self.resident:
                hidden = layer.run_resident(feeds, group.index, start, t)
                continue
            kv = self.host_kv[i]
            k, v, hidden = layer.run(feeds | kv.history(group.history_shape, capacity), group.index)
            kv.append(k, v, start, t)
        self.length = end
        return hidden[:, t - 1 : t]

    def _logits(self, last_hidden: np.ndarray) -> np.ndarray:
        return np.asarray(
            self.post.run({"input": last_hidden.astype(self.dtype, copy=False)})[0],
            dtype=np.float32,
        ).reshape(-1)
