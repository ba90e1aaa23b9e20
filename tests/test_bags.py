"""internvl-make-bag and internvl-play-bag: real rosbag2 files (sqlite3 and mcap) and real DDS."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import cv2
import pytest
import rclpy
from images import numbered_frames, write_video
from rclpy.qos import QoSProfile, ReliabilityPolicy
from ros_harness import BIN
from rosbags.rosbag2 import Reader, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from sensor_msgs.msg import CompressedImage
from std_msgs.msg import String

from internvl_ros.bags import TYPESTORE
from internvl_ros.image_msgs import to_rgb


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_make_bag_from_a_video_with_timed_questions(tmp_path, storage):
    video = write_video(tmp_path / "clip.avi", numbered_frames(12))
    bag = tmp_path / "bag"
    proc = subprocess.run(
        [
            str(BIN / "internvl-make-bag"),
            "--video",
            str(video),
            "--out",
            str(bag),
            "--fps",
            "4",
            "--encoding",
            "jpeg",
            "--topic",
            "cam/image_raw/compressed",
            "--storage",
            storage,
            "--question",
            "2.25:And now?",
            "--question",
            "0.5:What is there?",
            "--reverse",
            "--repeat",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    with Reader(bag) as reader:
        assert {c.topic: c.msgtype for c in reader.connections} == {
            "cam/image_raw/compressed": "sensor_msgs/msg/CompressedImage",
            "question": "std_msgs/msg/String",
        }
        records = [
            (c.topic, ns, TYPESTORE.deserialize_cdr(raw, c.msgtype))
            for c, ns, raw in reader.messages()
        ]
    images = [(ns, m) for t, ns, m in records if t.endswith("compressed")]
    questions = [(ns, m.data) for t, ns, m in records if t == "question"]
    assert len(images) == 24
    start = images[0][0]
    assert [round((ns - start) / 1e9, 2) for ns, _ in images] == [i / 4 for i in range(24)]
    assert all(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == ns for ns, m in images)
    assert [(round((ns - start) / 1e9, 2), q) for ns, q in questions] == [
        (0.5, "What is there?"),
        (2.25, "And now?"),
    ]
    brightness = [
        to_rgb(CompressedImage(format="jpeg", data=m.data.tobytes())).mean() for _, m in images
    ]
    assert brightness[:12] == sorted(brightness[:12], reverse=True)  # --reverse
    assert brightness[12:] == brightness[:12]  # --repeat 2


def test_write_bag_takes_frames_in_time_order(tmp_path):
    from internvl_ros.bags import write_bag

    frames = numbered_frames(3)
    with pytest.raises(ValueError, match="frames must come in time order: 0.1 s after 0.2 s"):
        write_bag(tmp_path / "bag", [(0.0, frames[0]), (0.2, frames[1]), (0.1, frames[2])])


def test_make_bag_refuses_bad_input(tmp_path):
    proc = subprocess.run(
        [
            str(BIN / "internvl-make-bag"),
            "--images",
            str(tmp_path / "none.png"),
            "--out",
            str(tmp_path / "bag"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "no such image file" in proc.stderr
    for args, message in [
        (["--question", "soon"], "'soon': expected SECONDS:QUESTION"),
        (["--question=-1:Hi?"], "'-1:Hi?': expected SECONDS:QUESTION, SECONDS >= 0"),
        (["--question", "nan:Hi?"], "'nan:Hi?': expected SECONDS:QUESTION, SECONDS >= 0"),
        (["--fps", "0"], "--fps must be > 0"),  # was a ZeroDivisionError traceback
        (["--fps", "nan"], "--fps must be > 0"),
        (["--fps", "inf"], "--fps must be > 0"),
        (["--question", "1e400:Hi?"], "'1e400:Hi?': expected SECONDS:QUESTION, SECONDS >= 0"),
        (["--repeat", "0"], "--repeat must be >= 1"),
        (["--topic", "front camera"], "--topic: 'front camera' is not a valid topic name"),
        (["--question-topic", ""], "--question-topic: '' is not a valid topic name"),
    ]:
        proc = subprocess.run(
            [
                str(BIN / "internvl-make-bag"),
                "--images",
                "x.png",
                "--out",
                str(tmp_path / "b"),
                *args,
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (
            proc.stderr
        )
        assert not (tmp_path / "b").exists()
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), numbered_frames(1)[0])
    # Frames are written as they are read: one that fails after others were written takes the bag
    # with it.
    proc = subprocess.run(
        [
            str(BIN / "internvl-make-bag"),
            "--images",
            str(image),
            str(image),
            "x.png",
            "--out",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "x.png: no such image file" in proc.stderr, proc.stderr
    assert not (tmp_path / "b").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("not a bag")
    proc = subprocess.run(
        [str(BIN / "internvl-make-bag"), "--images", str(image), "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and f"{tmp_path / 'b'} exists already" in proc.stderr, proc.stderr
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["mine.txt"]
    for encoding, topic, hint in (
        ("jpeg", "image_raw", "use --topic image_raw/compressed"),
        ("rgb8", "cam/compressed", "use --topic cam"),
    ):
        proc = subprocess.run(
            [
                str(BIN / "internvl-make-bag"),
                "--images",
                str(image),
                "--out",
                str(tmp_path / encoding),
                "--encoding",
                encoding,
                "--topic",
                topic,
            ],
            capture_output=True,
            text=True,
        )
        assert (
            proc.returncode == 2 and hint in proc.stderr and not (tmp_path / encoding).exists()
        ), proc.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_make_bag_stopped_leaves_no_half_written_bag(tmp_path, signum):
    """Stopped while writing (Ctrl-C, or SIGTERM from timeout or a script), make-bag removes the bag
    it had begun, quietly, and exits with 128 + the signal."""
    video = write_video(tmp_path / "clip.avi", numbered_frames(12))
    bag = tmp_path / "bag"
    proc = subprocess.Popen(
        [
            str(BIN / "internvl-make-bag"),
            "--video",
            str(video),
            "--out",
            str(bag),
            "--repeat",
            "10000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not bag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum and err == "" and out == "", (proc.returncode, err)
    assert not bag.exists()


def test_play_bag_keeps_order_and_spacing_and_remaps(tmp_path):
    from internvl_ros.bags import write_bag

    questions = [(0.0, "one"), (0.4, "two"), (0.8, "three")]
    bag = write_bag(tmp_path / "bag", [], questions, question_topic="question")
    rclpy.init()
    node = rclpy.create_node("bag_listener")
    got, recorded, lock = [], [], threading.Lock()

    def on_question(msg):
        with lock:
            got.append((time.monotonic(), msg.data))

    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(String, "/remapped", on_question, reliable)
    # a second listener
    node.create_subscription(String, "/remapped", lambda msg: recorded.append(msg.data), reliable)
    stop = threading.Event()
    spinner = threading.Thread(
        target=lambda: [rclpy.spin_once(node, timeout_sec=0.05) for _ in iter(stop.is_set, True)]
    )
    spinner.start()
    try:
        # the bag holds "question"; ros2 bag record writes "/question": either name picks it
        proc = subprocess.run(
            [
                str(BIN / "internvl-play-bag"),
                str(bag),
                "--rate",
                "2",
                "--remap",
                "/question:=/remapped",
                "--wait-for-subscribers",
                "20",
                "--subscribers",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + 10
        while (len(got) < 3 or len(recorded) < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        spinner.join()
        node.destroy_node()
        rclpy.shutdown()
    assert [text for _, text in got] == ["one", "two", "three"]
    assert recorded == ["one", "two", "three"]  # the player waited for both subscribers
    span = got[-1][0] - got[0][0]
    # 0.8 s of bag at rate 2 (loose: this is a functional check, not a benchmark)
    assert 0.25 < span < 1.5
    assert "played 3 messages" in proc.stdout


def test_play_bag_refuses_bad_input(tmp_path):
    from internvl_ros.bags import write_bag

    for args, message in [
        (["--rate", "0"], "--rate must be > 0"),
        (["--rate", "nan"], "--rate must be > 0"),  # it spun for ever, deaf to SIGTERM
        (["--subscribers", "0"], "--subscribers must be >= 1"),
        (["--clock", "nan"], "--clock must be from 0 (no /clock) to 1000 Hz"),
        (["--clock", "inf"], "--clock must be from 0 (no /clock) to 1000 Hz"),  # spun for ever
        (["--wait-for-subscribers", "-1"], "--wait-for-subscribers must be >= 0 s"),
        (["--remap", "image_raw"], "--remap takes FROM:=TO, not 'image_raw'"),
    ]:
        proc = subprocess.run(
            [str(BIN / "internvl-play-bag"), str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, (
            proc.stderr
        )
    proc = subprocess.run(
        [str(BIN / "internvl-play-bag"), str(tmp_path / "none")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.startswith("internvl-play-bag: error:")
    bag = write_bag(tmp_path / "bag", [], [(0.0, "hi")], question_topic="question")
    # the rule would do nothing, and the camera stay silent
    proc = subprocess.run(
        [str(BIN / "internvl-play-bag"), str(bag), "--remap", "image_raw:=/cam"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"internvl-play-bag: error: cannot remap /image_raw: {bag} has no such topic (its topics: "
        "question)\n"
    )


def test_play_bag_leaves_out_topics_of_types_it_cannot_import(tmp_path):
    """As ros2 bag play does: a warning names the topic and its type, and the other topics play (the
    whole bag failed on the first such type, with only "No module named 'my_pkg'")."""
    store = get_typestore(Stores.ROS2_HUMBLE)
    store.register(get_types_from_msg("int32 x", "my_pkg/msg/Foo"))
    for name, topics in (("mixed", ["/foo", "question"]), ("foreign", ["/foo"])):
        with Writer(tmp_path / name, version=8) as writer:
            for ns, topic in enumerate(topics):
                msgtype = "my_pkg/msg/Foo" if topic == "/foo" else "std_msgs/msg/String"
                msg = (
                    store.types[msgtype](x=1)
                    if topic == "/foo"
                    else store.types[msgtype](data="Hi?")
                )
                writer.write(
                    writer.add_connection(topic, msgtype, typestore=store),
                    ns,
                    store.serialize_cdr(msg, msgtype),
                )
    warning = (
        "not playing /foo: its type my_pkg/msg/Foo cannot be imported here "
        "(No module named 'my_pkg')"
    )
    proc = subprocess.run(
        [str(BIN / "internvl-play-bag"), str(tmp_path / "mixed")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "played 1 messages" in proc.stdout and warning in proc.stderr, (
        proc.stderr
    )
    proc = subprocess.run(
        [str(BIN / "internvl-play-bag"), str(tmp_path / "foreign")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and warning in proc.stderr, proc.stderr
    assert "none of its topics has a message type that can be imported here" in proc.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_play_bag_stops_quietly_and_at_once_on_a_signal(tmp_path, signum):
    """A looping player stopped by Ctrl-C or SIGTERM ends at once with 128 + the signal and says
    nothing, also while it waits for a message due much later, and where it inherited SIGINT ignored
    (a process a script starts in the background does: the demo under nohup, CI). rclpy's handlers
    only shut the context down: a player asleep until its next message slept on, deaf to SIGTERM."""
    from internvl_ros.bags import write_bag

    questions = [(0.05 * i, f"q{i}") for i in range(20)] + [(120.0, "much later")]
    bag = write_bag(tmp_path / "bag", [], questions, question_topic="question")
    for inherited in (signal.SIG_DFL, signal.SIG_IGN):
        proc = subprocess.Popen(
            [str(BIN / "internvl-play-bag"), str(bag), "--loop"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, inherited),
        )
        time.sleep(3.0)  # past the first 20: waiting for the last
        sent = time.monotonic()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signum and err == "", (inherited, proc.returncode, err)
        assert time.monotonic() - sent < 5


def test_play_bag_of_nothing_ends_even_with_loop(tmp_path):
    """A bag with no messages played with --loop spun for ever, publishing nothing."""
    from internvl_ros.bags import write_bag

    bag = write_bag(tmp_path / "bag", [], [])
    proc = subprocess.run(
        [str(BIN / "internvl-play-bag"), str(bag), "--loop"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout == f"played 0 messages from {bag}\n", (
        proc.stdout + proc.stderr
    )
