"""``internvl-serve``: the engine behind the OpenAI chat-completions API, for a few clients on a LAN
box, or on the AX650N itself (its axengine path served the same way, as ``axllm serve`` does).

Built on Starlette (the ASGI toolkit FastAPI and vLLM's server build on) and uvicorn: well kept, and
small enough to read; requests are checked here, so every refusal is in OpenAI's error format with
the engine's own message. One engine, one worker thread that owns it, a bounded queue (429 when it
is full); a client that disconnects cancels its answer between two tokens, or takes it out of the
queue. It listens on 127.0.0.1 unless told otherwise; with ``INTERNVL_SERVE_API_KEY`` set, every
request needs it as a bearer token (never logged). Remote image URLs are refused unless
``--allow-remote-images``: the server fetches nothing by default.

Endpoints: ``POST /v1/chat/completions`` (system and user messages, text and ``image_url`` parts as
data URLs, several images, ``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``,
``seed``, ``stop``, ``stream`` with SSE chunks and ``[DONE]``, ``logprobs``/``top_logprobs``, vLLM's
``structured_outputs: {choice: [...]}``), ``GET /v1/models``, ``GET /health``. Extensions a client
of this server may read: ``"video": true`` in the request (its images are a clip's frames, in time
order), ``max_tiles`` (dynamic tiling per image), ``timings`` in the response (ViT ms, TTFT, decode
tokens/s: what a client cannot time), and ``choice_index`` / ``choice_probabilities`` in a choice
answered with ``structured_outputs``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import io
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator

import numpy as np

from .answering import Answer, Chunk, Request
from .errors import ImageError, InternVLError, InvalidRequestError, PromptTooLongError
from .grounding import grounded_phrase
from .sampling import GenerationConfig

API_KEY_VARIABLE = "INTERNVL_SERVE_API_KEY"
MAX_STOP_TEXTS = 4  # as OpenAI's API
log = logging.getLogger("internvl-serve")


class ServeError(InternVLError):
    """A request refused with an HTTP status, in OpenAI's error format."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None) -> ServeError:
    return ServeError(400, message, "invalid_request_error", param)


def engine_error(e: InternVLError) -> ServeError:
    """The engine's refusal as the client sees it: its own message."""
    if isinstance(e, ServeError):
        return e
    if isinstance(e, (InvalidRequestError, ImageError, PromptTooLongError)):
        code = "context_length_exceeded" if isinstance(e, PromptTooLongError) else None
        return ServeError(400, str(e), "invalid_request_error", None, code)
    return ServeError(500, f"{type(e).__name__}: {e}", "server_error")


# -- the request ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Parsed:
    request: Request
    config: GenerationConfig
    stream: bool
    include_usage: bool
    logprobs: bool


def decode_image(url: str, param: str, allow_remote: bool) -> np.ndarray:
    """An ``image_url`` as RGB pixels: a ``data:`` URL (base64), or with ``allow_remote`` an
    http(s) URL fetched once."""
    from PIL import Image, UnidentifiedImageError

    from .preprocess import as_rgb

    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise invalid("an image data URL must be data:<type>;base64,<data>", param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise invalid(f"the image data URL is not valid base64 ({e})", param) from e
    elif url.startswith(("http://", "https://")):
        if not allow_remote:
            raise invalid(
                "remote image URLs are refused (start the server with --allow-remote-images); "
                "send the image as a data URL",
                param,
            )
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                data = response.read(64 << 20)
        except OSError as e:
            raise invalid(f"cannot fetch the image {url!r} ({e})", param) from e
    else:
        raise invalid("an image URL must be a data: URL (or http(s) where allowed)", param)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return as_rgb(np.asarray(image.convert("RGB")))
    except UnidentifiedImageError as e:
        raise invalid(
            "the image data is not in a format Pillow reads (PNG, JPEG, ...)", param
        ) from e
    except Exception as e:  # Pillow's decoders raise many kinds (a decompression bomb, ...)
        raise invalid(f"the image cannot be decoded ({type(e).__name__}: {e})", param) from e


def _number(body: dict, name: str, kind, default):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise invalid(f"{name} must be an integer, not {value!r}", name)
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise invalid(f"{name} must be a number, not {value!r}", name)
    return kind(value)


def parse_request(body, model_name: str, allow_remote: bool, default_max_tokens: int) -> Parsed:
    """A chat-completions body as the engine's Request and GenerationConfig."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    if body.get("model") not in (None, "", model_name):  # none named: the one served
        raise ServeError(
            404,
            f"the model {body.get('model')!r} does not exist; this server has {model_name!r}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    system, question, images = None, None, []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid("each message must be an object", f"messages[{i}]")
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            if question is not None or system is not None:
                raise invalid("one system message, before the user's", f"messages[{i}]")
            system = _text_only(content, f"messages[{i}].content")
        elif role == "user":
            if question is not None:
                raise invalid(
                    "this server answers one user message (with its images); it keeps no "
                    "conversation: send the question alone",
                    f"messages[{i}]",
                )
            question, images = _user_content(content, f"messages[{i}].content", allow_remote)
        else:
            raise invalid(
                f"role {role!r} is not served here (system and one user message)",
                f"messages[{i}].role",
            )
    if question is None:
        raise invalid("no user message", "messages")
    video = body.get("video", False)
    if not isinstance(video, bool):
        raise invalid("video must be true or false", "video")
    choices = ()
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict) or set(structured) - {"choice"}:
            raise invalid("structured_outputs supports {choice: [...]} only", "structured_outputs")
        choices = structured.get("choice")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise invalid(
                "structured_outputs.choice must be a list of strings", "structured_outputs"
            )
    max_tokens = _number(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, default_max_tokens)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise invalid("stop must be a string or a list of non-empty strings", "stop")
    if len(stop) > MAX_STOP_TEXTS:
        raise invalid(f"stop takes at most {MAX_STOP_TEXTS} texts", "stop")
    if _number(body, "n", int, 1) != 1:
        raise invalid("n must be 1 (one answer per request)", "n")
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise invalid("logprobs must be true or false", "logprobs")
    top = _number(body, "top_logprobs", int, 0)
    if top and not logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    try:
        config = GenerationConfig(
            max_new_tokens=max_tokens,
            min_new_tokens=_number(body, "min_tokens", int, 0),  # vLLM's extension
            temperature=_number(body, "temperature", float, 0.0),
            top_p=_number(body, "top_p", float, 1.0),
            top_k=max(0, _number(body, "top_k", int, 0)),  # vLLM's -1: no limit
            repetition_penalty=_number(body, "repetition_penalty", float, 1.0),
            seed=_number(body, "seed", int, None),
            stop=tuple(stop),
            logprobs=top if logprobs else None,
        )
        phrase = grounded_phrase(question)  # asked as the engine asks it, <ref> a special token
        request = Request(
            "" if phrase else question,
            ground=phrase,
            images=() if video else tuple(images),
            video_frames=tuple(images) if video else (),
            max_tiles=_number(body, "max_tiles", int, 1),
            system_prompt=system,
            choices=tuple(choices),
        )
    except InternVLError as e:
        raise invalid(str(e)) from e
    return Parsed(request, config, stream, bool(options.get("include_usage")), logprobs)


def _text_only(content, param: str) -> str:
    if isinstance(content, str):
        return content
    text, images = _user_content(content, param, False, images_allowed=False)
    return text


def _user_content(content, param: str, allow_remote: bool, images_allowed: bool = True):
    """The question's text and its images (in order) from a message's content."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise invalid("content must be a string or a list of parts", param)
    texts, images = [], []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and images_allowed:
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise invalid("image_url needs a url", where)
            images.append(decode_image(url, where, allow_remote))
        else:
            raise invalid(f"unsupported content part {kind!r} here", where)
    return "\n".join(texts), images


# -- the worker ----------------------------------------------------------------------------------


class Job:
    """One request's generation: the worker thread puts Chunk, Answer or an exception on ``items``
    through the event loop; ``cancel`` stops it between two tokens (or before it starts)."""

    def __init__(self, parsed: Parsed, loop: asyncio.AbstractEventLoop):
        self.parsed, self.loop = parsed, loop
        self.items: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)


class Worker:
    """The one thread that owns the answerer; at most ``max_queue`` jobs wait for it."""

    def __init__(self, answerer, max_queue: int):
        self.answerer = answerer
        self.jobs: queue.Queue = queue.Queue(max_queue)
        self.busy = False
        self._thread = threading.Thread(target=self._run, name="internvl-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ServeError(
                429,
                f"the server is busy: {self.jobs.maxsize} requests are waiting; retry later",
                "rate_limit_error",
                None,
                "queue_full",
            ) from None

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancel.is_set():  # its client left while it waited
                continue
            self.busy = True
            try:
                for item in self.answerer.stream(job.parsed.request, job.parsed.config, job.cancel):
                    job.put(item)
            except InternVLError as e:
                job.put(engine_error(e))
            except Exception as e:  # an unforeseen failure costs this request, not the server
                log.exception("request failed")
                job.put(ServeError(500, f"{type(e).__name__}: {e}", "server_error"))
            finally:
                self.busy = False

    def close(self) -> None:
        self.jobs.put(None)
        self._thread.join(5)


# -- the responses -------------------------------------------------------------------------------


def finish_reason(answer: Answer) -> str:
    return "length" if answer.finish_reason == "length" else "stop"


def usage(answer: Answer) -> dict:
    prompt, completion = len(answer.prompt_token_ids), len(answer.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def timings(answer: Answer) -> dict:
    return dataclasses.asdict(answer.timings)


class Responder:
    """The OpenAI response objects for one request."""

    def __init__(self, model: str, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def logprobs(self, entries) -> dict:
        def token(token_id: int, logprob: float) -> dict:
            text = self.tokenizer.decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                token(e.token, e.logprob) | {"top_logprobs": [token(i, lp) for i, lp in e.top]}
                for e in entries
            ]
        }

    def completion(self, answer: Answer, with_logprobs: bool, entries) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": answer.text},
            "logprobs": self.logprobs(entries) if with_logprobs else None,
            "finish_reason": finish_reason(answer),
        }
        if answer.choice_index >= 0:
            choice |= {
                "choice_index": answer.choice_index,
                "choice_probabilities": answer.choice_probabilities,
            }
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(answer),
            "timings": timings(answer),
        }

    def chunk(self, delta: dict, finish=None, logprobs=None, extra=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice | (extra or {})],
        }
        return sse(body)


def sse(body) -> str:
    return f"data: {json.dumps(body)}\n\n"


def error_response(e: ServeError):
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status)


# -- the app -------------------------------------------------------------------------------------


def build_app(
    answerer,
    model_name: str,
    max_queue: int = 8,
    allow_remote_images: bool = False,
    default_max_tokens: int = 256,
    api_key: str | None = None,
):
    """The ASGI app over ``answerer`` (an Engine, or anything with ``stream`` and a tokenizer)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    worker = Worker(answerer, max_queue)

    def authorised(request) -> bool:
        if not api_key:
            return True
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # in constant time: how long a refusal takes says nothing of the key
        return scheme.lower() == "bearer" and hmac.compare_digest(
            key.strip().encode(), api_key.encode()
        )

    unauthorised = ServeError(
        401, "a valid API key is needed (Authorization: Bearer ...)", "authentication_error"
    )

    async def health(request):
        return JSONResponse({"status": "ok", "busy": worker.busy, "waiting": worker.jobs.qsize()})

    async def models(request):
        if not authorised(request):
            return error_response(unauthorised)
        model = {"id": model_name, "object": "model", "created": 0, "owned_by": "internvl_ros"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat(request):
        if not authorised(request):
            return error_response(unauthorised)
        try:
            try:
                body = await request.json()
            except (ValueError, UnicodeDecodeError) as e:
                raise invalid(f"the request body is not JSON ({e})") from e
            parsed = await asyncio.to_thread(
                parse_request, body, model_name, allow_remote_images, default_max_tokens
            )
            job = Job(parsed, asyncio.get_running_loop())
            worker.submit(job)
        except ServeError as e:
            return error_response(e)
        responder = Responder(model_name, answerer.tokenizer)
        if parsed.stream:
            return StreamingResponse(streamed(job, responder), media_type="text/event-stream")
        return await whole(job, responder, request)

    async def whole(job: Job, responder: Responder, request):
        # the client's leaving comes as http.disconnect on the request's channel
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel.set()

        watcher = asyncio.create_task(watch())
        entries = []
        try:
            while True:
                item = await job.items.get()
                if isinstance(item, ServeError):
                    return error_response(item)
                if isinstance(item, Chunk):
                    entries.extend(item.logprobs)
                elif isinstance(item, Answer):
                    return JSONResponse(responder.completion(item, job.parsed.logprobs, entries))
        finally:
            watcher.cancel()
            job.cancel.set()  # a no-op once answered

    async def streamed(job: Job, responder: Responder) -> AsyncIterator[str]:
        try:
            yield responder.chunk({"role": "assistant", "content": ""})
            while True:
                item = await job.items.get()
                if isinstance(item, ServeError):
                    yield sse(item.body())
                    break
                if isinstance(item, Chunk):
                    logprobs = responder.logprobs(item.logprobs) if job.parsed.logprobs else None
                    yield responder.chunk({"content": item.text}, logprobs=logprobs)
                elif isinstance(item, Answer):
                    extra = {"timings": timings(item)}
                    if item.choice_index >= 0:
                        extra |= {
                            "choice_index": item.choice_index,
                            "choice_probabilities": item.choice_probabilities,
                        }
                    yield responder.chunk({}, finish_reason(item), extra=extra)
                    if job.parsed.include_usage:
                        yield sse(
                            {
                                "id": responder.id,
                                "object": "chat.completion.chunk",
                                "created": responder.created,
                                "model": responder.model,
                                "choices": [],
                                "usage": usage(item),
                            }
                        )
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client left mid-stream (Starlette cancels this generator) or it ended
            job.cancel.set()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.worker = worker
    return app


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_model_arguments

    ap = argparse.ArgumentParser(
        prog="internvl-serve",
        description="The engine behind the OpenAI chat-completions API (POST /v1/chat/completions, "
        "GET /v1/models, GET /health), for a few clients: one engine, one request at a time, a "
        f"bounded queue. With {API_KEY_VARIABLE} set, requests need it as a bearer token.",
        epilog="Example:\n  internvl-serve --model-dir model --port 8000\n"
        "  curl localhost:8000/v1/chat/completions -d "
        '\'{"messages": [{"role": "user", "content": "Hello"}]}\'',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(ap)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one)")
    ap.add_argument("--model-name", help="the model's name in the API (default: the directory's)")
    ap.add_argument(
        "--max-queue", type=int, default=8, help="requests that may wait (default 8; then 429)"
    )
    ap.add_argument(
        "--max-tokens", type=int, default=256, help="answer length without max_tokens (256)"
    )
    ap.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (default: data URLs only; the server fetches nothing)",
    )
    return ap


def main(argv=None) -> int:
    import sys

    from .cli import exit_on_sigterm, log_to_stderr, open_engine

    args = build_parser().parse_args(argv)
    log_to_stderr("internvl-serve")
    log.setLevel(logging.INFO)
    exit_on_sigterm()
    if args.max_queue < 1 or args.max_tokens < 1:
        print("internvl-serve: error: --max-queue and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        import uvicorn
    except ImportError:
        print(
            "internvl-serve: error: needs starlette and uvicorn (pip install -r "
            "requirements/serve.txt)",
            file=sys.stderr,
        )
        return 2
    try:
        engine = open_engine(args)
    except InternVLError as e:
        print(f"internvl-serve: error: {e}", file=sys.stderr)
        return 2
    name = args.model_name or (args.model_dir or args.axmodel_path).resolve().name
    app = build_app(
        engine,
        name,
        args.max_queue,
        args.allow_remote_images,
        args.max_tokens,
        os.environ.get(API_KEY_VARIABLE) or None,
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)

    # the address actually bound (with --port 0, the free port chosen), once it listens
    async def announce():
        while not server.started:
            await asyncio.sleep(0.05)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                print(
                    f"internvl-serve: {name} on {engine.describe()}; listening on "
                    f"http://{host}:{port}/v1",
                    file=sys.stderr,
                    flush=True,
                )

    async def serve():
        task = asyncio.create_task(announce())
        await server.serve()
        task.cancel()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
