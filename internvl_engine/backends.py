"""Choosing and opening a backend: the tensor runtime a ``session.Session`` runs on."""

from __future__ import annotations

from pathlib import Path

from .errors import BackendError
from .session import Session

BACKENDS = ("auto", "onnxruntime", "axengine")


def resolve_backend(name: str, model_dir: Path) -> str:
    """``auto`` picks axengine for a directory of ``.axmodel`` files, onnxruntime otherwise."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name != "auto":
        return name
    return "axengine" if any(Path(model_dir).glob("*.axmodel")) else "onnxruntime"


def open_session(
    backend: str,
    path: Path | list[Path],
    threads: int | None = None,
    provider: str | None = None,
    many_rows: bool = False,
) -> Session:
    """``path``: one model file, or (onnxruntime) one file per shape group. ``many_rows``: the model
    runs many rows at once (the ViT), which decides its kernels on some CPUs
    (backend_onnxruntime)."""
    if backend == "onnxruntime":
        from .backend_onnxruntime import OrtSession

        return OrtSession(path, threads, many_rows)
    if backend == "axengine":
        from .backend_axengine import AxEngineSession

        return AxEngineSession(path, provider)
    raise BackendError(f"backend {backend!r} cannot open {path}")
