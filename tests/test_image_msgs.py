"""Camera messages to RGB: every supported encoding, row padding, byte order, bad data."""
from __future__ import annotations

import numpy as np
import pytest
from ros_harness import compressed_msg, image_msg
from sensor_msgs.msg import CompressedImage, Image

from internvl_ros.image_msgs import ENCODINGS, ImageConversionError, to_rgb


def scene(h=24, w=32):
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (220, 20, 30)  # red left half
    rgb[:, w // 2:] = (10, 40, 200)   # blue right half
    return rgb


@pytest.mark.parametrize("encoding", [e for e in ENCODINGS if not e.startswith("mono")])
@pytest.mark.parametrize("padding", [0, 5])
def test_colour_encodings_round_trip(encoding, padding):
    rgb = scene()
    np.testing.assert_array_equal(to_rgb(image_msg(rgb, encoding, padding)), rgb)


@pytest.mark.parametrize("encoding", ["rgb16", "bgra16", "mono16"])
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


@pytest.mark.parametrize("msg, message", [
    (Image(height=2, width=2, encoding="yuv422", step=4, data=b"\0" * 8), "unsupported encoding 'yuv422'"),
    (Image(height=4, width=4, encoding="rgb8", step=12, data=b"\0" * 30), "truncated image"),
    (Image(height=4, width=4, encoding="rgb8", step=8, data=b"\0" * 48), "step 8 is shorter"),
    (Image(height=0, width=4, encoding="rgb8", step=12, data=b""), "empty image"),
    (CompressedImage(format="jpeg", data=b"\xff\xd8\xff\xe0 broken"), "cannot decode compressed image"),
    (CompressedImage(format="jpeg", data=b""), "cannot decode compressed image"),
])
def test_bad_messages_raise_clear_errors(msg, message):
    with pytest.raises(ImageConversionError, match=message):
        to_rgb(msg)
