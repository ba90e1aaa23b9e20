"""The engine, the model in this process: tokenize -> preprocess -> encode images -> prefill ->
decode -> stream. It is an ``answering.Answerer``.

``generate_step`` is the one token-level loop: prefill, then one ``Step`` per token (its logits,
the chosen token, the time and bytes of the model call), each token fed back. ``Engine.stream``
builds on it: ``Chunk`` items as text arrives, then one ``Answer`` carrying the prompt and
generated token ids, the full text and the timings; the benchmark, the fidelity report and the
tests build on it too. With ``Request.choices`` the answer is instead the choice the model finds
most likely (``score_choices``). One engine is used by one thread at a time; another thread may
stop a generation between tokens through ``cancel``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from .answering import (
    Answer,
    AnswerAtTheEnd,
    Chunk,
    Request,
    Timings,
    TokenLogprob,
    checked_choices,
    checked_question,
    with_boxes,
)
from .backends import open_session, resolve_backend
from .config import DEFAULT_SYSTEM_PROMPT, ModelLayout
from .errors import (
    BackendError,
    ConfigError,
    InvalidRequestError,
    ModelDirError,
    PromptTooLongError,
)
from .llm import LLM, Decoder, load_embeddings
from .preprocess import normalize, segment_centre_indices, tiles
from .prompt import IM_END, IMG_CONTEXT, TextStream, Tokenizer
from .sampling import GenerationConfig, Sampler, StopTexts, not_finite
from .session import thread_count

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    token_ids: list[int]
    embeds: np.ndarray  # [T, H] with image features spliced in
    vit_ms: list[float]
    pixel_values: np.ndarray | None  # [tiles, 3, S, S], kept for reference checks
    frames_used: list[
        int
    ]  # indices of the request's images or video frames in the prompt, in order


@dataclass(frozen=True)
class Step:
    """One token of a generation: ``token`` was chosen from ``logits``, which the model gave after
    the prompt and the tokens before it."""

    token: int
    logits: np.ndarray
    # the model call that gave the logits (the prefill for the first token) and the choice
    seconds: float
    bytes_moved: int  # handed to and taken from the backend by that call
    backend_seconds: float  # of ``seconds``, the time inside backend calls


def generate_step(
    llm: Decoder, embeds: np.ndarray, choose: Callable[[np.ndarray], int], reuse_prefix: bool = True
) -> Iterator[Step]:
    """Prefill the prompt ``embeds``, then decode: one Step per token, each chosen token (``choose``
    maps logits to a token: a sampler, argmax, or a teacher's next token) fed back, until the
    consumer stops or the KV cache is full."""
    feed = None
    while True:
        started, moved, busy = time.perf_counter(), llm.bytes_moved(), llm.backend_seconds()
        logits = llm.prefill(embeds, reuse_prefix) if feed is None else llm.decode(feed)
        feed = choose(logits)
        yield Step(
            feed,
            logits,
            time.perf_counter() - started,
            llm.bytes_moved() - moved,
            llm.backend_seconds() - busy,
        )
        if llm.full:
            return


def argmax(logits: np.ndarray) -> int:
    """Greedy choice, for ``generate_step``."""
    return int(np.argmax(logits))


def greedy_tokens(llm: Decoder, embeds: np.ndarray, count: int) -> list[int]:
    """The first ``count`` greedy tokens after the prompt (stop tokens included, as chosen)."""
    return [
        step.token for step in islice(generate_step(llm, embeds, argmax, reuse_prefix=False), count)
    ]


def forced_logits(llm: Decoder, embeds: np.ndarray, tokens: Sequence[int]) -> list[np.ndarray]:
    """Teacher forcing: the logits after the prompt and after each of ``tokens`` fed in turn."""
    feed = iter(tokens)
    steps = generate_step(llm, embeds, lambda _: next(feed, -1), reuse_prefix=False)
    return [step.logits for step in islice(steps, len(tokens) + 1)]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, np.float64) - np.max(logits)
    return shifted - np.log(np.exp(shifted).sum())


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under ``logits``, with the ``top`` likeliest tokens'."""
    logp = _log_softmax(np.asarray(logits, dtype=np.float32).reshape(-1))
    best = np.argsort(-logp, kind="stable")[:top] if top else ()
    return TokenLogprob(token, float(logp[token]), tuple((int(i), float(logp[i])) for i in best))


def score_choices(
    llm: Decoder,
    prompt_logits: np.ndarray,
    choices: Sequence[list[int]],
    end: int,
    cancel: threading.Event | None = None,
) -> np.ndarray | None:
    """Log-probability of each choice as the whole answer: its tokens, then ``end``, after the
    prompt already in the cache (whose logits are ``prompt_logits``). The prompt's K/V are computed
    once and kept; each choice overwrites only the rows after them. None when ``cancel`` is set
    between two choices (many long choices take many decode steps)."""
    start = llm.length
    scores = []
    for tokens in choices:
        llm.rewind(start)
        if cancel is not None and cancel.is_set():
            return None
        logp = _log_softmax(prompt_logits)[tokens[0]]
        for token, following in zip(tokens, [*tokens[1:], end]):
            logp += _log_softmax(llm.decode(token))[following]
        scores.append(logp)
    llm.rewind(start)
    return np.array(scores)


class Engine(AnswerAtTheEnd):
    """``model_dir``: an ``internvl-export`` directory (manifest, models, tokenizer) or a Pulsar2
    seed directory (``qwen2_p128_l{i}_together.axmodel``, ``qwen2_post.axmodel``, embedding file),
    which has no manifest: then ``tokenizer_dir`` (the seed's ``--hf_model``) supplies config.json
    and the tokenizer, and the ViT is ``vit_model`` or the one ``*vit*.axmodel`` in the
    directory."""

    def __init__(
        self,
        model_dir: str | Path,
        backend: str = "auto",
        threads: int | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        tokenizer_dir: str | Path | None = None,
        vit_model: str | Path | None = None,
        provider: str | None = None,
        resident_kv: str = "auto",
        prefix_reuse: bool = True,
    ):
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 0
        ):
            raise ConfigError(
                f"threads must be an integer >= 0 (0 or None: every core), not {threads!r}"
            )
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ModelDirError(f"{model_dir}: no such model directory")
        self.backend = resolve_backend(backend, model_dir)
        # per onnxruntime session: affinity and quota are read once, here
        self.threads = thread_count(threads)
        layout = ModelLayout.find(model_dir, tokenizer_dir, vit_model)
        self.spec = layout.spec
        self.system_prompt = system_prompt
        self.prefix_reuse = prefix_reuse
        self.tokenizer = Tokenizer(Path(tokenizer_dir) if tokenizer_dir else model_dir)

        def session(path, many_rows=False):
            return open_session(self.backend, path, self.threads, provider, many_rows)

        self.vit = session(layout.vit, many_rows=True) if layout.vit else None
        if self.vit is not None:
            self._check_vit(layout.vit)
        self.llm: Decoder
        if layout.decoder is not None:  # one graph for the whole decoder: onnxruntime only
            if self.backend != "onnxruntime":
                raise BackendError(
                    f"{layout.decoder.name} is a fused decoder for onnxruntime, not for "
                    f"{self.backend}"
                )
            from .fused import FusedLLM

            self.llm = FusedLLM(
                layout.decoder,
                self._embeddings(layout),
                layout.build,
                self.spec.text,
                self.threads,
                layout.prompt_decoder,
            )
        else:
            layers = [session(p) for p in layout.layers]
            dtype = layers[0].input_dtype("input")  # bf16 on the NPU; float32 for ONNX
            self.llm = LLM(
                layers,
                session(layout.post),
                self._embeddings(layout),
                layout.build,
                self.spec.text.kv_dim,
                dtype,
                resident_kv,
            )
        # How graphs were changed for this CPU (backend_onnxruntime.for_this_cpu), for start-up
        # lines.
        sessions = [self.vit, *getattr(self.llm, "layers", ()), getattr(self.llm, "post", None)]
        self.cpu_changes = {
            s.path.name: s.cpu_changes for s in sessions if getattr(s, "cpu_changes", None)
        }
        self.cpu_changes |= getattr(self.llm, "cpu_changes", {})
        if self.backend == "onnxruntime":
            from .backend_onnxruntime import back_with_huge_pages

            log.debug("%d MiB of weights and buffers on 2 MiB pages", back_with_huge_pages() >> 20)

    def describe(self) -> str:
        """The backend and how it runs here: what a slow node's first look at its log needs."""
        notes = []
        if self.backend == "onnxruntime":  # what a CPU quota or taskset left it
            notes.append(f"{self.threads} CPU thread{'s' * (self.threads != 1)} per session")
        if self.llm.resident:
            notes.append("KV cache in the backend buffers")
        if self.cpu_changes:  # x86 without VNNI: how the int8 graphs run here
            notes.append(
                "for this CPU's int8 GEMM: "
                + "; ".join(
                    f"{name}: {', '.join(changes)}" for name, changes in self.cpu_changes.items()
                )
            )
        return self.backend + (f" ({', '.join(notes)})" if notes else "")

    def _check_vit(self, path: Path) -> None:
        """Refuse now, not at the first image, a ViT that does not take this model's tiles: another
        model (a decoder file given as --vit_model) or a ViT built for another image size."""
        size = self.spec.image_size
        shape = self.vit.groups[0].get("image")
        if shape is None:
            raise ModelDirError(
                f"{path.name} is no InternVL ViT: it has no input 'image' "
                f"(its inputs: {', '.join(self.vit.groups[0])})"
            )
        if len(shape) != 4 or any(
            got not in (None, want) for got, want in zip(shape, (1, 3, size, size))
        ):
            raise ModelDirError(
                f"{path.name} takes {list(shape)}, this model's tiles are [1, 3, {size}, {size}]: "
                "export (or compile) the ViT from this checkpoint"
            )

    def encode_tile(self, tile: np.ndarray) -> np.ndarray:
        """One normalised [1, 3, S, S] tile through the ViT: its [num_image_token, hidden_size]
        features."""
        features = self.vit.run({"image": tile})[0][0]
        per_tile = (self.spec.num_image_token, self.spec.text.hidden_size)
        if features.shape != per_tile:
            # The ViT's input was checked at load; its output is only known once it has run.
            raise ModelDirError(
                f"the ViT gives {' x '.join(map(str, features.shape))} features per tile, the "
                "model "
                f"needs {' x '.join(map(str, per_tile))} (spec.vision.image_size / patch_size x "
                "spec.downsample_ratio, squared; spec.text.hidden_size): the ViT and the decoder "
                "are "
                "not of the same checkpoint"
            )
        return features

    def _embeddings(self, layout: ModelLayout) -> np.ndarray:
        return load_embeddings(
            layout.embeddings, self.spec.text.vocab_size, self.spec.text.hidden_size
        )

    def prepare(self, request: Request) -> Prompt:
        """Tokens and input embeddings for a request, image features spliced in after each
        ``<img>``. A video with more frames than the model build's prompt limit takes fewer frames,
        spread over the clip (at least 2); images are never dropped."""
        question = checked_question(request)
        if request.images and request.video_frames:
            raise InvalidRequestError("give either images or video frames, not both")
        if request.max_tiles < 1:
            raise InvalidRequestError("max_tiles must be >= 1")
        video = bool(request.video_frames)
        pictures = list(request.video_frames or request.images)
        per_image = [
            tiles(
                im,
                self.spec.image_size,
                1 if video else request.max_tiles,
                self.spec.min_dynamic_patch,
                self.spec.use_thumbnail,
            )
            for im in pictures
        ]
        system = self.system_prompt if request.system_prompt is None else request.system_prompt
        used = list(range(len(pictures)))

        def encode(indices: list[int]) -> list[int]:
            return self.tokenizer.encode_chat(
                system,
                question,
                [len(per_image[i]) for i in indices],
                self.spec.num_image_token,
                video,
                ground=" ".join(request.ground.split()),
            )

        ids = encode(used)
        limit = self.llm.build.max_prompt_tokens
        if len(ids) > limit and len(text := encode([])) > limit:  # fewer pictures would not help
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens; this model build accepts at most {limit} (the "
                f"question and system prompt alone take {len(text)}: shorten them)"
            )
        if video and len(ids) > limit:
            for count in range(len(pictures) - 1, 1, -1):
                fewer = segment_centre_indices(len(pictures), count)
                if len(ids := encode(fewer)) <= limit:
                    log.warning(
                        "video: %d frames make a prompt over this model build's limit of %d "
                        "tokens; "
                        "using %d of them, spread over the clip",
                        len(pictures),
                        limit,
                        count,
                    )
                    used = fewer
                    break
            else:
                raise PromptTooLongError(
                    f"even 2 video frames make a prompt of {len(encode([0, 1]))} tokens; this "
                    f"model build accepts at most {limit}"
                )
        self.llm.check_prompt_length(len(ids))  # before paying for the image encoder

        embeds = self.llm.embed(ids)
        vit_ms, features, pixel_values = [], [], None
        if used and self.vit is None:
            raise InvalidRequestError(
                "this model directory has no image encoder: give the ViT model "
                "(--vit_model, or a *vit*.axmodel file in the directory)"
            )
        if used:
            pixel_values = normalize([t for i in used for t in per_image[i]])
            tile = 0
            for i in used:
                started = time.perf_counter()
                for _ in per_image[i]:
                    features.append(self.encode_tile(pixel_values[tile : tile + 1]))
                    tile += 1
                vit_ms.append((time.perf_counter() - started) * 1e3)
            positions = np.flatnonzero(np.asarray(ids) == self.tokenizer.ids[IMG_CONTEXT])
            embeds[positions] = np.concatenate(features)
        return Prompt(ids, embeds, vit_ms, pixel_values, used)

    def stream(
        self,
        request: Request,
        config: GenerationConfig = GenerationConfig(),
        cancel: threading.Event | None = None,
    ) -> Iterator[Chunk | Answer]:
        started = time.perf_counter()
        choices = [self.tokenizer.encode(c, markup=False) for c in checked_choices(request.choices)]
        prompt = self.prepare(request)
        timings = Timings(
            vit_ms=prompt.vit_ms,
            prefill_tokens=len(prompt.token_ids),
            frames_dropped=len(request.video_frames) - len(prompt.frames_used)
            if request.video_frames
            else 0,
        )
        if choices:
            yield from self._choose(request, prompt, choices, timings, started, cancel)
            return
        sampler = Sampler(config)
        text = TextStream(self.tokenizer)
        stops = StopTexts(config.stop)
        logprobs: list[TokenLogprob] = []  # of the tokens not yet in a chunk
        seen = list(prompt.token_ids)
        generated: list[int] = []
        decode_s, decode_bytes = 0.0, 0
        reason = "length"  # if the KV cache fills
        stop_ids = np.array(sorted(self.tokenizer.stop_ids))

        def choose(logits: np.ndarray) -> int:
            if len(generated) < config.min_new_tokens:  # the end of text may not come yet
                logits = np.array(logits, dtype=np.float32)
                logits.reshape(-1)[stop_ids] = -np.inf
            return sampler(logits, seen)

        steps = generate_step(self.llm, prompt.embeds, choose, self.prefix_reuse)
        for index, step in enumerate(steps):
            if index == 0:
                timings.ttft_ms, timings.reused_tokens = step.seconds * 1e3, self.llm.reused
            else:
                decode_s, decode_bytes = decode_s + step.seconds, decode_bytes + step.bytes_moved
                timings.decode_tokens += 1
            if step.token in self.tokenizer.stop_ids:
                reason = "stop"
                break
            generated.append(step.token)
            seen.append(step.token)
            if config.logprobs is not None:
                logprobs.append(token_logprob(step.logits, step.token, config.logprobs))
            if chunk := stops.push(text.push(step.token)):
                yield Chunk(chunk, tuple(logprobs))
                logprobs.clear()
            if stops.hit:
                reason = "stop"
                break
            if len(generated) >= config.max_new_tokens:
                break
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
        if chunk := stops.push(text.flush()) + stops.flush():
            yield Chunk(chunk, tuple(logprobs))
        if timings.decode_tokens:
            timings.decode_ms_per_token = decode_s * 1e3 / timings.decode_tokens
            timings.decode_tokens_per_s = timings.decode_tokens / decode_s
            timings.decode_bytes_per_token = decode_bytes / timings.decode_tokens
        timings.total_ms = (time.perf_counter() - started) * 1e3
        yield with_boxes(
            Answer(
                stops.text if stops.hit else self.tokenizer.decode(generated),
                prompt.token_ids,
                generated,
                timings,
                reason,
                prompt.frames_used,
            ),
            request,
        )

    def _choose(
        self,
        request: Request,
        prompt: Prompt,
        choices: list[list[int]],
        timings: Timings,
        started: float,
        cancel: threading.Event | None,
    ) -> Iterator[Chunk | Answer]:
        """The choice the model finds most likely as the whole answer, streamed as one chunk."""
        t0 = time.perf_counter()
        logits = self.llm.prefill(prompt.embeds, self.prefix_reuse)
        timings.reused_tokens = self.llm.reused
        if self.llm.length + max(len(c) for c in choices) + 1 > self.llm.build.kv_cache_len:
            raise PromptTooLongError(
                f"the prompt and the longest choice exceed the KV cache of "
                f"{self.llm.build.kv_cache_len} tokens"
            )
        scores = score_choices(self.llm, logits, choices, self.tokenizer.ids[IM_END], cancel)
        if scores is None:
            timings.total_ms = (time.perf_counter() - started) * 1e3
            yield Answer("", prompt.token_ids, [], timings, "cancelled", prompt.frames_used)
            return
        if not np.isfinite(scores).all():
            raise not_finite()
        probabilities = np.exp(scores - scores.max())
        probabilities /= probabilities.sum()
        best = int(np.argmax(scores))
        # to the answer: the prefill and the scoring
        timings.ttft_ms = (time.perf_counter() - t0) * 1e3
        text = request.choices[best].strip()
        yield Chunk(text)
        timings.total_ms = (time.perf_counter() - started) * 1e3
        yield Answer(
            text,
            prompt.token_ids,
            choices[best],
            timings,
            "stop",
            prompt.frames_used,
            best,
            [float(p) for p in probabilities],
        )
