"""Image and video preprocessing, equal to InternVL's own (``load_image``, ``dynamic_preprocess``,
``build_transform``).

Images are RGB uint8 [H, W, 3]. Each image is split into tiles of the model's image size (448 px
for InternVL2.5-1B) by InternVL's dynamic tiling (closest aspect ratio, at most ``max_tiles``
tiles, plus a whole-image thumbnail when there is more than one tile), resized with Pillow's
bicubic filter as InternVL does (it widens with the scale factor, so a downscaled photo is smoothed
first; OpenCV's INTER_CUBIC is not, and gives another picture), then scaled to [0, 1] and
normalised with ImageNet statistics in torchvision's order of operations. Image files are read with
Pillow too, as InternVL reads them (no EXIF rotation); video frames with OpenCV.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import IMAGENET_MEAN, IMAGENET_STD
from .errors import ImageError, VideoError

_MEAN = np.array(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
_STD = np.array(IMAGENET_STD, np.float32).reshape(3, 1, 1)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (InternVL's ``Image.open(path).convert("RGB")``)."""
    if Path(path).is_dir():
        raise ImageError(f"{path}: a directory, not an image file")
    if not Path(path).is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(
            f"{path}: not a readable image (unsupported format or corrupt data: {e})"
        ) from e


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Accept gray [H, W], RGB [H, W, 3] or RGBA [H, W, 4] uint8; return RGB uint8."""
    if isinstance(image, (str, Path)):
        raise ImageError(
            f"images are pixel arrays, not file names: read {str(image)!r} with load_image"
        )
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ImageError(f"images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2RGB)
    raise ImageError(f"images must be [H, W], [H, W, 3] or [H, W, 4], got shape {image.shape}")


def closest_grid(
    width: int, height: int, image_size: int, min_num: int, max_num: int
) -> tuple[int, int]:
    """InternVL's ``find_closest_aspect_ratio``: the (columns, rows) grid whose ratio is closest."""
    ratios = sorted(
        {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        },
        key=lambda r: r[0] * r[1],
    )
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in ratios:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def _resize(image: Image.Image, width: int, height: int) -> np.ndarray:
    # Image.BICUBIC, not Image.Resampling.BICUBIC: Ubuntu 22.04's Pillow is 9.0, older than
    # Resampling.
    return np.asarray(image.resize((width, height), Image.BICUBIC))


def tiles(
    image: np.ndarray,
    image_size: int,
    max_tiles: int = 1,
    min_tiles: int = 1,
    use_thumbnail: bool = True,
) -> list[np.ndarray]:
    """InternVL's ``dynamic_preprocess``: RGB tiles of image_size x image_size, row by row."""
    image = as_rgb(image)
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ImageError("image has no pixels")
    cols, rows = closest_grid(w, h, image_size, min_tiles, max_tiles)
    picture = Image.fromarray(np.ascontiguousarray(image))
    resized = _resize(picture, cols * image_size, rows * image_size)
    out = [
        resized[r * image_size : (r + 1) * image_size, c * image_size : (c + 1) * image_size]
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(out) > 1:
        out.append(_resize(picture, image_size, image_size))
    return out


def normalize(tile_list: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 tiles -> float32 [N, 3, S, S]: torchvision's ToTensor (x / 255) then Normalize
    ((x - mean) / std), in float32 and in that order, so the values are the same to the bit."""
    x = np.stack(tile_list).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray((x - _MEAN) / _STD)


def segment_centre_indices(num_frames: int, num_segments: int) -> list[int]:
    """InternVL's ``get_index`` without bounds: the centre frame of each of ``num_segments`` equal
    segments."""
    if num_frames <= 0 or num_segments <= 0:
        return []
    seg = (num_frames - 1) / num_segments
    return [int(seg / 2 + np.round(seg * i)) for i in range(num_segments)]


@contextlib.contextmanager
def _native_stderr_silenced():
    """FFmpeg, inside OpenCV, prints its complaints straight to file descriptor 2 ("moov atom not
    found"); the engine says what is wrong in its own words instead. (Any thread's stderr is off for
    that moment: the tools that read video files are single-threaded.)"""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def load_video_frames(path: str | Path, num_segments: int = 8) -> list[np.ndarray]:
    """Uniformly sampled RGB frames of a video file (read with OpenCV)."""
    with _native_stderr_silenced():
        return _read_video(path, num_segments)


def iter_video_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Every frame of a video file, RGB, one at a time: a long clip is never in memory whole."""
    cap = _open_video(path)
    try:
        count = 0
        while True:
            # around each call only: the caller's own stderr between frames is its own
            with _native_stderr_silenced():
                ok, frame = cap.read()
            if not ok:
                break
            count += 1
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        if not count:
            raise VideoError(f"{path}: video has no frames")
    finally:
        cap.release()


def _open_video(path: str | Path) -> cv2.VideoCapture:
    if not Path(path).is_file():
        raise VideoError(f"{path}: no such video file")
    with _native_stderr_silenced():
        cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise VideoError(f"{path}: cannot open video (unsupported format or corrupt data)")
    return cap


def _read_video(path: str | Path, num_segments: int) -> list[np.ndarray]:
    cap = _open_video(path)
    try:
        count = 0
        while cap.grab():  # the container's frame count is often wrong; count what decodes
            count += 1
        wanted = segment_centre_indices(count, num_segments)
        if not wanted:
            raise VideoError(f"{path}: video has no frames")
        cap.release()
        cap = _open_video(path)  # reopen: seeking back is not exact for every codec
        frames, index = [], 0
        for target in sorted(set(wanted)):
            while index <= target:
                ok = cap.grab()
                index += 1
                if not ok:
                    raise VideoError(f"{path}: frame {target} could not be decoded")
            ok, frame = cap.retrieve()
            if not ok:
                raise VideoError(f"{path}: frame {target} could not be decoded")
            frames.append((target, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
        by_index = dict(frames)
        return [by_index[i] for i in wanted]
    finally:
        cap.release()
