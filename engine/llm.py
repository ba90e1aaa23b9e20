"""The decoder stack over the per-layer contract: host embedding lookup, a preallocated KV cache,
chunked prefill, one-token decode steps and the post model."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import LayerBuild
from .errors import PromptTooLongError
from .session import Session

MASK_BLOCKED = -65536.0  # additive mask value of the contract (exact in bf16)


class LLM:
    def __init__(self, layers: Sequence[Session], post: Session, embeddings: np.ndarray, build: LayerBuild,
                 kv_dim: int, dtype=np.float32):
        self.layers, self.post, self.embeddings, self.build = list(layers), post, embeddings, build
        self.dtype = np.dtype(dtype)
        shape = (len(self.layers), 1, build.kv_cache_len, kv_dim)
        self.k_cache = np.zeros(shape, self.dtype)
        self.v_cache = np.zeros(shape, self.dtype)
        self.length = 0  # tokens held in the cache

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        return np.asarray(self.embeddings[np.asarray(token_ids, dtype=np.int64)], dtype=np.float32)

    def check_prompt_length(self, n: int) -> None:
        if n > self.build.max_prompt_tokens:
            raise PromptTooLongError(f"prompt has {n} tokens; this model build accepts at most "
                                     f"{self.build.max_prompt_tokens} (use fewer images, frames or tiles)")

    @property
    def full(self) -> bool:
        return self.length >= self.build.kv_cache_len

    def prefill(self, embeds: np.ndarray) -> np.ndarray:
        """Run the prompt (rows of ``embeds``) in chunks from position 0; return the last token's logits."""
        n = len(embeds)
        if n == 0:
            raise PromptTooLongError("prompt is empty")
        self.check_prompt_length(n)
        self.length = 0
        chunk = self.build.prefill_chunk
        for start in range(0, n, chunk):  # exact: no empty trailing chunk when n % chunk == 0
            hidden = self._forward(embeds[start:start + chunk])
        return self._logits(hidden[:, -1:])

    def decode(self, token_id: int) -> np.ndarray:
        """Feed one token at the next position; return its logits."""
        return self._logits(self._forward(self.embed([token_id])))

    def _forward(self, rows: np.ndarray) -> np.ndarray:
        """All layers on ``rows`` [t, H] at positions length .. length+t-1; their K/V join the cache."""
        t, start = len(rows), self.length
        end = start + t
        if end > self.build.kv_cache_len:
            raise PromptTooLongError(f"context full: {end} tokens exceed the KV cache of {self.build.kv_cache_len}")
        mask = np.zeros((1, t, end), self.dtype)
        mask[0, :, start:] = np.triu(np.full((t, t), MASK_BLOCKED, self.dtype), k=1)
        indices = np.arange(start, end, dtype=np.uint32)[None]
        hidden = rows[None].astype(self.dtype, copy=False)
        for i, layer in enumerate(self.layers):
            k, v, hidden = layer.run({"K_cache": self.k_cache[i, :, :start], "V_cache": self.v_cache[i, :, :start],
                                      "indices": indices, "input": hidden, "mask": mask})
            self.k_cache[i, :, start:end] = k
            self.v_cache[i, :, start:end] = v
        self.length = end
        return hidden

    def _logits(self, last_hidden: np.ndarray) -> np.ndarray:
        return self.post.run({"input": last_hidden})[0].reshape(-1)
