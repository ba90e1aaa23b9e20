"""internvl-serve as its own process, through the official openai client: whole and streamed
answers equal to the engine's, choices with probabilities, logprobs, stop texts, OpenAI-format
errors, the bounded queue, disconnects; the remote answerer against it; and the stop-text filter."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_toy import RED_CIRCLE

from internvl_engine import Engine, GenerationConfig, Request
from internvl_engine.errors import ServerError, ServerUnreachableError
from internvl_engine.sampling import StopTexts
from internvl_toy.scenes import CLIP_FRAMES, Shape, ground_task, moving_clip, render

openai = pytest.importorskip("openai", reason="needs openai (requirements/serve.txt)")
pytest.importorskip("starlette", reason="needs starlette (requirements/serve.txt)")
BIN = Path(sys.executable).parent
TRIANGLE = render([Shape("triangle", "blue", 0.5, 0.5, 0.25)], 320, 240)
CIRCLE = render([Shape("circle", "blue", 0.5, 0.5, 0.25)], 320, 240)


class Server:
    """``internvl-serve`` on a free port (or ``port``), until stopped."""

    def __init__(self, model_dir, *args, port: int = 0, env: dict | None = None, log: Path):
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [
                str(BIN / "internvl-serve"),
                "--model-dir",
                str(model_dir),
                "--port",
                str(port),
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 60
        while not (found := re.search(r"listening on (http://\S+)", self.log())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"internvl-serve did not start:\n{self.log()}")
            time.sleep(0.05)
        self.url = found.group(1)
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, kill: bool = False) -> None:
        """Stopped as a service is (uvicorn finishes the answers under way), or ``kill``ed as a
        crash or a power cut stops it."""
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(20)
        self._log.close()

    def health(self) -> dict:
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=5) as r:
            return json.load(r)

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, **kwargs)


@pytest.fixture(scope="module")
def toy_server(toy_model, tmp_path_factory):
    server = Server(toy_model, log=tmp_path_factory.mktemp("serve") / "serve.log")
    yield server
    server.stop()
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="module")
def toy_engine(toy_model):
    return Engine(toy_model)


def data_url(rgb, fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def user(question, *images):
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


# -- the stop-text filter ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pieces, stop, shown, hit",
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["ab", "c"], ["bc", "c"], "a", True),  # the earliest stop text wins
        (["a", "b"], ["bx"], "ab", False),  # held back while it may become "bx", then shown
        (["x<", "|e", "nd|>y"], ["<|end|>"], "x", True),
        (["no stop"], [], "no stop", False),
    ],
)
def test_stop_texts_end_the_text_before_the_first_stop(pieces, stop, shown, hit):
    stops = StopTexts(stop)
    out = "".join(stops.push(p) for p in pieces) + stops.flush()
    assert (out, stops.text, stops.hit) == (shown, shown, hit)


def test_the_engine_stops_at_a_stop_text_and_gives_logprobs(toy_engine):
    request = Request("What color is the shape?", images=[RED_CIRCLE])
    free = toy_engine.answer(request, GenerationConfig(max_new_tokens=6))
    assert free.text.strip() == "red"
    stopped = toy_engine.answer(request, GenerationConfig(max_new_tokens=6, stop=("e",)))
    assert (stopped.text, stopped.finish_reason) == (free.text[: free.text.index("e")], "stop")
    longer = toy_engine.answer(
        request, GenerationConfig(max_new_tokens=9, min_new_tokens=len(free.token_ids) + 3)
    )
    assert longer.text.startswith(free.text) and len(longer.token_ids) >= len(free.token_ids) + 3
    items = list(toy_engine.stream(request, GenerationConfig(max_new_tokens=6, logprobs=3)))
    entries = [e for item in items[:-1] for e in item.logprobs]
    assert [e.token for e in entries] == items[-1].token_ids
    for e in entries:  # greedy: the chosen token is the likeliest, listed first
        assert e.top[0] == (e.token, pytest.approx(e.logprob)) and len(e.top) == 3
        assert e.logprob <= 0 and e.top[0][1] >= e.top[1][1] >= e.top[2][1]


# -- internvl-serve through the openai client ----------------------------------------------------


def test_whole_and_streamed_answers_are_the_engines(toy_server, toy_engine):
    client = toy_server.client()
    [model] = client.models.list().data
    for question, images in (
        ("What color is the shape?", [RED_CIRCLE]),
        ("Which image has a triangle?", [CIRCLE, TRIANGLE]),
    ):
        local = toy_engine.answer(Request(question, images=images), GenerationConfig(6))
        whole = client.chat.completions.create(
            model=model.id, messages=user(question, *images), max_tokens=6
        )
        assert whole.choices[0].message.content == local.text
        assert whole.usage.prompt_tokens == len(local.prompt_token_ids)
        assert whole.usage.completion_tokens == len(local.token_ids)
        assert whole.model_extra["timings"]["prefill_tokens"] == len(local.prompt_token_ids)
        chunks = list(
            client.chat.completions.create(
                messages=user(question, *images),
                model=model.id,
                max_completion_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == local.text and chunks[-1].usage.completion_tokens == len(local.token_ids)
    assert local.text.strip() == "Image-2"


def test_a_clip_as_video_frames(toy_server, toy_engine):
    clip = moving_clip("circle", "green", "left", frames=CLIP_FRAMES)
    answer = toy_server.client().chat.completions.create(
        model="",
        messages=user("Which way does the circle move?", *clip),
        extra_body={"video": True},
    )
    assert answer.choices[0].message.content.strip() == "left"


def test_choices_with_the_engines_probabilities_and_logprobs(toy_server, toy_engine):
    question, colors = "What color is the shape?", ["blue", "red", "green"]
    local = toy_engine.answer(Request(question, images=[RED_CIRCLE], choices=colors))
    answer = toy_server.client().chat.completions.create(
        model="",
        messages=user(question, RED_CIRCLE),
        extra_body={"structured_outputs": {"choice": colors}},
    )
    choice = answer.choices[0]
    assert choice.message.content == "red" == local.text
    assert choice.model_extra["choice_index"] == 1
    np.testing.assert_allclose(
        choice.model_extra["choice_probabilities"], local.choice_probabilities, atol=1e-6
    )
    free = toy_server.client().chat.completions.create(
        model="", messages=user(question, RED_CIRCLE), logprobs=True, top_logprobs=2, max_tokens=3
    )
    entries = free.choices[0].logprobs.content
    assert len(entries) == free.usage.completion_tokens and all(
        len(e.top_logprobs) == 2 for e in entries
    )
    assert entries[0].token == entries[0].top_logprobs[0].token


def test_errors_are_in_openais_format_with_the_engines_messages(toy_server):
    client = toy_server.client()
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=user("Hi"))
    assert caught.value.body["code"] == "model_not_found" and "gpt-9" in caught.value.message
    bad = [
        ({"messages": []}, "messages must be a non-empty list"),
        ({"messages": user("Hi"), "temperature": -1}, "temperature must be >= 0"),
        ({"messages": user("Hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop takes at most 4"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool' is not served"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,AAAA"},
                            }
                        ],
                    }
                ]
            },
            "not in a format Pillow reads",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
                        ],
                    }
                ]
            },
            "remote image URLs are refused",
        ),
        ({"messages": user("Hi " * 2000)}, "this model build accepts at most 1152"),
    ]
    for body, message in bad:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="", **body)
        assert message in caught.value.message, (body, caught.value.message)
        assert caught.value.body["type"] == "invalid_request_error"
    assert caught.value.body["code"] == "context_length_exceeded"
    assert client.chat.completions.create(model="", messages=user("Hi"), max_tokens=2).choices


def test_api_key_queue_limit_and_disconnect(endless_model, tmp_path):
    server = Server(
        endless_model,
        "--max-queue",
        "1",
        env={"INTERNVL_SERVE_API_KEY": "k3y"},
        log=tmp_path / "s.log",
    )
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client().models.list()
        client = openai.OpenAI(base_url=server.url, api_key="k3y", max_retries=0)
        assert client.models.list().data
        # a client that leaves mid-stream frees the engine at once
        stream = client.chat.completions.create(
            model="", messages=user("Tell me a long story."), max_tokens=4096, stream=True
        )
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 2
        while server.health()["busy"]:
            assert time.monotonic() < deadline, "the answer went on after its client left"
            time.sleep(0.02)
        # one answering, one waiting: a third is refused with 429
        results = []

        def long_answer():
            try:
                results.append(
                    client.chat.completions.create(
                        model="", messages=user("Go on."), max_tokens=4096
                    ).usage.completion_tokens
                )
            except openai.RateLimitError as e:
                results.append(e)

        threads = [threading.Thread(target=long_answer) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join(60)
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(refused) == 1 and results.count(4096) == 2, results
        assert "requests are waiting" in refused[0].message
        assert "k3y" not in server.log()
    finally:
        server.stop()


# -- the remote answerer -------------------------------------------------------------------------


def test_remote_answerer_gives_the_engines_answers(toy_server, toy_engine, tmp_path):
    from internvl_engine.remote import RemoteAnswerer

    remote = RemoteAnswerer(toy_server.url)
    for request in (
        Request("What color is the shape?", images=[RED_CIRCLE]),
        Request("What shape is it?", images=[RED_CIRCLE]),
        Request("Which image has a triangle?", images=[TRIANGLE, CIRCLE]),
        Request(
            "Which way does the circle move?",
            video_frames=moving_clip("circle", "green", "right", frames=CLIP_FRAMES),
        ),
        Request("What color is the shape?", images=[RED_CIRCLE], choices=["blue", "red"]),
    ):
        local = toy_engine.answer(request, GenerationConfig(6))
        got = remote.stream(request, GenerationConfig(6))
        *chunks, answer = list(got)
        assert answer.text == local.text == "".join(c.text for c in chunks)
        np.testing.assert_allclose(
            answer.choice_probabilities, local.choice_probabilities, atol=1e-6
        )
    # a grounding question: the server asks it as the engine does (<ref> its special token), and
    # the boxes come back from the answer's text in pixels of the image
    scene = ground_task(np.random.default_rng(1), 640, 480)
    request = Request("", images=scene.images, ground=scene.ground)
    local = toy_engine.answer(request, GenerationConfig(64))
    answer = remote.answer(request, GenerationConfig(64))
    assert answer.text == local.text and answer.text.startswith(f"<ref>{scene.ground}</ref><box>")
    assert answer.boxes == local.boxes and len(answer.boxes) == 1
    assert answer.prompt_token_ids == [] and answer.timings.prefill_tokens == len(
        local.prompt_token_ids
    )
    down = RemoteAnswerer(f"http://127.0.0.1:{free_port()}/v1", model="toy", timeout_s=2)
    with pytest.raises(ServerUnreachableError, match="unreachable"):
        list(down.stream(Request("Hi")))
    with pytest.raises(ServerError, match="HTTP 404: the model 'nope' does not exist"):
        list(RemoteAnswerer(toy_server.url, model="nope").stream(Request("Hi")))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_internvl_infer_asks_a_server(toy_server, tmp_path):
    image = tmp_path / "red.png"
    Image.fromarray(RED_CIRCLE).save(image)
    common = [str(BIN / "internvl-infer"), "--server-url", toy_server.url, "-i", str(image)]
    run = subprocess.run(
        [*common, "-q", "What color is the shape?", "--json"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["text"].strip() == "red"
    run = subprocess.run(
        [*common, "-q", "What shape is it?", "--choices", "circle,square"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "answer >> circle" in run.stdout, run.stdout + run.stderr
    down = f"http://127.0.0.1:{free_port()}/v1"
    run = subprocess.run(
        [str(BIN / "internvl-infer"), "--server-url", down, "--server-model", "m", "-q", "Hi"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.startswith(
        f"internvl-infer: error: {down}: unreachable"
    )
