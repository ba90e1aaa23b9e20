"""Preprocessing: channel order, InternVL tiling geometry, normalisation, video frame sampling."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from images import numbered_frames, write_video
from PIL import Image

from internvl_engine import ImageError, VideoError, load_image, load_video_frames
from internvl_engine.preprocess import (
    as_rgb,
    closest_grid,
    iter_video_frames,
    normalize,
    segment_centre_indices,
    tiles,
)


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
    with pytest.raises(
        ImageError, match="images are pixel arrays, not file names: read 'door.jpg' with load_image"
    ):
        as_rgb("door.jpg")  # was "images must be uint8, got <U8"


@pytest.mark.parametrize(
    "size, max_tiles, grid",
    [
        ((448, 448), 12, (1, 1)),
        ((1000, 500), 12, (2, 1)),
        ((3840, 2160), 12, (4, 2)),  # 2:1 ties with 4:2; the large area picks the finer grid
        ((500, 1000), 6, (1, 2)),
        ((3840, 2160), 1, (1, 1)),
    ],
)
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


def test_video_frames_one_at_a_time(tmp_path):
    frames = numbered_frames(12)
    read = list(iter_video_frames(write_video(tmp_path / "clip.avi", frames)))
    assert len(read) == 12 and all(f.shape == frames[0].shape and f.dtype == np.uint8 for f in read)
    np.testing.assert_allclose([f.mean() for f in read], [f.mean() for f in frames], atol=3)


def test_unreadable_inputs_raise_specific_errors(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(junk)
    with pytest.raises(ImageError, match="no such image"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="a directory, not an image file"):
        load_image(tmp_path)
    empty = tmp_path / "empty.avi"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48)).release()
    for read in (load_video_frames, lambda path: list(iter_video_frames(path))):
        with pytest.raises(VideoError, match="no such video file"):
            read(tmp_path / "missing.mp4")
        for unreadable in (junk, empty):  # which of the two OpenCV says depends on its build
            with pytest.raises(VideoError, match="cannot open video|video has no frames"):
                read(unreadable)


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A textured, photo-like picture (gradients, edges, fine noise), JPEG-compressed as a
    camera's."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [127 + 100 * np.sin(x / (7 + c * 5) + y / (11 + c * 3)) for c in range(3)], axis=-1
    )
    image = np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    for _ in range(6):
        cv2.circle(
            image,
            tuple(int(v) for v in rng.integers(0, [width, height])),
            int(rng.integers(5, 80)),
            tuple(int(v) for v in rng.integers(0, 256, 3)),
            -1,
        )
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def to_tensor_normalize(crop: Image.Image) -> np.ndarray:
    """torchvision's ToTensor then Normalize, elementwise in float32 as torch computes them (checked
    against torch below): divide by 255, subtract the mean, divide by the std."""
    x = np.asarray(crop).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return (x - np.float32(IMAGENET_MEAN).reshape(3, 1, 1)) / np.float32(IMAGENET_STD).reshape(
        3, 1, 1
    )


def internvl_pixel_values(image: np.ndarray, input_size: int, max_num: int) -> np.ndarray:
    """InternVL2.5's own pipeline, step by step as its model card's load_image does it: PIL image,
    dynamic_preprocess (closest grid among i x j <= max_num, bicubic resize, row-major crops,
    thumbnail when split), then ToTensor and Normalize."""
    picture = Image.fromarray(image).convert("RGB")
    width, height = picture.size
    grids = sorted(
        {
            (i, j)
            for n in range(1, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if 1 <= i * j <= max_num
        },
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * input_size * input_size * cols * rows:
            best = (cols, rows)
    cols, rows = best
    # Pillow's default filter: bicubic
    resized = picture.resize((input_size * cols, input_size * rows))
    crops = [
        resized.crop((c * input_size, r * input_size, (c + 1) * input_size, (r + 1) * input_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if len(crops) > 1:
        crops.append(picture.resize((input_size, input_size)))
    return np.stack([to_tensor_normalize(c) for c in crops])


def test_the_reference_arithmetic_is_torchvisions():
    torch = pytest.importorskip("torch")
    crop = Image.fromarray(photo(64, 48, seed=3))
    tensor = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float().div(255)
    tensor = tensor.sub_(torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).div_(
        torch.tensor(IMAGENET_STD).view(3, 1, 1)
    )
    np.testing.assert_array_equal(to_tensor_normalize(crop), tensor.numpy())


@pytest.mark.parametrize(
    "width, height", [(1920, 1080), (640, 480), (480, 640), (1000, 300), (448, 448), (97, 33)]
)
@pytest.mark.parametrize("max_tiles", [1, 6, 12])
def test_pixel_values_equal_internvl_preprocessing(width, height, max_tiles):
    image = photo(width, height, seed=width + height)
    ours = normalize(tiles(image, 448, max_tiles))
    theirs = internvl_pixel_values(image, 448, max_tiles)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-5


def test_opencv_bicubic_would_differ():
    """What the test above guards against: OpenCV's bicubic does not smooth when it shrinks, so a
    downscaled photo reaches the model as another picture."""
    image = photo(1920, 1080, seed=1)
    opencv = normalize([cv2.resize(image, (448, 448), interpolation=cv2.INTER_CUBIC)])
    # 0.19 standard deviations here
    assert np.abs(opencv - normalize(tiles(image, 448, 1))).mean() > 0.1


def test_load_image_reads_as_internvl_does(tmp_path):
    image = photo(320, 240, seed=7)
    path = tmp_path / "photo.jpg"
    Image.fromarray(image).save(path, quality=80)
    np.testing.assert_array_equal(load_image(path), np.asarray(Image.open(path).convert("RGB")))
    Image.fromarray(image).convert("L").save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png").shape == (240, 320, 3)
