"""internvl_engine: the ROS-free InternVL2.5 runtime (this is the repository's ``engine/`` folder).

Typical use::

    from internvl_engine import Engine, Request, GenerationConfig, load_image
    engine = Engine("model_dir")
    for item in engine.stream(Request("What is this?", images=[load_image("cat.jpg")])):
        print(item if isinstance(item, str) else item.timings)
"""

from .config import DEFAULT_SYSTEM_PROMPT
from .engine import Answer, Engine, Prompt, Request, Timings, checked_choices
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
from .preprocess import load_image, load_video_frames
from .sampling import GenerationConfig

__all__ = [
    "Answer",
    "BackendError",
    "ConfigError",
    "DEFAULT_SYSTEM_PROMPT",
    "Engine",
    "GenerationConfig",
    "ImageError",
    "InternVLError",
    "InvalidRequestError",
    "ModelDirError",
    "Prompt",
    "PromptTooLongError",
    "Request",
    "Timings",
    "VideoError",
    "checked_choices",
    "load_image",
    "load_video_frames",
]
