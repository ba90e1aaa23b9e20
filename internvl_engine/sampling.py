"""Choosing the next token: greedy, or temperature / top-k / top-p sampling, with repetition
penalty."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import BackendError, InvalidRequestError


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 = off; HF semantics over prompt and generated tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the answer ends before the first of these texts (not included)
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest
    min_new_tokens: int = 0  # the end of text is not chosen before this many tokens

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in 0..max"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.seed is None or self.seed >= 0, "seed must be >= 0"),
            (all(isinstance(t, str) and t for t in self.stop), "stop texts must be non-empty"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in 0..20"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)


class Sampler:
    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, seen_ids: Sequence[int]) -> int:
        c = self.config
        logits = np.asarray(logits, dtype=np.float32)
        if c.repetition_penalty != 1.0 and len(seen_ids):
            logits = logits.copy()
            seen = np.unique(np.asarray(seen_ids))
            picked = logits[seen]
            logits[seen] = np.where(
                picked < 0, picked * c.repetition_penalty, picked / c.repetition_penalty
            )
        if c.temperature == 0:
            token = int(np.argmax(logits))  # the first NaN, where there is one
            if not np.isfinite(logits[token]):
                raise not_finite()
            return token
        if not np.isfinite(logits.max()):
            raise not_finite()
        logits = logits / c.temperature
        if 0 < c.top_k < logits.size:
            kth = np.partition(logits, -c.top_k)[-c.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if c.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[
                : int(np.searchsorted(cumulative, c.top_p)) + 1
            ]  # smallest set reaching top_p
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        return int(self.rng.choice(probs.size, p=probs))


def not_finite() -> BackendError:
    """What a model that gives NaN or infinite logits (a broken export or NPU compile) fails with,
    instead of an answer of whatever token NaN picks."""
    return BackendError(
        "the model's logits are not finite (NaN or Inf): check the model files (internvl-doctor "
        "runs them once)"
    )


class StopTexts:
    """Ends a text stream before the first of the ``stop`` texts: ``push`` returns what can be shown
    now, holding back a tail that may still become a stop text."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.text = ""  # all that was shown
        self._held = ""
        self.hit = False

    def push(self, chunk: str) -> str:
        if self.hit:
            return ""
        held = self._held + chunk
        ends = [i for i in (held.find(t) for t in self.stop) if i >= 0]
        if ends:
            self.hit, self._held = True, ""
            return self._show(held[: min(ends)])
        keep = max(
            (n for t in self.stop for n in range(1, len(t)) if held.endswith(t[:n])), default=0
        )
        self._held = held[len(held) - keep :] if keep else ""
        return self._show(held[: len(held) - keep])

    def flush(self) -> str:
        held, self._held = self._held, ""
        return self._show(held)

    def _show(self, text: str) -> str:
        self.text += text
        return text
