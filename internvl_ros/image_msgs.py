"""sensor_msgs/Image and CompressedImage -> RGB uint8 numpy arrays (numpy/OpenCV, no cv_bridge).

Honours ``step`` row padding and ``is_bigendian``; 16-bit encodings are scaled to 8 bits. Raw
cameras' Bayer mosaics are demosaiced, and YUV (4:2:2 from USB cameras; NV12, NV21 and NV24 from
video pipelines) is read as ITU-R BT.601 video range, as V4L2 cameras send it and OpenCV decodes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from internvl_engine import InternVLError


@dataclass(frozen=True)
class Encoding:
    depth: int  # bytes per sample
    # samples per pixel as stored (4:2:2: two, a Y and a U or V in turn; semi-planar: the Y)
    channels: int
    to_rgb: int | None  # OpenCV conversion to RGB; None: already RGB
    even_width: bool = False  # chroma shared by pixel pairs
    # Semi-planar YUV: the Y rows, then a plane of U,V pairs, one pair for each 2x2 pixels (420:
    # nv12, nv21; even height too) or for each pixel (444: nv24, its rows twice as long as the Y
    # rows, as V4L2 lays them out).
    chroma_plane: int = 0

    def size_problem(self, w: int, h: int) -> str | None:
        """Why a w x h picture cannot be held in this encoding, or None."""
        even_height = self.chroma_plane == 420
        if (self.even_width and w % 2) or (even_height and h % 2):
            sides = "width and height" if even_height else "width"
            return f"its {sides} must be even (pixels share their colour), not {w}x{h}"
        return None

    def rows(self, h: int) -> int:
        """How many rows of ``step`` bytes an h-row picture takes."""
        return h + {0: 0, 420: h // 2, 444: 2 * h}[self.chroma_plane]


# OpenCV names a Bayer pattern by the second row's second and third pixels: rggb is its BayerBG (as
# cv_bridge maps it).
BAYER = {
    "rggb": cv2.COLOR_BayerBG2RGB,
    "bggr": cv2.COLOR_BayerRG2RGB,
    "gbrg": cv2.COLOR_BayerGR2RGB,
    "grbg": cv2.COLOR_BayerGB2RGB,
}
# sensor_msgs/image_encodings names
ENCODINGS = {
    "rgb8": Encoding(1, 3, None),
    "bgr8": Encoding(1, 3, cv2.COLOR_BGR2RGB),
    "rgba8": Encoding(1, 4, cv2.COLOR_RGBA2RGB),
    "bgra8": Encoding(1, 4, cv2.COLOR_BGRA2RGB),
    "mono8": Encoding(1, 1, cv2.COLOR_GRAY2RGB),
    "rgb16": Encoding(2, 3, None),
    "bgr16": Encoding(2, 3, cv2.COLOR_BGR2RGB),
    "rgba16": Encoding(2, 4, cv2.COLOR_RGBA2RGB),
    "bgra16": Encoding(2, 4, cv2.COLOR_BGRA2RGB),
    "mono16": Encoding(2, 1, cv2.COLOR_GRAY2RGB),
    **{
        f"bayer_{pattern}{bits}": Encoding(bits // 8, 1, code)
        for pattern, code in BAYER.items()
        for bits in (8, 16)
    },
    # yuv422 and yuv422_yuy2 are Humble's names; uyvy and yuyv are later distributions' (as is nv12)
    # U Y V Y
    **dict.fromkeys(["yuv422", "uyvy"], Encoding(1, 2, cv2.COLOR_YUV2RGB_UYVY, even_width=True)),
    # Y U Y V
    **dict.fromkeys(
        ["yuv422_yuy2", "yuyv"], Encoding(1, 2, cv2.COLOR_YUV2RGB_YUY2, even_width=True)
    ),
    "nv12": Encoding(1, 1, cv2.COLOR_YUV2RGB_NV12, even_width=True, chroma_plane=420),  # U,V pairs
    "nv21": Encoding(1, 1, cv2.COLOR_YUV2RGB_NV21, even_width=True, chroma_plane=420),  # V,U pairs
    "nv24": Encoding(1, 1, cv2.COLOR_YUV2RGB_NV12, chroma_plane=444),  # U,V pairs; see _nv24_to_rgb
}
# Encodings refused with what they likely are: a depth camera's measurements, or pixels whose
# channel order is not given (cv_bridge's cv2_to_imgmsg without an encoding writes these).
DEPTH = "a depth image: image_topics takes colour or grey cameras"
UNORDERED = (
    "pixels without a channel order, as cv2_to_imgmsg writes without an encoding: "
    "publish them as {}"
)
REFUSED = {
    "16uc1": DEPTH,
    "32fc1": DEPTH,
    "8uc1": UNORDERED.format("mono8"),
    "8uc3": UNORDERED.format("bgr8"),
    "8uc4": UNORDERED.format("bgra8"),
}


class ImageConversionError(InternVLError):
    """A camera message cannot be turned into an image; the message says why."""


def image_to_rgb(msg) -> np.ndarray:
    name = msg.encoding.lower()
    if name not in ENCODINGS:
        what = f" ({REFUSED[name]})" if name in REFUSED else ""
        raise ImageConversionError(
            f"unsupported encoding {msg.encoding!r}{what} (supported: {', '.join(ENCODINGS)})"
        )
    encoding = ENCODINGS[name]
    h, w, step = msg.height, msg.width, msg.step
    if h == 0 or w == 0:
        raise ImageConversionError(f"empty image ({w}x{h})")
    if problem := encoding.size_problem(w, h):
        raise ImageConversionError(f"{name}: {problem}")
    row = w * encoding.channels * encoding.depth
    rows = encoding.rows(h)
    if step < row:
        raise ImageConversionError(
            f"step {step} is shorter than one {name} row of {w} pixels ({row} bytes)"
        )
    data = np.frombuffer(memoryview(msg.data), np.uint8)
    if data.size < step * rows:
        # a publisher that gives nv24's step as 3 bytes a pixel, or as the U,V rows' length, lands
        # here
        layout = (
            " (step is its Y rows' length; its U,V rows take 2 x step)"
            if encoding.chroma_plane == 444
            else ""
        )
        raise ImageConversionError(
            f"truncated image: {data.size} bytes, {w}x{h} {name} with step {step} needs "
            f"{step * rows}{layout}"
        )
    if encoding.chroma_plane == 444:
        y, uv = (
            data[: step * h].reshape(h, step)[:, :w],
            data[step * h : step * rows].reshape(h, 2 * step)[:, : 2 * w],
        )
        return _nv24_to_rgb(y, uv)
    pixels = data[: step * rows].reshape(rows, step)[:, :row]
    if encoding.depth == 2:
        pixels = np.ascontiguousarray(pixels).view(">u2" if msg.is_bigendian else "<u2")
        pixels = (pixels >> 8).astype(np.uint8)
    pixels = np.ascontiguousarray(pixels.reshape(rows, w, encoding.channels))
    if encoding.to_rgb is None:
        return pixels
    try:
        return cv2.cvtColor(pixels, encoding.to_rgb)
    # a refusal the checks above did not foresee: still the camera's problem, named
    except cv2.error as e:
        raise ImageConversionError(f"OpenCV cannot convert this {w}x{h} {name} image: {e}") from e


def _nv24_to_rgb(y: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """OpenCV has no 4:4:4 YUV decoder of this range. Its NV12 one, given the picture at twice the
    size with each Y sample spread over 2x2 pixels, gives each 2x2 block one of NV24's U,V pairs:
    the blocks' top-left pixels are the picture, decoded exactly as the other YUV encodings are.
    (OpenCV's resizes do the spreading and picking: numpy's strided copies take five times as
    long.)"""
    h, w = y.shape
    doubled = np.concatenate([cv2.resize(y, (2 * w, 2 * h), interpolation=cv2.INTER_NEAREST), uv])
    return cv2.resize(
        cv2.cvtColor(doubled, cv2.COLOR_YUV2RGB_NV12), (w, h), interpolation=cv2.INTER_NEAREST
    )


def rgb_to_pixels(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """The inverse of ``image_to_rgb`` (native byte order), for writing camera data: rows of the
    encoding's samples. Bayer and YUV keep less than the RGB (one colour per pixel, shared
    chroma)."""
    h, w = rgb.shape[:2]
    spec = ENCODINGS[encoding]
    if problem := spec.size_problem(w, h):
        raise ValueError(f"{encoding}: {problem}")
    if encoding.startswith("bayer_"):
        pattern = encoding[len("bayer_") : len("bayer_") + 4]
        pixels = np.empty((h, w), rgb.dtype)
        for i, colour in enumerate(pattern):  # 2x2 cells: the pattern's colours row by row
            pixels[i // 2 :: 2, i % 2 :: 2] = rgb[i // 2 :: 2, i % 2 :: 2, "rgb".index(colour)]
    elif spec.even_width or spec.chroma_plane:  # YUV
        pixels = _rgb_to_yuv(rgb, spec)
    else:
        to_encoding = {
            "rgb": None,
            "bgr": cv2.COLOR_RGB2BGR,
            "rgba": cv2.COLOR_RGB2RGBA,
            "bgra": cv2.COLOR_RGB2BGRA,
            "mono": cv2.COLOR_RGB2GRAY,
        }[encoding.rstrip("168")]
        pixels = rgb if to_encoding is None else cv2.cvtColor(rgb, to_encoding)
    return pixels.astype(np.uint16) * 257 if spec.depth == 2 else pixels


def _rgb_to_yuv(rgb: np.ndarray, spec: Encoding) -> np.ndarray:
    """BT.601 video range (Y 16..235, U and V 16..240), chroma averaged over the pixels that share
    it."""
    r, g, b = np.moveaxis(rgb.astype(np.float64), -1, 0)
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    u = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    v = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    h, w = y.shape
    if spec.chroma_plane:  # the chroma plane as rows of w bytes, as many as Encoding.rows says
        if spec.chroma_plane == 420:
            u, v = (c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (u, v))
        pairs = [v, u] if spec.to_rgb == cv2.COLOR_YUV2RGB_NV21 else [u, v]
        planes = [y, np.stack(pairs, axis=-1).reshape(spec.rows(h) - h, w)]
        return np.rint(np.concatenate(planes)).astype(np.uint8)
    u, v = (c.reshape(h, w // 2, 2).mean(axis=2) for c in (u, v))
    y0, y1 = y[:, 0::2], y[:, 1::2]
    quads = [u, y0, v, y1] if spec.to_rgb == cv2.COLOR_YUV2RGB_UYVY else [y0, u, y1, v]
    return np.rint(np.stack(quads, axis=-1).reshape(h, w, 2)).astype(np.uint8)


def compressed_to_rgb(msg) -> np.ndarray:
    data = np.frombuffer(memoryview(msg.data), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        what = f" ({DEPTH})" if "compresseddepth" in msg.format.lower() else ""
        raise ImageConversionError(
            f"cannot decode compressed image (format {msg.format!r}, {data.size} bytes){what}"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_rgb(msg) -> np.ndarray:
    return compressed_to_rgb(msg) if hasattr(msg, "format") else image_to_rgb(msg)
