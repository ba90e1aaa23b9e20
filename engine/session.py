"""The one interface every backend implements, and how a backend is chosen.

A session runs one model file: ``run(feeds)`` takes a dict of numpy arrays by input name and
returns the outputs as a list, in the model's output order (pyaxengine mishandles output-name
subsets, so outputs are always taken by position).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import BackendError

BACKENDS = ("auto", "onnxruntime")


class Session(Protocol):
    input_names: tuple[str, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def resolve_backend(name: str, model_dir: Path) -> str:
    """``auto`` picks the backend that can run the files in ``model_dir``."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name != "auto":
        return name
    if any(Path(model_dir).glob("*.axmodel")):
        raise BackendError(f"{model_dir} holds .axmodel files; the axengine backend is not available in this build")
    return "onnxruntime"


def open_session(backend: str, path: Path, threads: int | None = None) -> Session:
    if backend == "onnxruntime":
        from .backend_onnxruntime import OrtSession

        return OrtSession(path, threads)
    raise BackendError(f"backend {backend!r} cannot open {path}")
