"""An answerer that asks an OpenAI-compatible server (``internvl-serve``, vLLM, SGLang, LMDeploy,
AXERA's ``axllm serve``) instead of running the model here: the node, ``internvl-infer`` and the
library use it as they use the local ``Engine``.

The request is the one the local engine builds: the system prompt (the model's default unless one
is given), each image or frame as a PNG data URL in the user message before the question, so that
the server's InternVL chat template writes the same ``Image-k:`` layout. Video frames carry
``"video": true`` (internvl-serve labels them ``Frame-k:``; other servers take them as images).
A phrase to ground goes as InternVL's grounding question (``<ref>`` as text: the server's tokenizer
makes it the special token), with ``skip_special_tokens: false`` so that vLLM keeps the answer's
``<ref>``/``<box>``; the boxes are read from the answer's text as the local engine's are.
Choices go as vLLM's ``structured_outputs: {choice: [...]}``; their probabilities come from the
server's ``choice_probabilities`` (internvl-serve), else from the first token's ``top_logprobs``
(vLLM), else the chosen one gets 1.

Failures are typed: ``ServerUnreachableError`` (down, refused, timed out) and ``ServerError`` (an
HTTP error, with the server's message). Each request connects anew, so an answerer whose server
comes back answers again without being rebuilt.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import threading
import time
from collections.abc import Iterator

import numpy as np

from .answering import (
    Answer,
    AnswerAtTheEnd,
    Chunk,
    Request,
    Timings,
    checked_choices,
    checked_question,
    with_boxes,
)
from .config import DEFAULT_SYSTEM_PROMPT
from .errors import InternVLError, ServerError, ServerUnreachableError
from .sampling import GenerationConfig

# the openai client's transport: a connection that breaks mid-stream raises its errors unwrapped
HTTP_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2")


def png_data_url(rgb: np.ndarray) -> str:
    """An RGB frame as a lossless PNG data URL: the server sees the pixels the local engine
    would."""
    from PIL import Image

    from .preprocess import as_rgb

    buffer = io.BytesIO()
    Image.fromarray(as_rgb(np.asarray(rgb))).save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class RemoteAnswerer(AnswerAtTheEnd):
    """Answers through the chat-completions API of the server at ``base_url`` (``.../v1``)."""

    def __init__(
        self,
        base_url: str,
        model: str = "",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ):
        try:
            import openai
        except ImportError as e:
            raise InternVLError(
                "the remote answerer needs the openai package (pip install -r "
                "requirements/serve.txt)"
            ) from e
        self._openai = openai
        self.base_url = base_url.rstrip("/")
        self.backend = self.base_url
        self.model = model
        self.system_prompt = system_prompt
        self.timeout_s = timeout_s
        # the key is never logged; "none" where the server needs none (the client wants a value)
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key or "none", timeout=timeout_s, max_retries=0
        )

    def describe(self) -> str:
        return f"the server {self.base_url} (model {self.model or 'its first'})"

    def _model(self) -> str:
        if not self.model:
            with self._errors():
                models = self._client.models.list().data
            if not models:
                raise ServerError(f"{self.base_url}: the server lists no model")
            self.model = models[0].id
        return self.model

    @contextlib.contextmanager
    def _errors(self):
        """The openai client's failures as the node's: unreachable, or the server's error."""
        openai, url = self._openai, self.base_url
        try:
            yield
        except openai.APITimeoutError as e:
            raise ServerUnreachableError(f"{url}: no answer within the timeout") from e
        except openai.APIConnectionError as e:
            raise ServerUnreachableError(f"{url}: unreachable ({e.__cause__ or e})") from e
        except openai.APIStatusError as e:
            raise ServerError(f"{url}: HTTP {e.status_code}: {_message(e)}") from e
        except openai.OpenAIError as e:
            raise ServerError(f"{url}: {e}") from e
        except Exception as e:
            if type(e).__module__.split(".")[0] not in HTTP_MODULES:
                raise
            raise ServerUnreachableError(f"{url}: the connection broke ({e})") from e

    def messages(self, request: Request) -> list[dict]:
        frames = list(request.video_frames) or list(request.images)
        content = [{"type": "image_url", "image_url": {"url": png_data_url(f)}} for f in frames]
        content.append({"type": "text", "text": checked_question(request)})
        system = self.system_prompt if request.system_prompt is None else request.system_prompt
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    def stream(
        self,
        request: Request,
        config: GenerationConfig = GenerationConfig(),
        cancel: threading.Event | None = None,
    ) -> Iterator[Chunk | Answer]:
        started = time.perf_counter()
        choices = checked_choices(request.choices)
        extra: dict = {}
        if request.video_frames:
            extra["video"] = True
        if request.max_tiles != 1:
            extra["max_tiles"] = request.max_tiles
        if choices:
            extra["structured_outputs"] = {"choice": list(request.choices)}
        messages = self.messages(request)  # checks the question before the server is asked
        # vLLM drops special tokens from answers, <ref> and <box> among them (the parser reads the
        # bare [[...]] too, but the phrase of each box would be lost)
        extra["skip_special_tokens"] = False
        extra["spaces_between_special_tokens"] = False  # "<ref> cup </ref>" otherwise
        arguments = dict(
            model=self._model(),
            messages=messages,
            max_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra or None,
        )
        if config.seed is not None:
            arguments["seed"] = config.seed
        if config.stop:
            arguments["stop"] = list(config.stop)
        if choices:
            arguments |= dict(logprobs=True, top_logprobs=min(20, max(5, len(choices))))
        text, finish, usage, first_at, server_timings = [], "length", None, None, {}
        first_logprobs, server_choice = None, {}
        with self._errors():
            stream = self._client.chat.completions.create(**arguments)
            try:
                for event in stream:
                    if getattr(event, "error", None):  # an error sent inside the stream
                        raise ServerError(f"{self.base_url}: {_message(event)}")
                    if event.usage is not None:
                        usage = event.usage
                    for choice in event.choices:
                        extra_fields = choice.model_extra or {}
                        server_timings = extra_fields.get("timings") or server_timings
                        if "choice_probabilities" in extra_fields:
                            server_choice = extra_fields
                        if choice.logprobs and choice.logprobs.content and first_logprobs is None:
                            first_logprobs = choice.logprobs.content[0]
                        if choice.delta.content:
                            if first_at is None:
                                first_at = time.perf_counter()
                            text.append(choice.delta.content)
                            if not choices:
                                yield Chunk(choice.delta.content)
                        if choice.finish_reason:
                            finish = "length" if choice.finish_reason == "length" else "stop"
                    if cancel is not None and cancel.is_set():
                        finish = "cancelled"
                        break
            finally:
                stream.close()  # a cancelled answer: the server sees the client leave
        answer_text = "".join(text)
        timings = Timings(
            vit_ms=list(server_timings.get("vit_ms", [])),
            prefill_tokens=usage.prompt_tokens if usage else 0,
            ttft_ms=server_timings.get("ttft_ms")
            or ((first_at or time.perf_counter()) - started) * 1e3,
            decode_tokens=server_timings.get("decode_tokens", 0),
            decode_ms_per_token=server_timings.get("decode_ms_per_token", 0.0),
            decode_tokens_per_s=server_timings.get("decode_tokens_per_s", 0.0),
            total_ms=(time.perf_counter() - started) * 1e3,
        )
        frames = list(range(len(request.video_frames) or len(request.images)))
        if not choices or finish == "cancelled":
            answer = Answer("" if choices else answer_text, [], [], timings, finish, frames)
            yield with_boxes(answer, request) if not choices else answer
            return
        index, probabilities = self._chosen(
            request.choices, answer_text, server_choice, first_logprobs
        )
        yield Chunk(request.choices[index].strip())
        yield Answer(
            request.choices[index].strip(), [], [], timings, "stop", frames, index, probabilities
        )

    def _chosen(self, choices, text, server_choice, first_logprobs) -> tuple[int, list[float]]:
        """The chosen choice's index and every choice's probability."""
        if "choice_probabilities" in server_choice:
            return int(server_choice["choice_index"]), list(server_choice["choice_probabilities"])
        stripped = [c.strip() for c in choices]
        if text.strip() not in stripped:
            raise ServerError(
                f"{self.base_url}: answered {text!r}, none of the choices (does the server "
                "support structured_outputs?)"
            )
        index = stripped.index(text.strip())
        if first_logprobs is not None:
            # a choice's probability as its first token's, among the choices' first tokens: exact
            # where the choices differ from their first token (yes / no, colour names)
            top = {t.token: t.logprob for t in first_logprobs.top_logprobs or ()}
            top.setdefault(first_logprobs.token, first_logprobs.logprob)
            scores = [
                max((lp for tok, lp in top.items() if tok and c.startswith(tok)), default=None)
                for c in stripped
            ]
            if scores[index] is not None:
                best = max(s for s in scores if s is not None)
                weights = [0.0 if s is None else math.exp(s - best) for s in scores]
                total = sum(weights)
                return index, [w / total for w in weights]
        return index, [1.0 if i == index else 0.0 for i in range(len(choices))]


def _message(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    error = getattr(e, "error", None)
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return getattr(e, "message", None) or str(e)
