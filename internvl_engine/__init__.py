"""internvl_engine: the ROS-free InternVL2.5 runtime.

Typical use::

    from internvl_engine import Chunk, Engine, Request, GenerationConfig, load_image
    engine = Engine("model_dir")
    for item in engine.stream(Request("What is this?", images=[load_image("cat.jpg")])):
        print(item.text if isinstance(item, Chunk) else item.timings)

The names below load their module when first used, so ``import internvl_engine`` is quick and a
client that only checks a question (``answering``) never loads numpy or onnxruntime. The tools
(``internvl_engine.tools``: exporter, doctor, benchmark, fidelity) are never imported from here.
"""

from __future__ import annotations

import importlib

from .errors import (
    BackendError,
    ConfigError,
    ImageError,
    InternVLError,
    InvalidRequestError,
    ModelDirError,
    PromptTooLongError,
    VideoError,
)

_LAZY = {
    "Answer": "answering",
    "Answerer": "answering",
    "Chunk": "answering",
    "Request": "answering",
    "Timings": "answering",
    "checked_choices": "answering",
    "DEFAULT_SYSTEM_PROMPT": "config",
    "Engine": "engine",
    "Prompt": "engine",
    "GenerationConfig": "sampling",
    "load_image": "preprocess",
    "load_video_frames": "preprocess",
}

__all__ = [
    "BackendError",
    "ConfigError",
    "ImageError",
    "InternVLError",
    "InvalidRequestError",
    "ModelDirError",
    "PromptTooLongError",
    "VideoError",
    *_LAZY,
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
