"""Camera messages to RGB: every supported encoding, row padding, byte order, bad data."""

from __future__ import annotations

import numpy as np
import pytest
from ros_harness import compressed_msg, image_msg
from sensor_msgs.msg import CompressedImage, Image

from internvl_ros.image_msgs import ENCODINGS, ImageConversionError, to_rgb

# Bayer mosaics and YUV keep less than the picture: one colour per pixel, chroma shared by
# neighbours.
SAMPLED = [e for e in ENCODINGS if e.startswith(("bayer_", "yuv", "uyvy", "yuyv", "nv"))]
EXACT = [e for e in ENCODINGS if e not in SAMPLED and not e.startswith("mono")]


def scene(h=24, w=32):
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (220, 20, 30)  # red left half
    rgb[:, w // 2 :] = (10, 40, 200)  # blue right half
    return rgb


def gradient(h=24, w=32):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 7, y * 9, 255 - x * 5], axis=-1).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("encoding", EXACT)
@pytest.mark.parametrize("padding", [0, 5])
def test_colour_encodings_round_trip(encoding, padding):
    rgb = scene()
    np.testing.assert_array_equal(to_rgb(image_msg(rgb, encoding, padding)), rgb)


@pytest.mark.parametrize("encoding", SAMPLED)
@pytest.mark.parametrize("padding", [0, 5])
def test_sampled_encodings_round_trip_closely(encoding, padding):
    rgb = gradient()
    error = np.abs(to_rgb(image_msg(rgb, encoding, padding)).astype(int) - rgb)
    assert error[2:-2, 2:-2].mean() < 3 and error.max() <= 12, (error.mean(), error.max())


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
@pytest.mark.parametrize("colour", [0, 1, 2])
def test_bayer_patterns_name_the_colour_of_each_site(pattern, colour):
    """A mosaic written by hand from the pattern's name: only the sites of one colour are lit, so
    the picture must come out that colour and no other."""
    cell = np.array(
        [
            [200 if c == "rgb"[colour] else 0 for c in pattern[:2]],
            [200 if c == "rgb"[colour] else 0 for c in pattern[2:]],
        ],
        np.uint8,
    )
    mosaic = np.tile(cell, (4, 4))
    out = to_rgb(
        Image(height=8, width=8, encoding=f"bayer_{pattern}8", step=8, data=mosaic.tobytes())
    )
    expected = np.zeros(3)
    expected[colour] = 200
    np.testing.assert_allclose(out[2:-2, 2:-2].reshape(-1, 3).mean(axis=0), expected, atol=2)


# BT.601 video-range Y, U, V of pure colours (the standard's table), and the bytes of a 2x2 picture
# of each in the three layouts.
YUV = {
    (255, 0, 0): (81, 90, 240),
    (0, 255, 0): (145, 54, 34),
    (0, 0, 255): (41, 240, 110),
    (255, 255, 255): (235, 128, 128),
    (0, 0, 0): (16, 128, 128),
}
LAYOUTS = {
    "yuv422": lambda y, u, v: [u, y, v, y] * 2,
    "uyvy": lambda y, u, v: [u, y, v, y] * 2,
    "yuv422_yuy2": lambda y, u, v: [y, u, y, v] * 2,
    "yuyv": lambda y, u, v: [y, u, y, v] * 2,
    "nv12": lambda y, u, v: [y] * 4 + [u, v],
    "nv21": lambda y, u, v: [y] * 4 + [v, u],
    "nv24": lambda y, u, v: [y] * 4 + [u, v] * 4,
}


@pytest.mark.parametrize("encoding", LAYOUTS)
@pytest.mark.parametrize("rgb", YUV)
def test_yuv_layouts_decode_known_colours(encoding, rgb):
    data = bytes(LAYOUTS[encoding](*YUV[rgb]))
    out = to_rgb(
        Image(
            height=2,
            width=2,
            encoding=encoding,
            step=2 if encoding.startswith("nv") else 4,
            data=data,
        )
    )
    assert np.abs(out.reshape(-1, 3).astype(int) - rgb).max() <= 3, out.reshape(-1, 3)


def test_nv24_keeps_each_pixels_colour():
    """4:4:4 shares no chroma: a picture whose colour changes at every pixel comes back exact to
    rounding, where the 4:2:0 and 4:2:2 encodings blur it."""
    rgb = np.array(list(YUV) * 4, np.uint8)[:16].reshape(4, 4, 3)
    error = np.abs(to_rgb(image_msg(rgb, "nv24", padding=3)).astype(int) - rgb)
    assert error.max() <= 3, error.max()
    assert np.abs(to_rgb(image_msg(rgb, "nv12")).astype(int) - rgb).max() > 50


@pytest.mark.parametrize("encoding", ["rgb16", "bgra16", "mono16", "bayer_gbrg16"])
def test_big_endian_16_bit(encoding):
    rgb = scene()
    little, big = image_msg(rgb, encoding), image_msg(rgb, encoding, big_endian=True)
    assert bytes(little.data) != bytes(big.data)
    np.testing.assert_array_equal(to_rgb(little), to_rgb(big))


@pytest.mark.parametrize("encoding", ["mono8", "mono16"])
def test_mono_becomes_gray_rgb(encoding):
    out = to_rgb(image_msg(scene(), encoding, padding=3))
    assert out.shape == (24, 32, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_compressed_keeps_channel_order(fmt):
    out = to_rgb(compressed_msg(scene(), fmt)).astype(int)
    assert out[:, :16, 0].mean() > 180 and out[:, :16, 2].mean() < 70  # still red on the left
    assert out[:, 16:, 2].mean() > 160 and out[:, 16:, 0].mean() < 50  # still blue on the right


@pytest.mark.parametrize(
    "msg, message",
    [
        (
            Image(height=2, width=2, encoding="nv16", step=2, data=b"\0" * 8),
            "unsupported encoding 'nv16'",
        ),
        (
            Image(height=2, width=2, encoding="16UC1", step=4, data=b"\0" * 8),
            r"'16UC1' \(a depth image: image_topics",
        ),
        (
            Image(height=2, width=2, encoding="8UC3", step=6, data=b"\0" * 12),
            r"'8UC3' \(pixels without a channel order, as cv2_to_imgmsg writes without an "
            r"encoding: publish them as bgr8\)",
        ),
        (
            CompressedImage(format="16UC1; compressedDepth png", data=b"\0" * 12 + b"\x89PNG"),
            r"cannot decode compressed image \(format '16UC1; compressedDepth png', 16 bytes\) \(a "
            r"depth image: ",
        ),
        (
            Image(height=2, width=3, encoding="yuv422", step=6, data=b"\0" * 12),
            r"yuv422: its width must be even \(pixels share their colour\), not 3x2",
        ),
        (
            Image(height=3, width=4, encoding="nv21", step=4, data=b"\0" * 24),
            r"nv21: its width and height must be even .*, not 4x3",
        ),
        (
            Image(height=4, width=4, encoding="nv21", step=4, data=b"\0" * 16),
            "truncated image: 16 bytes, 4x4 nv21 .* 24",
        ),
        (
            Image(height=2, width=4, encoding="nv24", step=5, data=b"\0" * 29),
            "truncated image: 29 bytes, 4x2 nv24 .* 30",
        ),
        (
            # step as 3 bytes a pixel
            Image(height=2, width=4, encoding="nv24", step=12, data=b"\0" * 24),
            r"truncated image: 24 bytes, 4x2 nv24 with step 12 needs 72 \(step is its Y rows' "
            r"length; its U,V rows take "
            r"2 x step\)",
        ),
        (
            Image(height=2, width=3, encoding="nv12", step=3, data=b"\0" * 9),
            r"nv12: its width and height must be even",
        ),
        (Image(height=4, width=4, encoding="rgb8", step=12, data=b"\0" * 30), "truncated image"),
        (Image(height=4, width=4, encoding="rgb8", step=8, data=b"\0" * 48), "step 8 is shorter"),
        (Image(height=0, width=4, encoding="rgb8", step=12, data=b""), "empty image"),
        (
            CompressedImage(format="jpeg", data=b"\xff\xd8\xff\xe0 broken"),
            "cannot decode compressed image",
        ),
        (CompressedImage(format="jpeg", data=b""), "cannot decode compressed image"),
    ],
)
def test_bad_messages_raise_clear_errors(msg, message):
    with pytest.raises(ImageConversionError, match=message):
        to_rgb(msg)
