"""Test images and videos made on the fly (tests never read files they did not write)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """RGB frames to an MJPG .avi (the codec every OpenCV build can write)."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write MJPG video"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def numbered_frames(n: int, h: int = 96, w: int = 128) -> list[np.ndarray]:
    """Frames whose mean brightness encodes their index (survives JPEG compression)."""
    return [np.full((h, w, 3), 10 + 240 * i // max(n - 1, 1), np.uint8) for i in range(n)]
