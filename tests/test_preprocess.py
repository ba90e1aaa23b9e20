"""Preprocessing: channel order, InternVL tiling geometry, normalisation, video frame sampling."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from images import numbered_frames, write_video

from internvl_engine import ImageError, VideoError, load_image, load_video_frames
from internvl_engine.preprocess import as_rgb, closest_grid, normalize, segment_centre_indices, tiles


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_load_image_is_rgb(tmp_path, suffix):
    bgr = np.zeros((32, 48, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    path = tmp_path / f"red{suffix}"
    cv2.imwrite(str(path), bgr)
    rgb = load_image(path)
    assert rgb.shape == (32, 48, 3)
    assert rgb[..., 0].min() > 240 and rgb[..., 1:].max() < 15


def test_as_rgb_accepts_gray_and_rgba():
    assert as_rgb(np.full((4, 5), 7, np.uint8)).shape == (4, 5, 3)
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    assert as_rgb(rgba)[0, 0].tolist() == [200, 0, 0]
    with pytest.raises(ImageError):
        as_rgb(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(ImageError):
        as_rgb(np.zeros((4, 5, 3), np.float32))


@pytest.mark.parametrize("size, max_tiles, grid", [
    ((448, 448), 12, (1, 1)),
    ((1000, 500), 12, (2, 1)),
    ((3840, 2160), 12, (4, 2)),  # 2:1 ties with 4:2; the large area picks the finer grid
    ((500, 1000), 6, (1, 2)),
    ((3840, 2160), 1, (1, 1)),
])
def test_closest_grid_follows_internvl(size, max_tiles, grid):
    assert closest_grid(*size, image_size=448, min_num=1, max_num=max_tiles) == grid


def test_tiles_add_a_thumbnail_only_when_split():
    image = np.zeros((2160, 3840, 3), np.uint8)
    assert len(tiles(image, 448, max_tiles=12)) == 8 + 1
    assert len(tiles(image, 448, max_tiles=12, use_thumbnail=False)) == 8
    one = tiles(image, 448, max_tiles=1)
    assert len(one) == 1 and one[0].shape == (448, 448, 3)


def test_tile_order_is_row_major():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 100:] = 255  # right half white
    left, right, _thumb = tiles(image, 56, max_tiles=2)
    assert left.mean() < 5 and right.mean() > 250


def test_normalize_uses_imagenet_statistics():
    x = normalize([np.full((2, 2, 3), 255, np.uint8)])
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    expected = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[0, :, 0, 0], expected, rtol=1e-5)


def test_segment_centres_match_internvl_get_index():
    assert segment_centre_indices(100, 8) == [6, 18, 31, 43, 56, 68, 80, 93]
    assert segment_centre_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert segment_centre_indices(0, 8) == []


def test_video_frames_are_sampled_in_order(tmp_path):
    frames = numbered_frames(40)
    sampled = load_video_frames(write_video(tmp_path / "clip.avi", frames), num_segments=8)
    expected = [frames[i].mean() for i in segment_centre_indices(40, 8)]
    assert len(sampled) == 8
    np.testing.assert_allclose([f.mean() for f in sampled], expected, atol=3)


def test_unreadable_inputs_raise_specific_errors(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(junk)
    with pytest.raises(ImageError, match="no such image"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(VideoError):
        load_video_frames(junk)
    empty = tmp_path / "empty.avi"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48)).release()
    with pytest.raises(VideoError):
        load_video_frames(empty)
