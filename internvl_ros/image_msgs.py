"""sensor_msgs/Image and CompressedImage -> RGB uint8 numpy arrays (numpy/OpenCV, no cv_bridge).

Honours ``step`` row padding and ``is_bigendian``; 16-bit encodings are scaled to 8 bits.
"""
from __future__ import annotations

import cv2
import numpy as np

from internvl_engine import InternVLError

# encoding -> (bytes per channel, channels, OpenCV conversion to RGB or None)
ENCODINGS = {
    "rgb8": (1, 3, None), "bgr8": (1, 3, cv2.COLOR_BGR2RGB), "rgba8": (1, 4, cv2.COLOR_RGBA2RGB),
    "bgra8": (1, 4, cv2.COLOR_BGRA2RGB), "mono8": (1, 1, cv2.COLOR_GRAY2RGB),
    "rgb16": (2, 3, None), "bgr16": (2, 3, cv2.COLOR_BGR2RGB), "rgba16": (2, 4, cv2.COLOR_RGBA2RGB),
    "bgra16": (2, 4, cv2.COLOR_BGRA2RGB), "mono16": (2, 1, cv2.COLOR_GRAY2RGB),
}


class ImageConversionError(InternVLError):
    """A camera message cannot be turned into an image; the message says why."""


def image_to_rgb(msg) -> np.ndarray:
    encoding = msg.encoding.lower()
    if encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported encoding {msg.encoding!r} (supported: {', '.join(ENCODINGS)})")
    depth, channels, conversion = ENCODINGS[encoding]
    h, w, step = msg.height, msg.width, msg.step
    row = w * channels * depth
    if h == 0 or w == 0:
        raise ImageConversionError(f"empty image ({w}x{h})")
    if step < row:
        raise ImageConversionError(f"step {step} is shorter than one {encoding} row of {w} pixels ({row} bytes)")
    data = np.frombuffer(memoryview(msg.data), np.uint8)
    if data.size < step * h:
        raise ImageConversionError(f"truncated image: {data.size} bytes, {w}x{h} with step {step} needs {step * h}")
    pixels = data[:step * h].reshape(h, step)[:, :row]
    if depth == 2:
        pixels = np.ascontiguousarray(pixels).view(">u2" if msg.is_bigendian else "<u2")
        pixels = (pixels >> 8).astype(np.uint8)
    pixels = pixels.reshape(h, w, channels)
    if conversion is None:
        return np.ascontiguousarray(pixels)
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion)


def rgb_to_pixels(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """The inverse of ``image_to_rgb`` (native byte order), for writing camera data."""
    depth = ENCODINGS[encoding][0]
    to_encoding = {"rgb": None, "bgr": cv2.COLOR_RGB2BGR, "rgba": cv2.COLOR_RGB2RGBA, "bgra": cv2.COLOR_RGB2BGRA,
                   "mono": cv2.COLOR_RGB2GRAY}[encoding.rstrip("168")]
    pixels = rgb if to_encoding is None else cv2.cvtColor(rgb, to_encoding)
    return pixels.astype(np.uint16) * 257 if depth == 2 else pixels


def compressed_to_rgb(msg) -> np.ndarray:
    data = np.frombuffer(memoryview(msg.data), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageConversionError(f"cannot decode compressed image (format {msg.format!r}, {data.size} bytes)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_rgb(msg) -> np.ndarray:
    return compressed_to_rgb(msg) if hasattr(msg, "format") else image_to_rgb(msg)
