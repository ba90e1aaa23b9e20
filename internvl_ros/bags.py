"""rosbag2 tools that need no rosbag2 install (``rosbags`` is pure Python).

``internvl-make-bag``: a camera clip (video file or images) plus timed questions -> rosbag2.
``internvl-play-bag``: replays a rosbag2 into live topics with its original timing.
"""

from __future__ import annotations

import argparse
import heapq
import importlib
import itertools
import math
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from internvl_engine import load_image
from internvl_engine.cli import exit_on_sigterm
from internvl_engine.preprocess import iter_video_frames

from .image_msgs import ENCODINGS as RAW_ENCODINGS
from .image_msgs import rgb_to_pixels

ENCODINGS = (*RAW_ENCODINGS, "jpeg", "png")
STORAGES = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
TYPESTORE = get_typestore(Stores.ROS2_HUMBLE)
# Each /clock tick is one publish from Python (about 10 us here). At a rate whose ticks take longer
# to publish than the time they span, the player falls behind its own ticks and never reaches the
# next message (1 GHz spun for ever); 1 kHz keeps far from that.
MAX_CLOCK_HZ = 1000.0


def _stamp(ns: int):
    return TYPESTORE.types["builtin_interfaces/msg/Time"](
        sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000
    )


def camera_message(rgb: np.ndarray, encoding: str, stamp_ns: int, frame_id: str = "camera"):
    """(ROS type name, rosbags message) for an RGB frame in the given encoding."""
    header = TYPESTORE.types["std_msgs/msg/Header"](stamp=_stamp(stamp_ns), frame_id=frame_id)
    if encoding in ("jpeg", "png"):
        ok, data = cv2.imencode(
            "." + ("jpg" if encoding == "jpeg" else "png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        )
        assert ok, "OpenCV could not encode the frame"
        return "sensor_msgs/msg/CompressedImage", TYPESTORE.types[
            "sensor_msgs/msg/CompressedImage"
        ](header=header, format=encoding, data=data.reshape(-1))
    pixels = np.ascontiguousarray(rgb_to_pixels(rgb, encoding))
    h, w = rgb.shape[:2]
    return "sensor_msgs/msg/Image", TYPESTORE.types["sensor_msgs/msg/Image"](
        header=header,
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=int(sys.byteorder == "big"),
        step=pixels.strides[0],
        data=pixels.reshape(-1).view(np.uint8),
    )


def write_bag(
    path: Path,
    frames: Iterable[tuple[float, np.ndarray]],
    questions: Iterable[tuple[float, str]] = (),
    image_topic: str = "image_raw",
    question_topic: str = "question",
    encoding: str = "rgb8",
    storage: str = "sqlite3",
    start_ns: int | None = None,
) -> Path:
    """Write frames (seconds from start, RGB) and questions (seconds from start, text) to a rosbag2.

    Frames come in time order and each is written as it comes, so a long clip (a generator) is never
    in memory whole."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}")
    compressed = encoding in ("jpeg", "png")
    if compressed != image_topic.endswith("/compressed"):
        kind = "CompressedImage" if compressed else "Image"
        ending = "ending" if compressed else "not ending"
        raw = image_topic.rsplit("/compressed", 1)[0]
        suggested = image_topic + "/compressed" if compressed else raw
        raise ValueError(
            f"{encoding} frames are sensor_msgs/{kind}, which the node takes from a topic {ending} "
            f"in /compressed, not from {image_topic!r}: use --topic {suggested}"
        )
    start_ns = time.time_ns() if start_ns is None else start_ns

    def frame_records():
        previous = -math.inf
        for t, rgb in frames:
            if not t >= previous:
                raise ValueError(f"frames must come in time order: {t} s after {previous} s")
            previous = t
            ns = start_ns + int(t * 1e9)
            yield ns, image_topic, *camera_message(rgb, encoding, ns)

    question_records = sorted(
        (
            (
                start_ns + int(t * 1e9),
                question_topic,
                "std_msgs/msg/String",
                TYPESTORE.types["std_msgs/msg/String"](data=text),
            )
            for t, text in questions
        ),
        key=lambda r: r[0],
    )
    with Writer(path, version=8, storage_plugin=STORAGES[storage]) as writer:
        connections = {}
        for ns, topic, msgtype, msg in heapq.merge(
            frame_records(), question_records, key=lambda r: r[0]
        ):
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=TYPESTORE)
            writer.write(connections[topic], ns, TYPESTORE.serialize_cdr(msg, msgtype))
    return Path(path)


def _timed_question(text: str) -> tuple[float, str]:
    seconds, sep, question = text.partition(":")
    try:
        if not sep or not 0 <= float(seconds) < math.inf:  # NaN too
            raise ValueError
        return float(seconds), question
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SECONDS:QUESTION, SECONDS >= 0"
        ) from None


def make_bag_main(argv=None) -> int:
    from rclpy.exceptions import InvalidTopicNameException
    from rclpy.validate_topic_name import validate_topic_name

    ap = argparse.ArgumentParser(
        prog="internvl-make-bag",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a camera clip (a video file or images) and timed questions to a "
        "rosbag2, with rosbags\n"
        "(no rosbag2 install needed). JPEG and PNG frames are sensor_msgs/CompressedImage and go "
        "on a\n"
        "topic ending in /compressed; the others are sensor_msgs/Image.",
        epilog="Examples:\n"
        "  internvl-make-bag --video clip.mp4 --out clip_bag --question '2.0:What is moving?'\n"
        "  internvl-make-bag --images a.jpg b.jpg --out jpeg_bag --encoding jpeg --topic "
        "image_raw/compressed",
    )
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--video", type=Path, help="video file; every frame is written, one at a time"
    )
    source.add_argument(
        "--images", type=Path, nargs="+", help="image files, one frame each, in order"
    )
    ap.add_argument("--out", type=Path, required=True, help="bag directory to create")
    ap.add_argument("--fps", type=float, default=10.0, help="frame rate of the written clip")
    ap.add_argument(
        "--repeat", type=int, default=1, help="write the frames this many times in a row"
    )
    ap.add_argument(
        "--reverse",
        action="store_true",
        help="write the frames in reverse order (a video's frames are then held in memory)",
    )
    ap.add_argument(
        "--topic",
        default="image_raw",
        help="camera topic (use a name ending in /compressed for jpeg/png)",
    )
    ap.add_argument("--encoding", choices=ENCODINGS, default="rgb8")
    ap.add_argument(
        "--question",
        type=_timed_question,
        action="append",
        default=[],
        metavar="SECONDS:TEXT",
        help="a question at SECONDS from the start (repeatable)",
    )
    ap.add_argument("--question-topic", default="question")
    ap.add_argument("--storage", choices=sorted(STORAGES), default="sqlite3")
    args = ap.parse_args(argv)
    if not (args.fps > 0 and math.isfinite(args.fps)):  # NaN too; inf put every frame at 0 s
        ap.error("--fps must be > 0")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    for option, topic in (("--topic", args.topic), ("--question-topic", args.question_topic)):
        try:  # the node could never subscribe to it: the bag would play to no one
            validate_topic_name(topic)
        except InvalidTopicNameException as e:
            ap.error(f"{option}: {topic!r} is not a valid topic name ({e})")
    if args.out.exists():  # before anything is written: a failed write removes what it made
        print(f"internvl-make-bag: error: {args.out} exists already", file=sys.stderr)
        return 2

    def clip() -> Iterable[np.ndarray]:  # read afresh for each repeat
        if args.video is None:
            return map(load_image, args.images[::-1] if args.reverse else args.images)
        if args.reverse:  # a video reads forwards only: its frames are held to be written backwards
            return reversed(list(iter_video_frames(args.video)))
        return iter_video_frames(args.video)

    written = 0

    def timed_frames():
        nonlocal written
        for frame in itertools.chain.from_iterable(clip() for _ in range(args.repeat)):
            yield written / args.fps, frame
            written += 1

    exit_on_sigterm()
    try:
        write_bag(
            args.out,
            timed_frames(),
            args.question,
            args.topic,
            args.question_topic,
            args.encoding,
            args.storage,
        )
    # rosbags and the frame readers fail with their own errors; Ctrl-C; SIGTERM
    except BaseException as e:
        shutil.rmtree(args.out, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            return 130
        if not isinstance(e, Exception):
            raise
        print(f"internvl-make-bag: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {written} frames and {len(args.question)} questions to {args.out} ({args.storage})"
    )
    return 0


def _message_class(msgtype: str):
    package, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


def play_bag(
    path: Path,
    rate: float = 1.0,
    loop: bool = False,
    restamp: bool = False,
    wait_for_subscribers_s: float = 0.0,
    subscribers: int = 1,
    remap: dict[str, str] | None = None,
    clock_hz: float = 0.0,
    node=None,
) -> int:
    """Publish a bag's messages with their recorded spacing (divided by ``rate``); returns the
    count.

    Before playing, waits up to ``wait_for_subscribers_s`` for every topic to have ``subscribers``
    matched subscriptions (the node, and a recorder too if one listens). With ``clock_hz``, the
    bag's time is published on /clock at that rate (and with every message), as ``ros2 bag play
    --clock`` does, so nodes with use_sim_time take the recorded stamps as current."""
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rclpy.serialization import deserialize_message
    from rclpy.signals import SignalHandlerOptions
    from rosgraph_msgs.msg import Clock

    def absolute(topic: str) -> str:  # bags hold "image_raw" or "/image_raw"; the player runs in /
        return "/" + topic.lstrip("/")

    remap = {absolute(source): target for source, target in (remap or {}).items()}
    own = node is None
    if own:
        # Not this process's arguments: rcl would take a --remap value for its own rule. Not rclpy's
        # signal handlers: they shut the context down and return, and a player waiting for a message
        # due much later, or looping over a bag with no messages, never noticed; Python's own stop
        # it.
        rclpy.init(args=[], signal_handler_options=SignalHandlerOptions.NO)
        node = rclpy.create_node("internvl_play_bag")
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    clock = (
        node.create_publisher(
            Clock, "/clock", QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        )
        if clock_hz > 0
        else None
    )
    sent = 0
    try:
        with Reader(path) as reader:
            if unknown := sorted(set(remap) - {absolute(c.topic) for c in reader.connections}):
                topics = ", ".join(sorted(c.topic for c in reader.connections)) or "none"
                raise ValueError(
                    f"cannot remap {unknown[0]}: {path} has no such topic (its topics: {topics})"
                )
            publishers, playable = {}, []
            for c in reader.connections:
                try:
                    cls = _message_class(c.msgtype)
                # as ros2 bag play: the topic is left out, the rest play
                except (
                    ImportError,
                    AttributeError,
                ) as e:
                    node.get_logger().warning(
                        f"not playing {c.topic}: its type {c.msgtype} cannot be imported here "
                        f"({e}); source the workspace that builds it"
                    )
                    continue
                publishers[c.topic] = (
                    node.create_publisher(cls, remap.get(absolute(c.topic), c.topic), qos),
                    cls,
                )
                playable.append(c)
            if reader.connections and not playable:
                raise ValueError(
                    f"{path}: none of its topics has a message type that can be imported here"
                )
            deadline = time.monotonic() + wait_for_subscribers_s
            while time.monotonic() < deadline and any(
                p.get_subscription_count() < subscribers for p, _ in publishers.values()
            ):
                time.sleep(0.05)
            while True:
                started, first, sent_before = time.monotonic(), reader.start_time, sent
                next_tick = started

                def publish_clock(ns: int) -> None:
                    clock.publish(Clock(clock=_stamp_msg(ns)))

                for connection, ns, raw in reader.messages(connections=playable):
                    while True:  # sleep until the message is due, ticking /clock on the way
                        now = time.monotonic()
                        due = started + (ns - first) * 1e-9 / rate
                        if clock is not None and next_tick <= min(now, due):
                            publish_clock(first + int((next_tick - started) * rate * 1e9))
                            next_tick += 1 / clock_hz
                            continue
                        wake = min(due, next_tick) if clock is not None else due
                        if now >= due:
                            break
                        time.sleep(max(0.0, wake - now))
                    if clock is not None:
                        publish_clock(ns)
                    publisher, cls = publishers[connection.topic]
                    if restamp and hasattr(cls, "header"):
                        msg = deserialize_message(bytes(raw), cls)
                        msg.header.stamp = node.get_clock().now().to_msg()
                        publisher.publish(msg)
                    else:
                        publisher.publish(bytes(raw))
                    sent += 1
                # a bag with nothing to play would loop for ever
                if not loop or sent == sent_before:
                    break
            time.sleep(0.2)  # let reliable writers deliver the tail before the process exits
    finally:
        if own:
            node.destroy_node()
            rclpy.try_shutdown()
    return sent


def _stamp_msg(ns: int):
    from builtin_interfaces.msg import Time

    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def play_bag_main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="internvl-play-bag",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replay a rosbag2 into live topics with its recorded timing, in place of ros2 "
        "bag play where\n"
        "rosbag2 is not installed. Recorded stamps are old when played: use --restamp, or --clock "
        "with\n"
        "a node on use_sim_time.",
        epilog="Examples:\n"
        "  internvl-play-bag clip_bag --restamp --wait-for-subscribers 20\n"
        "  internvl-play-bag clip_bag --clock --remap image_raw:=/camera/image_raw",
    )
    ap.add_argument("bag", type=Path, help="the bag directory")
    ap.add_argument("--rate", type=float, default=1.0, help="playback speed factor")
    ap.add_argument("--loop", action="store_true", help="play again from the start at the end")
    ap.add_argument(
        "--restamp",
        action="store_true",
        help="set header stamps to the time of publishing (frames look live, not recorded)",
    )
    ap.add_argument(
        "--wait-for-subscribers",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to SECONDS for every topic to have its subscribers before playing",
    )
    ap.add_argument(
        "--subscribers",
        type=int,
        default=1,
        metavar="N",
        help="how many subscribers each topic waits for (with --wait-for-subscribers; default 1)",
    )
    ap.add_argument(
        "--remap", action="append", default=[], metavar="FROM:=TO", help="rename a topic"
    )
    ap.add_argument(
        "--clock",
        type=float,
        nargs="?",
        const=40.0,
        default=0.0,
        metavar="HZ",
        help="publish the bag's time on /clock (default 40 Hz), as ros2 bag play --clock does, for "
        "nodes that run with use_sim_time",
    )
    args = ap.parse_args(argv)
    if not args.rate > 0:  # NaN too: it never came due and the player spun for ever
        ap.error("--rate must be > 0")
    if args.subscribers < 1:
        ap.error("--subscribers must be >= 1")
    # NaN too; a faster clock never caught up and spun for ever
    if not 0 <= args.clock <= MAX_CLOCK_HZ:
        ap.error(f"--clock must be from 0 (no /clock) to {MAX_CLOCK_HZ:g} Hz")
    if not args.wait_for_subscribers >= 0:
        ap.error("--wait-for-subscribers must be >= 0 s")
    if bad := [r for r in args.remap if not all(r.partition(":=")[::2])]:
        ap.error(f"--remap takes FROM:=TO, not {bad[0]!r}")
    remap = dict(r.split(":=", 1) for r in args.remap)
    exit_on_sigterm()
    # also where a script started it with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sent = play_bag(
            args.bag,
            args.rate,
            args.loop,
            args.restamp,
            args.wait_for_subscribers,
            args.subscribers,
            remap,
            args.clock,
        )
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # rosbags raises its own errors for missing or unreadable bags
        print(f"internvl-play-bag: error: {e}", file=sys.stderr)
        return 2
    print(f"played {sent} messages from {args.bag}")
    return 0
