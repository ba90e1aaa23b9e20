"""The node over real DDS (loopback, this process's own ROS domain), as a separate process started
the way launch/internvl.launch.py starts it, fed by internvl-play-bag or by a test publisher."""

from __future__ import annotations

import signal
import subprocess
import time
from contextlib import contextmanager

import cv2
import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus
from images import noise_image
from ros_harness import BIN, ERROR, RELIABLE, Client, NodeProcess, compressed_msg, image_msg
from sensor_msgs.msg import Image
from std_msgs.msg import String

from internvl_engine import GenerationConfig, Request
from internvl_ros.bags import write_bag
from internvl_ros.image_msgs import to_rgb

ANSWER_KEYS = {
    "request_id",
    "question",
    "mode",
    "frames",
    "vit_ms",
    "prefill_tokens",
    "ttft_ms",
    "decode_tokens_per_s",
    "queue_wait_ms",
    "backend",
}


@pytest.fixture(scope="module", autouse=True)
def ros():
    rclpy.init()
    yield
    rclpy.shutdown()


@contextmanager
def running_node(
    model_dir, tmp_path, namespace="", remaps=None, ready=True, ros_args=None, env=None, **params
):
    """The node as its own process and a client; ``ready``: wait until the node is active;
    ``env``: the node's environment (default: this process's)."""
    params = {"heartbeat_period_s": 0.1, **params}
    proc = NodeProcess(
        model_dir,
        tmp_path / "node.log",
        params=params,
        namespace=namespace,
        remaps=remaps,
        ros_args=ros_args,
        env=env,
    )
    client = Client(namespace)
    try:
        if ready:
            client.wait_ready()
        yield proc, client
    finally:
        client.close()
        proc.stop()
    assert "Traceback" not in proc.log(), proc.log()


def engine_text(engine, question, max_new_tokens, **request):
    return engine.answer(
        Request(question, **request), GenerationConfig(max_new_tokens=max_new_tokens)
    ).text


def deliver(client, topic, msg, resolved=None, tries=20, stamp=True):
    """Publish a frame until the node's heartbeat counts it (camera QoS is best effort)."""
    resolved = resolved or topic
    before = client.frames_received(resolved)
    for _ in range(tries):
        client.send_image(topic, msg, stamp=stamp)
        try:
            client.wait_for(lambda: client.frames_received(resolved) > before, 1.0, "frame")
            return
        except TimeoutError:
            continue
    raise AssertionError(f"the node never received a frame on {resolved}")


def test_bag_answer_streams_and_equals_the_engine(tiny_model, engine, tmp_path):
    scene = noise_image(90, 120, seed=42)
    frames = [(i * 0.1, noise_image(90, 120, seed=i) if i < 10 else scene) for i in range(20)]
    question = "What is in the picture?"
    bag = write_bag(tmp_path / "bag", frames, [(1.55, question)], storage="mcap")
    with running_node(tiny_model, tmp_path, max_new_tokens=12) as (_, client):
        play = subprocess.run(
            [str(BIN / "internvl-play-bag"), str(bag), "--restamp", "--wait-for-subscribers", "20"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert play.returncode == 0, play.stderr
        client.wait_for(lambda: client.answers and client.statuses, 30, "the answer")
        answer = client.answers[0]
        assert not answer.startswith(ERROR), answer
        assert "".join(client.chunks) == answer
        assert answer == engine_text(engine, question, 12, images=[scene])
        status = client.statuses[0]
        values = client.status_values(status)
        assert status.level == DiagnosticStatus.OK and ANSWER_KEYS <= set(values)
        assert (
            values["question"] == question
            and values["mode"] == "image"
            and values["request_id"] == "1"
        )
        assert values["frames"].startswith("/image_raw@")
        assert (
            float(values["ttft_ms"]) > 0
            and int(values["prefill_tokens"]) > engine.spec.num_image_token
        )


def test_internvl_ask_prints_each_answer_with_its_status(tiny_model, engine, tmp_path):
    """internvl-ask on the topics, as the demo and README use it: the answer, its stream and its
    /diagnostics status arrive on separate topics in no set order, and each run must print all three
    of its own question (the demo once failed when the status came before the answer)."""
    questions = ["Tell me about the door.", "What is left?", "And now?"]
    with running_node(tiny_model, tmp_path, mode="text", max_new_tokens=10):
        for question in questions * 3:
            expected = engine.answer(Request(question), GenerationConfig(max_new_tokens=10))
            run = subprocess.run(
                [str(BIN / "internvl-ask"), "-q", question],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert run.returncode == 0, run.stderr
            assert f"answer   >> {expected.text}\n/diagnostics:\n" in run.stdout, run.stdout
            assert f"  generated_tokens: {len(expected.token_ids)}\n" in run.stdout


def test_internvl_ask_takes_a_relative_namespace(tiny_model, engine, tmp_path):
    """--namespace robot means /robot, as it does for the node itself (it once waited for heartbeats
    of "robot/internvl", a name no node has, until the timeout)."""
    expected = engine.answer(Request("Hello"), GenerationConfig(max_new_tokens=6)).text
    ask = [str(BIN / "internvl-ask"), "-q", "Hello", "--namespace", "robot"]
    with running_node(tiny_model, tmp_path, namespace="/robot", mode="text", max_new_tokens=6):
        for how in ([], ["--action"]):
            run = subprocess.run(ask + how, capture_output=True, text=True, timeout=60)
            assert run.returncode == 0 and f"answer   >> {expected}" in run.stdout, (
                run.stdout + run.stderr
            )
    run = subprocess.run(ask + ["--timeout", "2"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr == "internvl-ask: error: timed out waiting for /robot/internvl to be active\n"


def test_internvl_ask_asks_one_camera_for_a_few_tokens(tiny_model, engine, tmp_path):
    """--cameras and --max-new-tokens hold for this question only, so they go as a goal: the answer
    is the back camera's alone, as long as asked, and the node's parameters stay as they were."""
    front, back = noise_image(40, 48, seed=8), noise_image(40, 48, seed=9)
    expected = engine.answer(
        Request("What is there?", images=[back]), GenerationConfig(max_new_tokens=3)
    )
    with running_node(
        tiny_model,
        tmp_path,
        max_new_tokens=10,
        camera_qos="reliable",
        max_frame_age_s=60.0,
        image_topics="[front/image_raw, back/image_raw]",
    ) as (_, client):  # a client takes seconds to start
        deliver(client, "/front/image_raw", image_msg(front, "rgb8"))
        deliver(client, "/back/image_raw", image_msg(back, "rgb8"))
        run = subprocess.run(
            [
                str(BIN / "internvl-ask"),
                "-q",
                "What is there?",
                "--cameras",
                "back/image_raw",
                "--max-new-tokens",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert (
            f"answer   >> {expected.text}\n" in run.stdout
            and "  finish_reason: length\n" in run.stdout
        )
        assert (
            "  frames: /back/image_raw@" in run.stdout and "/front/image_raw" not in run.stdout
        ), run.stdout
        both = engine.answer(
            Request("What is there?", images=[front, back]), GenerationConfig(max_new_tokens=10)
        )
        assert client.ask_and_wait("What is there?") == both.text


def test_internvl_ask_refuses_text_that_is_not_utf8():
    for args, option in [
        (["-q", b"Is the door open?\xff"], b"--question"),
        (["-q", "Is the door open?", "--choices", b"yes,n\xe9"], b"--choices"),
    ]:
        run = subprocess.run([str(BIN / "internvl-ask"), *args], capture_output=True, timeout=60)
        assert run.returncode == 2 and option + b" is not valid UTF-8 text" in run.stderr, (
            run.stderr
        )


@pytest.mark.parametrize(
    "args, message",
    [
        # waited for ever
        (
            ["--timeout", "nan"],
            "--timeout must be a positive number of seconds, not nan",
        ),
        (["--timeout", "0", "--action"], "--timeout must be a positive number of seconds, not 0"),
        (
            ["--namespace", "robot 1"],
            "Invalid namespace: namespace must not contain characters other than",
        ),
        (
            ["--namespace", "robot/", "--action"],
            "Invalid namespace: namespace must not end with a '/'",
        ),
        (
            ["--node-name", "internvl-1"],
            "Invalid node name: node name must not contain characters other than",
        ),
        (["--choices", "yes,"], "--choices must not be empty strings"),
        # was sent, then refused
        (
            ["--choices", "yes,no, yes"],
            "--choices must differ: 'yes' is given twice",
        ),
        (
            ["--cameras", "front/image_raw,"],
            "--cameras must not be empty names: 'front/image_raw,'",
        ),
        (
            ["--max-new-tokens", "4097"],
            "--max-new-tokens must be from 1 to 4096 tokens (0: the node's max_new_tokens), "
            "not 4097",
        ),
    ],
)
def test_internvl_ask_refuses_bad_options_before_asking(args, message):
    run = subprocess.run(
        [str(BIN / "internvl-ask"), "-q", "Is the door open?", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and f"internvl-ask: error: {message}" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "Warning" not in run.stderr and run.stdout == ""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_internvl_ask_stops_at_once_on_a_signal(signum):
    """Waiting for a node that is not there: Ctrl-C or SIGTERM ends it at once, quietly, with 128 +
    the signal. (rclpy's own handlers shut ROS down under its waits: it sat out its timeout, or died
    with a traceback.)"""
    ask = subprocess.Popen(
        [str(BIN / "internvl-ask"), "-q", "Is the door open?", "--action", "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # printed once the handlers are in
        assert ask.stdout.readline() == "question >> Is the door open?\n"
        started = time.monotonic()
        ask.send_signal(signum)
        assert ask.wait(10) == 128 + signum
        assert time.monotonic() - started < 5
        assert "Traceback" not in ask.stderr.read()
    finally:
        ask.kill()
        ask.wait()


def test_video_mode_uses_n_frames_of_the_window_in_time_order(tiny_model, engine, tmp_path):
    frames = [(i * 0.1, noise_image(48, 64, seed=100 + i)) for i in range(30)]
    question = "Which way does it move?"
    bag = write_bag(tmp_path / "bag", frames, [(2.95, question)])
    seen = {}

    with running_node(
        tiny_model,
        tmp_path,
        mode="video",
        **{"video.window_s": 2.0, "video.num_frames": 6},
        max_new_tokens=8,
    ) as (_, client):

        def record(msg):
            with client.lock:
                seen[f"{msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9:.3f}"] = to_rgb(msg)

        client.node.create_subscription(Image, "/image_raw", record, RELIABLE)
        client.node.create_subscription(String, "/question", lambda _: None, RELIABLE)
        # Both topics then have two subscribers (the node and this recorder): the player waits for
        # both, so the recorder sees every frame the node may use.
        subprocess.run(
            [
                str(BIN / "internvl-play-bag"),
                str(bag),
                "--restamp",
                "--wait-for-subscribers",
                "20",
                "--subscribers",
                "2",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        client.wait_for(lambda: client.answers and client.statuses, 30, "the answer")
        values = client.status_values(client.statuses[0])
        stamps = [entry.split("@")[1].split(" ")[0] for entry in values["frames"].split("; ")]
        assert len(stamps) == 6
        assert [float(s) for s in stamps] == sorted(float(s) for s in stamps) and len(
            set(stamps)
        ) == 6
        assert float(stamps[-1]) - float(stamps[0]) <= 2.0
        # spread over the window, not the last few
        assert float(stamps[-1]) - float(stamps[0]) >= 1.0
        used = [seen[s] for s in stamps]
        assert client.answers[0] == engine_text(engine, question, 8, video_frames=used)


def test_stale_frames_namespace_and_runtime_mode(tiny_model, engine, tmp_path):
    remaps = {"image_raw": "/cam/front"}
    with running_node(
        tiny_model,
        tmp_path,
        namespace="/robot",
        remaps=remaps,
        max_frame_age_s=0.5,
        image_topics="[image_raw, cam2/image_raw]",
        max_new_tokens=4,
    ) as (_, client):
        frame = noise_image(40, 40, seed=1)
        deliver(client, "/cam/front", image_msg(frame, "rgb8"))
        time.sleep(1.0)
        stale = client.ask_and_wait("Anything there?")
        assert stale.startswith(ERROR + "no fresh camera frame")
        assert (
            "/cam/front: last frame" in stale
            and "/robot/cam2/image_raw: no frame received" in stale
        )
        client.wait_for(lambda: client.statuses, 10, "the error status")
        assert client.statuses[-1].level == DiagnosticStatus.ERROR
        deliver(client, "/cam/front", image_msg(frame, "rgb8"), "/cam/front")
        fresh = client.ask_and_wait("Anything there?")
        assert fresh == engine_text(engine, "Anything there?", 4, images=[frame])
        time.sleep(1.0)
        assert client.ask_and_wait("Anything there?").startswith(ERROR + "no fresh camera frame")
        # zero stamp: receive time counts
        deliver(client, "/cam/front", image_msg(frame, "rgb8"), stamp=False)
        assert client.ask_and_wait("Anything there?") == fresh
        assert client.set_parameter("mode", "bogus") is False
        assert client.set_parameter("mode", "text") is True
        assert client.ask_and_wait("Just talk.") == engine_text(engine, "Just talk.", 4)
        assert client.ask_and_wait("   ") == ERROR + "the question is empty"
        assert client.ask_and_wait("Still there?") == engine_text(engine, "Still there?", 4)


LONG = 600  # tokens: long enough that later questions arrive while the first is running


def test_busy_policies(tiny_model, engine, tmp_path):
    questions = [f"Tell me a long story number {i}." for i in range(5)]
    for q in questions[:3]:  # precondition: these run to the token limit, not to a stop token
        assert (
            engine.answer(Request(q), GenerationConfig(max_new_tokens=LONG)).finish_reason
            == "length"
        )
    with running_node(tiny_model, tmp_path, mode="text", max_new_tokens=LONG, queue_size=2) as (
        _,
        client,
    ):
        # The first question is running before the others arrive, so the two waiting places go to
        # questions 1 and 2 whatever the machine's speed.
        client.ask(questions[0])
        client.wait_for(lambda: len(client.chunks) > 0, 30, "the first answer to start")
        for q in questions[1:]:
            client.ask(q)
        client.wait_for(lambda: len(client.answers) == 5, 120, "five answers (queue)")
        assert client.answers[:2] == [ERROR + "queue full (2 waiting): question dropped"] * 2
        client.wait_for(lambda: len(client.statuses) == 5, 30, "five statuses")
        answered = [
            client.status_values(s)["question"]
            for s in client.statuses
            if s.level == DiagnosticStatus.OK
        ]
        assert answered == questions[:3]
        assert client.answers[2:] == [engine_text(engine, q, LONG) for q in answered]

        assert client.set_parameter("on_busy", "drop")
        client.answers.clear()
        for q in questions[:3]:
            client.ask(q)
        client.wait_for(lambda: len(client.answers) == 3, 120, "three answers (drop)")
        assert client.answers[:2] == [ERROR + "busy: question dropped (on_busy=drop)"] * 2
        assert client.answers[2] == engine_text(engine, questions[0], LONG)

        assert client.set_parameter("on_busy", "preempt")
        client.answers.clear()
        client.chunks.clear()
        client.ask(questions[0])
        client.wait_for(lambda: len(client.chunks) > 5, 30, "the first answer to start")
        client.ask(questions[1])
        client.wait_for(lambda: len(client.answers) == 2, 120, "two answers (preempt)")
        assert client.answers[0] == ERROR + "cancelled: preempted by a newer question"
        assert client.answers[1] == engine_text(engine, questions[1], LONG)
        cancelled = [s for s in client.statuses if s.message.startswith("cancelled")]
        assert cancelled and cancelled[0].level == DiagnosticStatus.WARN


RAW_CASES = [
    ("rgb8", 0, False),
    ("bgr8", 0, False),
    ("rgba8", 3, False),
    ("bgra8", 0, False),
    ("mono8", 1, False),
    ("rgb16", 0, False),
    ("bgr16", 2, True),
    ("rgba16", 0, True),
    ("mono16", 0, False),
    ("bayer_rggb8", 0, False),
    ("bayer_gbrg16", 1, True),
    ("yuv422_yuy2", 2, False),
    ("nv21", 0, False),
    ("nv24", 3, False),
]


def test_ctrl_c_while_answering_ends_every_question_with_a_log_line_and_no_traceback(
    tiny_model, tmp_path
):
    """Ctrl-C reaches rclpy's signal handler, which invalidates every publisher at once, before the
    node's close() stops the worker: the running answer and the waiting ones can no longer be
    published, and each gets its log line instead."""
    questions = [f"Tell me a long story number {i}." for i in range(4)]
    with running_node(tiny_model, tmp_path, mode="text", max_new_tokens=4096, queue_size=4) as (
        proc,
        client,
    ):
        for q in questions:
            client.ask(q)
        client.wait_for(lambda: len(client.chunks) > 0, 30, "the first answer to start")
        # SIGINT, as ros2 launch sends it; running_node asserts no traceback
        assert proc.stop() == 0
    lines = proc.log().splitlines()
    for n, q in enumerate(questions, start=1):
        assert len([line for line in lines if f"request {n} ({q!r}): " in line]) == 1, proc.log()
    # the last waits behind three answers of ~1000 tokens each: still queued when Ctrl-C came
    last = next(line for line in lines if f"request 4 ({questions[3]!r}): " in line)
    assert last.startswith("[WARN]") and last.endswith(
        "cancelled: the node is shutting down (not published: ROS has shut down)"
    ), proc.log()


def test_every_encoding_reaches_the_model_as_rgb(tiny_model, engine, tmp_path):
    scene = np.zeros((56, 84, 3), np.uint8)
    scene[:, :42] = (230, 30, 20)
    scene[:, 42:] = (20, 60, 220)
    q = "What colours?"
    TOKENS = 16  # the random model's first tokens barely depend on the image; later ones do
    swapped = engine_text(engine, q, TOKENS, images=[scene[..., ::-1].copy()])
    # precondition: the model sees channel order Reliable camera QoS: large raw frames lose UDP
    # fragments under best effort (see README).
    assert swapped != engine_text(engine, q, TOKENS, images=[scene])
    with running_node(
        tiny_model,
        tmp_path,
        max_new_tokens=TOKENS,
        max_images=1,
        max_frame_age_s=1.0,
        camera_qos="reliable",
        image_topics="[image_raw, image_raw/compressed]",
    ) as (_, client):
        for encoding, padding, big_endian in RAW_CASES:
            msg = image_msg(scene, encoding, padding, big_endian)
            deliver(client, "/image_raw", msg)
            expected = engine_text(engine, q, TOKENS, images=[to_rgb(msg)])
            assert client.ask_and_wait(q) == expected, encoding
        for bad, message in [
            (image_msg(scene, "rgb8"), "truncated image"),
            (image_msg(scene, "rgb8"), "unsupported encoding 'nv16'"),
        ]:
            if "truncated" in message:
                bad.data = bytes(bad.data)[:1000]
            else:
                bad.encoding = "nv16"
            deliver(client, "/image_raw", bad)
            answer = client.ask_and_wait(q)
            assert (
                answer.startswith(ERROR + "no fresh camera frame: ")
                and f"/image_raw: {message}" in answer
            )
        time.sleep(1.2)  # the raw camera goes stale; the compressed one is used next
        jpeg = compressed_msg(scene, "jpeg")
        deliver(client, "/image_raw/compressed", jpeg)
        assert client.ask_and_wait(q) == engine_text(engine, q, TOKENS, images=[to_rgb(jpeg)])
        corrupt = compressed_msg(scene, "jpeg")
        corrupt.data = bytes(corrupt.data)[:40]
        deliver(client, "/image_raw/compressed", corrupt)
        answer = client.ask_and_wait(q)
        assert answer.startswith(ERROR + "no fresh camera frame: ")
        assert "/image_raw/compressed: cannot decode compressed image" in answer
        # a 4K frame, 25 MB raw
        big = cv2.resize(scene, (3840, 2160), interpolation=cv2.INTER_NEAREST)
        big_jpeg = compressed_msg(big, "jpeg")
        deliver(client, "/image_raw/compressed", big_jpeg)
        assert client.ask_and_wait(q, timeout=120) == engine_text(
            engine, q, TOKENS, images=[to_rgb(big_jpeg)]
        )
        deliver(client, "/image_raw", image_msg(big, "bgr8"))
        assert client.ask_and_wait(q, timeout=120) == engine_text(engine, q, TOKENS, images=[big])


BURST = 1000


def test_a_burst_of_1000_questions_gets_1000_answers_with_bounded_memory(tiny_model, tmp_path):
    """Published as fast as rclpy publishes: none is lost; each gets an answer (or a queue-full
    error) on answer and answer/result, and a status on /diagnostics."""
    with running_node(tiny_model, tmp_path, mode="text", max_new_tokens=3, queue_size=4) as (
        proc,
        client,
    ):
        client.ask_and_wait("warm up")
        client.wait_for(lambda: client.statuses and client.results, 30, "the warm-up status")
        rss_before = proc.rss_kib()
        with client.lock:
            client.answers.clear()
            client.statuses.clear()
            client.results.clear()
        started = time.monotonic()
        for i in range(BURST):
            client.ask(f"question {i}")
        published_s = time.monotonic() - started
        client.wait_for(
            lambda: min(len(client.answers), len(client.statuses), len(client.results)) >= BURST,
            300,
            f"{BURST} answers",
        )
        time.sleep(0.5)
        print(
            f"\n{BURST} questions published in {published_s:.2f} s; answers {len(client.answers)}, "
            f"statuses {len(client.statuses)}, results {len(client.results)}"
        )
        # one each, no more
        assert len(client.answers) == len(client.statuses) == len(client.results) == BURST
        assert sorted(r.request_id for r in client.results) == list(range(2, BURST + 2))
        assert sorted(r.question for r in client.results) == sorted(
            f"question {i}" for i in range(BURST)
        )
        refused = [a for a in client.answers if a.startswith(ERROR)]
        assert all(a == ERROR + "queue full (4 waiting): question dropped" for a in refused)
        assert len(refused) < BURST
        assert proc.rss_kib() - rss_before < 100 * 1024
