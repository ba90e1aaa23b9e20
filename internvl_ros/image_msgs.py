"""sensor_msgs/Image and CompressedImage -> RGB uint8 numpy arrays (numpy/OpenCV, no cv_bridge).

Honours ``step`` row padding and ``is_bigendian``; 16-bit encodings are scaled to 8 bits. Raw
cameras' Bayer mosaics are demosaiced, and YUV (4:2:2 from USB cameras, NV21) is read as ITU-R BT.601
video range, as V4L2 cameras send it and OpenCV decodes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from internvl_engine import InternVLError


@dataclass(frozen=True)
class Encoding:
    depth: int  # bytes per sample
    channels: int  # samples per pixel as stored (4:2:2: two, a Y and a U or V in turn)
    to_rgb: int | None  # OpenCV conversion to RGB; None: already RGB
    even_width: bool = False  # chroma shared by pixel pairs
    chroma_plane: bool = False  # NV21: the Y rows, then a half-height plane of V,U pairs (even height too)

    def size_problem(self, w: int, h: int) -> str | None:
        """Why a w x h picture cannot be held in this encoding, or None."""
        if (self.even_width and w % 2) or (self.chroma_plane and h % 2):
            return (f"its width{' and height' * self.chroma_plane} must be even (pixels share their colour), "
                    f"not {w}x{h}")
        return None


# OpenCV names a Bayer pattern by the second row's second and third pixels: rggb is its BayerBG (as cv_bridge
# maps it).
BAYER = {"rggb": cv2.COLOR_BayerBG2RGB, "bggr": cv2.COLOR_BayerRG2RGB, "gbrg": cv2.COLOR_BayerGR2RGB,
         "grbg": cv2.COLOR_BayerGB2RGB}
# sensor_msgs/image_encodings names
ENCODINGS = {
    "rgb8": Encoding(1, 3, None), "bgr8": Encoding(1, 3, cv2.COLOR_BGR2RGB),
    "rgba8": Encoding(1, 4, cv2.COLOR_RGBA2RGB), "bgra8": Encoding(1, 4, cv2.COLOR_BGRA2RGB),
    "mono8": Encoding(1, 1, cv2.COLOR_GRAY2RGB),
    "rgb16": Encoding(2, 3, None), "bgr16": Encoding(2, 3, cv2.COLOR_BGR2RGB),
    "rgba16": Encoding(2, 4, cv2.COLOR_RGBA2RGB), "bgra16": Encoding(2, 4, cv2.COLOR_BGRA2RGB),
    "mono16": Encoding(2, 1, cv2.COLOR_GRAY2RGB),
    **{f"bayer_{pattern}{bits}": Encoding(bits // 8, 1, code) for pattern, code in BAYER.items() for bits in (8, 16)},
    "yuv422": Encoding(1, 2, cv2.COLOR_YUV2RGB_UYVY, even_width=True),  # U Y V Y
    "yuv422_yuy2": Encoding(1, 2, cv2.COLOR_YUV2RGB_YUY2, even_width=True),  # Y U Y V
    "nv21": Encoding(1, 1, cv2.COLOR_YUV2RGB_NV21, even_width=True, chroma_plane=True),
}
# Encodings refused with what they likely are: a depth camera's measurements, or pixels whose channel
# order is not given (cv_bridge's cv2_to_imgmsg without an encoding writes these).
DEPTH = "a depth image: image_topics takes colour or grey cameras"
UNORDERED = "pixels without a channel order, as cv2_to_imgmsg writes without an encoding: publish them as {}"
REFUSED = {"16uc1": DEPTH, "32fc1": DEPTH, "8uc1": UNORDERED.format("mono8"), "8uc3": UNORDERED.format("bgr8"),
           "8uc4": UNORDERED.format("bgra8")}


class ImageConversionError(InternVLError):
    """A camera message cannot be turned into an image; the message says why."""


def image_to_rgb(msg) -> np.ndarray:
    name = msg.encoding.lower()
    if name not in ENCODINGS:
        what = f" ({REFUSED[name]})" if name in REFUSED else ""
        raise ImageConversionError(f"unsupported encoding {msg.encoding!r}{what} (supported: {', '.join(ENCODINGS)})")
    encoding = ENCODINGS[name]
    h, w, step = msg.height, msg.width, msg.step
    if h == 0 or w == 0:
        raise ImageConversionError(f"empty image ({w}x{h})")
    if problem := encoding.size_problem(w, h):
        raise ImageConversionError(f"{name}: {problem}")
    row = w * encoding.channels * encoding.depth
    rows = h * 3 // 2 if encoding.chroma_plane else h
    if step < row:
        raise ImageConversionError(f"step {step} is shorter than one {name} row of {w} pixels ({row} bytes)")
    data = np.frombuffer(memoryview(msg.data), np.uint8)
    if data.size < step * rows:
        raise ImageConversionError(f"truncated image: {data.size} bytes, {w}x{h} {name} with step {step} needs "
                                   f"{step * rows}")
    pixels = data[:step * rows].reshape(rows, step)[:, :row]
    if encoding.depth == 2:
        pixels = np.ascontiguousarray(pixels).view(">u2" if msg.is_bigendian else "<u2")
        pixels = (pixels >> 8).astype(np.uint8)
    pixels = np.ascontiguousarray(pixels.reshape(rows, w, encoding.channels))
    if encoding.to_rgb is None:
        return pixels
    try:
        return cv2.cvtColor(pixels, encoding.to_rgb)
    except cv2.error as e:  # a refusal the checks above did not foresee: still the camera's problem, named
        raise ImageConversionError(f"OpenCV cannot convert this {w}x{h} {name} image: {e}") from e


def rgb_to_pixels(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """The inverse of ``image_to_rgb`` (native byte order), for writing camera data: rows of the
    encoding's samples. Bayer and YUV keep less than the RGB (one colour per pixel, shared chroma)."""
    h, w = rgb.shape[:2]
    spec = ENCODINGS[encoding]
    if problem := spec.size_problem(w, h):
        raise ValueError(f"{encoding}: {problem}")
    if encoding.startswith("bayer_"):
        pattern = encoding[len("bayer_"):len("bayer_") + 4]
        pixels = np.empty((h, w), rgb.dtype)
        for i, colour in enumerate(pattern):  # 2x2 cells: the pattern's colours row by row
            pixels[i // 2::2, i % 2::2] = rgb[i // 2::2, i % 2::2, "rgb".index(colour)]
    elif encoding.startswith(("yuv", "nv")):
        pixels = _rgb_to_yuv(rgb, encoding)
    else:
        to_encoding = {"rgb": None, "bgr": cv2.COLOR_RGB2BGR, "rgba": cv2.COLOR_RGB2RGBA, "bgra": cv2.COLOR_RGB2BGRA,
                       "mono": cv2.COLOR_RGB2GRAY}[encoding.rstrip("168")]
        pixels = rgb if to_encoding is None else cv2.cvtColor(rgb, to_encoding)
    return pixels.astype(np.uint16) * 257 if spec.depth == 2 else pixels


def _rgb_to_yuv(rgb: np.ndarray, name: str) -> np.ndarray:
    """BT.601 video range (Y 16..235, U and V 16..240), chroma averaged over the pixels that share it."""
    r, g, b = np.moveaxis(rgb.astype(np.float64), -1, 0)
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape
    if name == "nv21":
        u, v = (c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (u, v))
        planes = [y, np.stack([v, u], axis=-1).reshape(h // 2, w)]
        return np.rint(np.concatenate(planes)).astype(np.uint8)
    u, v = (c.reshape(h, w // 2, 2).mean(axis=2) for c in (u, v))
    y0, y1 = y[:, 0::2], y[:, 1::2]
    quads = [u, y0, v, y1] if name == "yuv422" else [y0, u, y1, v]
    return np.rint(np.stack(quads, axis=-1).reshape(h, w, 2)).astype(np.uint8)


def compressed_to_rgb(msg) -> np.ndarray:
    data = np.frombuffer(memoryview(msg.data), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        what = f" ({DEPTH})" if "compresseddepth" in msg.format.lower() else ""
        raise ImageConversionError(f"cannot decode compressed image (format {msg.format!r}, {data.size} bytes){what}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_rgb(msg) -> np.ndarray:
    return compressed_to_rgb(msg) if hasattr(msg, "format") else image_to_rgb(msg)
