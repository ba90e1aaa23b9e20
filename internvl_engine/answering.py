"""The seam between whoever asks and whatever answers: a ``Request`` in, ``Chunk`` items as the text
arrives, then one ``Answer``. ``Answerer`` is what the node, ``internvl-infer`` and a library user
drive; ``engine.Engine`` (the model in this process) is one, a remote server another.

Light on purpose: it imports no numpy, no onnxruntime, so a client can check a question as the
answerer will (``checked_choices``) without loading a model's runtime.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from .errors import InvalidRequestError
from .grounding import checked_phrase, grounding_text, parse_boxes


@dataclass
class Request:
    question: str
    images: Sequence[Any] = ()  # RGB uint8 numpy arrays [H, W, 3] (gray and RGBA accepted)
    video_frames: Sequence[Any] = ()  # RGB frames in time order, one tile each
    max_tiles: int = 1  # dynamic tiling limit per image (InternVL's max_num)
    system_prompt: str | None = None  # None: the answerer's default
    choices: Sequence[str] = ()  # answer with the most likely of these (empty: a free answer)
    # a phrase to find ("the red cup"): the question is then InternVL's grounding question about it
    # (leave ``question`` empty) and the answer's boxes are in ``Answer.boxes``
    ground: str = ""


@dataclass
class Timings:
    vit_ms: list[float] = field(default_factory=list)  # per image / frame (all of its tiles)
    prefill_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose K/V were kept from the previous question
    ttft_ms: float = 0.0  # prefill + first token, image encoding excluded (as the seed's table)
    decode_tokens: int = 0  # decode steps run after the first token
    decode_ms_per_token: float = 0.0
    decode_tokens_per_s: float = 0.0
    decode_bytes_per_token: float = 0.0  # handed to and taken from the backend per decode step
    # video frames left out so the prompt fits the model build (Answer.frames_used)
    frames_dropped: int = 0
    total_ms: float = 0.0


@dataclass
class Answer:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated, without the stop token
    timings: Timings
    finish_reason: str  # "stop" | "length" | "cancelled"
    # indices of the request's images or frames in the prompt
    frames_used: list[int] = field(default_factory=list)
    choice_index: int = -1  # with choices: the chosen one
    # with choices: one per choice, summing to 1
    choice_probabilities: list[float] = field(default_factory=list)
    # the boxes the text names (grounding.Box, pixels of the request's images), and the boxes it
    # holds that name no place (grounding.BoxProblem: cut off, out of range, malformed)
    boxes: list = field(default_factory=list)
    box_problems: list = field(default_factory=list)


@dataclass(frozen=True)
class Chunk:
    """Text as it arrives; never ends inside a UTF-8 character. ``logprobs``: with
    ``GenerationConfig.logprobs``, one per token of this text."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # of the model's distribution (before temperature, top-k, top-p)
    top: tuple[tuple[int, float], ...] = ()  # the likeliest tokens and theirs, likeliest first


class Answerer(Protocol):
    # what runs the model, as diagnostics name it (onnxruntime, axengine, a server's URL)
    backend: str

    def stream(
        self, request: Request, config, cancel: threading.Event | None = None
    ) -> Iterator[Chunk | Answer]:
        """``Chunk`` items as the answer is generated, then exactly one ``Answer``. ``config`` is a
        ``GenerationConfig``; another thread may set ``cancel`` to stop between tokens."""
        ...

    def describe(self) -> str:
        """How it runs, for a start-up line: threads, where the KV cache lives, what changed for
        this CPU."""
        ...


def checked_question(request: Request) -> str:
    """The question's text as the model is asked it: the question stripped, or with
    ``request.ground`` the grounding question about the phrase. InvalidRequestError for an empty
    question, or a phrase to ground beside a question or choices."""
    if request.ground:
        if request.question and request.question.strip():
            raise InvalidRequestError("give a question or a phrase to ground, not both")
        if request.choices:
            raise InvalidRequestError("a phrase to ground is answered with boxes, not choices")
        return grounding_text(checked_phrase(request.ground))
    if not request.question or not request.question.strip():
        raise InvalidRequestError("the question is empty")
    return request.question.strip()


def with_boxes(answer: Answer, request: Request) -> Answer:
    """``answer`` with the boxes its text names, in pixels of the request's images (or frames)."""
    pictures = list(request.video_frames or request.images)
    used = answer.frames_used or list(range(len(pictures)))
    sizes = [(pictures[i].shape[1], pictures[i].shape[0]) for i in used]
    phrase = " ".join(request.ground.split())
    boxes, problems = parse_boxes(answer.text, sizes, phrase)
    # the parser counts images in prompt order; the request's own indices are what a caller has
    answer.boxes = [replace(b, image=used[b.image]) for b in boxes] if used else boxes
    answer.box_problems = [replace(b, image=used[b.image]) if used else b for b in problems]
    return answer


def checked_choices(choices) -> list[str]:
    """The choices without surrounding blanks; InvalidRequestError for an empty or a repeated
    one."""
    stripped = [c.strip() for c in choices]
    if not all(stripped):
        raise InvalidRequestError("choices must not be empty strings")
    if twice := next((c for i, c in enumerate(stripped) if c in stripped[:i]), None):
        # they would share the probability and the first would always be the answer
        raise InvalidRequestError(f"choices must differ: {twice!r} is given twice")
    return stripped


class AnswerAtTheEnd:
    """``answer()`` for an answerer: the ``Answer`` its ``stream()`` ends with."""

    def answer(
        self, request: Request, config=None, cancel: threading.Event | None = None
    ) -> Answer:
        from .sampling import GenerationConfig

        *_, result = self.stream(request, config or GenerationConfig(), cancel)
        return result
