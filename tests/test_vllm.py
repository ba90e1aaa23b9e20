"""vLLM (its CPU build) serving the toy checkpoint in transformers' native layout
(internvl-export-native), asked through the remote answerer and through the node: the demo's
questions answered as the local engine answers them, from the same prompt token ids, and choice
probabilities near the engine's.

vLLM lives in its own environment (``make test-vllm`` builds build/vllm and sets
INTERNVL_VLLM_PYTHON); elsewhere these tests skip and say so."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import rclpy
from conftest import TOY
from ros_harness import image_msg
from test_node import deliver, running_node
from test_serve import CIRCLE, TRIANGLE, free_port
from test_toy import RED_CIRCLE
from test_toy_node import answer_about_a_clip

from internvl_engine import Engine, GenerationConfig, Request
from internvl_toy.scenes import CLIP_FRAMES, ground_task, moving_clip

VLLM_PYTHON = os.environ.get("INTERNVL_VLLM_PYTHON", "")
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON,
    reason="needs vLLM's environment: make test-vllm builds it (build/vllm) and runs these",
)
# The engine scores a choice with the end of its turn, P("yes" <|im_end|>); from vLLM the remote
# answerer has the first token's probability among the choices', P("yes"): near, not equal.
CHOICE_TOLERANCE = 0.005


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("transformers", reason="internvl-export-native needs transformers")
    from internvl_engine.tools.native import export_native

    work = tmp_path_factory.mktemp("vllm")
    native = export_native(TOY, work / "toy-native")
    port = free_port()
    log = open(work / "vllm.log", "w")
    proc = subprocess.Popen(
        [
            VLLM_PYTHON,
            *("-m", "vllm.entrypoints.openai.api_server", "--model", str(native)),
            *("--served-model-name", "internvl-toy", "--port", str(port), "--dtype", "float32"),
            *("--enforce-eager", "--max-model-len", "2048"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # one process (the fastest start here), and a small KV cache: the toy model is small
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline, started = time.monotonic() + 300, time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"vLLM did not start:\n{(work / 'vllm.log').read_text()[-5000:]}")
            time.sleep(1)
    print(f"vLLM ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
    yield f"{url}/v1"
    proc.terminate()
    proc.wait(60)


@pytest.fixture(scope="module")
def toy_engine(toy_model):
    return Engine(toy_model)


DEMO = [
    Request("What color is the shape?", images=[RED_CIRCLE]),
    Request("What shape is it?", images=[RED_CIRCLE]),
    Request("How many shapes are there?", images=[RED_CIRCLE]),
    Request("Which image has a triangle?", images=[CIRCLE, TRIANGLE]),
]


def test_vllm_answers_as_the_engine_from_the_same_prompt(vllm_server, toy_engine):
    from internvl_engine.remote import RemoteAnswerer

    remote = RemoteAnswerer(vllm_server)
    for request in DEMO:
        local = toy_engine.answer(request, GenerationConfig(16))
        answer = remote.answer(request, GenerationConfig(16))
        assert answer.text == local.text, request.question
        assert answer.timings.prefill_tokens == len(local.prompt_token_ids), request.question
    for request in (
        Request("What color is the shape?", images=[RED_CIRCLE], choices=["blue", "red", "green"]),
        Request("Is there a red shape?", images=[RED_CIRCLE], choices=["yes", "no"]),
    ):
        local, answer = toy_engine.answer(request), remote.answer(request)
        assert answer.choice_index == local.choice_index
        np.testing.assert_allclose(
            answer.choice_probabilities, local.choice_probabilities, atol=CHOICE_TOLERANCE
        )
    # a clip: vLLM takes the frames as images (Image-k, not the engine's Frame-k labels)
    clip = Request(
        "Which way does the circle move?",
        video_frames=moving_clip("circle", "green", "right", frames=CLIP_FRAMES),
    )
    assert remote.answer(clip, GenerationConfig(6)).text.strip() == "right"
    # a grounding question: vLLM keeps <ref> and <box> (skip_special_tokens: false), and the
    # boxes are the engine's
    scene = ground_task(np.random.default_rng(1), 640, 480)
    request = Request("", images=scene.images, ground=scene.ground)
    local = toy_engine.answer(request, GenerationConfig(64))
    answer = remote.answer(request, GenerationConfig(64))
    assert answer.text == local.text and answer.boxes == local.boxes and len(answer.boxes) == 1
    assert answer.timings.prefill_tokens == len(local.prompt_token_ids)


@pytest.fixture(scope="module")
def ros():
    rclpy.init()
    yield
    rclpy.shutdown()


def test_the_node_answers_the_demos_questions_through_vllm(vllm_server, tmp_path, ros):
    remote = dict(server_url=vllm_server, max_new_tokens=6, camera_qos="reliable")
    with running_node("", tmp_path, max_images=1, **remote) as (_, client):
        deliver(client, "/image_raw", image_msg(RED_CIRCLE, "rgb8"))
        assert client.ask_and_wait("What color is the shape?").strip() == "red"
        assert client.ask_and_wait("What shape is it?").strip() == "circle"
        assert client.ask_and_wait("How many shapes are there?").strip() == "one"
    assert answer_about_a_clip("", tmp_path, server_url=vllm_server) == "right"
