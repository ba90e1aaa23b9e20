"""The console scripts of the ROS side, light until they run: ``--help`` needs neither rclpy nor the
workspace's message package (the parameter table and argparse only).

``internvl_node``: the node (``--help`` lists every parameter). ``internvl-ask``: asks the node from
a shell and prints the streamed answer and its status.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys

from internvl_engine.answering import checked_choices
from internvl_engine.errors import InternVLError, InvalidRequestError

from . import params
from .params import MAX_NEW_TOKENS, MODES


def usage() -> str:
    lines = [
        "usage: internvl_node --ros-args [--params-file FILE] [-p NAME:=VALUE ...] [-r FROM:=TO "
        "...]",
        "",
        "The internvl node: answers questions (the question topic, the ask action) about what the "
        "cameras",
        "see. Every parameter, with its default (* needs a restart):",
        "",
    ]
    for name, p in params.PARAMETERS.items():
        lines.append(f"  {name}{' *' if p.read_only else ''} = {p.default!r}")
        lines.append(
            f"      {p.description}" + (f" One of: {', '.join(p.choices)}." if p.choices else "")
        )
    lines += [
        "",
        "Example:",
        "  internvl_node --ros-args --params-file config/internvl.yaml -p model_dir:=model",
        "  (or: ros2 launch internvl_ros internvl.launch.py model_dir:=model)",
    ]
    return "\n".join(lines)


def node_main(args=None) -> int:
    argv = sys.argv[1:] if args is None else list(args)
    own = argv[: argv.index("--ros-args")] if "--ros-args" in argv else argv
    if "-h" in own or "--help" in own:
        print(usage())
        return 0
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.lifecycle import TransitionCallbackReturn

    from .node import InternVLNode

    logger = rclpy.logging.get_logger("internvl")
    try:
        rclpy.init(args=args)
    # rcl refused the ROS arguments: a -p rule, a parameter file, an unknown option
    except RuntimeError as e:
        reason = re.sub(r", at \S+:\d+", "", str(e))  # rcl's source locations say nothing to a user
        logger.fatal(
            f"cannot start: rclpy.init refused the command line: {type(e).__name__}: {reason}"
        )
        return 1
    try:
        node = InternVLNode(command_line=argv)
    except InternVLError as e:
        logger.fatal(f"cannot start: {e}")
        rclpy.try_shutdown()
        return 1
    code = 0
    try:
        if node.get_parameter("autostart").value:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal(
                    f"cannot start: {getattr(node, 'configure_error', 'configure failed')}"
                )
                code = 1
            elif node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal("cannot start: activate failed")
                code = 1
        if code == 0:
            rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # ros2 launch without a TTY forwards a SIGINT the process group already got: a second one
        # must not cut the clean-up short with a KeyboardInterrupt traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        node.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(node_main())


def ask_main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="internvl-ask",
        description="Ask the internvl node a question and print the answer as it streams, "
        "then its status.",
        epilog="Examples:\n"
        "  internvl-ask -q 'Is the door open?' --choices yes,no --namespace /robot\n"
        "  internvl-ask --ground 'the red cup'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    asked = ap.add_mutually_exclusive_group(required=True)
    asked.add_argument("-q", "--question", help="the question")
    asked.add_argument(
        "--ground",
        metavar="PHRASE",
        help="find this (e.g. 'the red cup'): the answer's boxes in pixels of the camera frame "
        "(uses the action)",
    )
    ap.add_argument(
        "--mode",
        choices=MODES,
        help="image, video or text (topic: sets the node's mode parameter first; "
        "action: for this question only)",
    )
    ap.add_argument(
        "--choices",
        type=lambda text: text.split(","),
        default=[],
        metavar="A,B,...",
        help="answer with the most likely of these comma-separated choices (uses the action)",
    )
    ap.add_argument(
        "--cameras",
        type=lambda text: text.split(","),
        default=[],
        metavar="TOPIC,...",
        help="use only these of the node's cameras (image_topics names; uses the action)",
    )
    ap.add_argument(
        "--max-new-tokens",
        type=int,
        default=0,
        metavar="N",
        help="longest answer in tokens, for this question only (default: the node's; uses the "
        "action)",
    )
    ap.add_argument(
        "--action",
        action="store_true",
        help="ask through the ask action instead of the question topic",
    )
    ap.add_argument("--namespace", default="", help="the node's namespace")
    ap.add_argument("--node-name", default="internvl", help="the node's name (topic questions)")
    ap.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the node and the answer"
    )
    args = ap.parse_args(argv)
    if not (args.timeout > 0 and args.timeout < float("inf")):  # NaN would wait for ever
        ap.error(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    try:  # the node would refuse them (INVALID_QUESTION) after a round trip
        checked_choices(args.choices)
    except InvalidRequestError as e:
        ap.error(f"--{e}")
    if "" in args.cameras:
        ap.error(f"--cameras must not be empty names: {','.join(args.cameras)!r}")
    # the node would refuse it after a round trip
    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        ap.error(
            f"--max-new-tokens must be from 1 to {MAX_NEW_TOKENS} tokens (0: the node's "
            "max_new_tokens), "
            f"not {args.max_new_tokens}"
        )
    for option, text in (
        [("--question", args.question or ""), ("--ground", args.ground or "")]
        + [("--choices", c) for c in args.choices]
        + [("--cameras", c) for c in args.cameras]
    ):
        try:
            text.encode()
        except UnicodeEncodeError:  # Python keeps the bytes it could not decode as lone surrogates
            ap.error(f"{option} is not valid UTF-8 text: {text!r}")
    import rclpy
    from rclpy.exceptions import NameValidationException
    from rclpy.signals import SignalHandlerOptions
    from rclpy.validate_namespace import validate_namespace
    from rclpy.validate_node_name import validate_node_name

    from .client import ask_action, ask_topic

    try:  # before any node exists: rclpy says what is wrong and where
        if args.namespace:
            validate_namespace(
                args.namespace if args.namespace.startswith("/") else "/" + args.namespace
            )
        validate_node_name(args.node_name)
    except NameValidationException as e:
        ap.error(str(e))
    stopped_by = []

    def stop(signum, frame):  # Ctrl-C and SIGTERM alike: out of any wait at once, a goal cancelled
        stopped_by.append(signum)
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    # rclpy's would shut ROS down under the waits
    rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
    try:
        # only a goal carries them
        per_question = args.choices or args.cameras or args.max_new_tokens or args.ground
        return ask_action(args) if args.action or per_question else ask_topic(args)
    except TimeoutError as e:
        print(f"internvl-ask: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", flush=True)  # end the answer's line
        return 128 + (stopped_by[0] if stopped_by else signal.SIGINT)
    finally:
        rclpy.try_shutdown()
