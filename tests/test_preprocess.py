"""Our torch-free preprocessing vs transformers' image processors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_vila.config import PreprocessSpec
from edge_vila.preprocess import expand_to_square, preprocess_image, sample_frame_indices


@pytest.fixture()
def rocket():
    skimage = pytest.importorskip("skimage")
    return Image.fromarray(skimage.data.rocket())  # 427x640, not square


def test_resize_matches_siglip_processor(rocket):
    from transformers import SiglipImageProcessor

    hf = SiglipImageProcessor(size={"height": 64, "width": 64}, resample=3)
    ref = hf(rocket, return_tensors="np")["pixel_values"][0]
    spec = PreprocessSpec(64, 64, [0.5] * 3, [0.5] * 3, mode="resize")
    assert np.abs(preprocess_image(rocket, spec) - ref).max() < 2e-2  # HF resizes in float, we in uint8
    assert np.abs(preprocess_image(rocket, spec) - ref).mean() < 2e-3


def test_pad_mode_is_vila_expand2square_then_processor(rocket):
    from transformers import CLIPImageProcessor

    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    hf = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}, image_mean=mean,
                            image_std=std)
    squared = expand_to_square(rocket, tuple(int(m * 255) for m in mean))
    assert squared.size == (640, 640) and squared.getpixel((0, 0)) == (122, 116, 104)
    ref = hf(squared, return_tensors="np")["pixel_values"][0]
    got = preprocess_image(rocket, PreprocessSpec(48, 48, mean, std, mode="pad"))
    assert got.shape == (3, 48, 48)
    assert np.abs(got - ref).mean() < 5e-3


def test_arrays_and_grayscale_accepted():
    spec = PreprocessSpec(16, 16, [0.5] * 3, [0.5] * 3)
    assert preprocess_image(np.zeros((10, 20), np.uint8), spec).shape == (3, 16, 16)
    assert preprocess_image(np.zeros((10, 20, 4), np.uint8), spec).shape == (3, 16, 16)


def test_frame_sampling_is_even():
    assert sample_frame_indices(100, 4) == [12, 37, 62, 87]
    assert sample_frame_indices(3, 8) == [0, 1, 2]


# ---- NVILA-Lite's dynamic tiling (VILA's dynamic_preprocess: 448-px tiles, 1..12) ---------
def _dyn(max_tiles: int = 12, min_tiles: int = 1) -> PreprocessSpec:
    return PreprocessSpec(height=448, width=448, mean=[0.5] * 3, std=[0.5] * 3, mode="dynamic",
                          min_tiles=min_tiles, max_tiles=max_tiles)


@pytest.mark.parametrize("size, grid, inputs", [
    # square: (1,1), (2,2), (3,3) all match 1.0 exactly; a later, larger grid wins a tie only when
    # the image has more than half its pixels: 512^2 = 262144 < 0.5*448^2*4 = 401408 -> (1,1), and
    # with one tile there is no thumbnail
    ((512, 512), (1, 1), 1),
    # 1024^2 = 1048576 > 401408 -> (2,2); > 0.5*448^2*9 = 903168 -> (3,3): 9 tiles + thumbnail
    ((1024, 1024), (3, 3), 10),
    # skimage's chelsea, 451x300: aspect 1.503; 3/2 = 1.5 is nearest (4/3 = 1.33, 5/3 = 1.67) -> 6 + 1
    ((451, 300), (3, 2), 7),
    # 2000x1000: 2/1 and 4/2 both match 2.0; 2e6 > 0.5*448^2*8 = 802816 -> (4,2); 6/3 has 18 > 12 tiles
    ((2000, 1000), (4, 2), 9),
    # 300x1000: aspect 0.3; 1/3 and 2/6 tie at 0.0333 (1/4 is 0.05 off); 3e5 < 0.5*448^2*12 -> (1,3)
    ((300, 1000), (1, 3), 4),
    # 1000x200: aspect 5, exactly 5/1 (10/1 is 5 off) -> 5 tiles + thumbnail
    ((1000, 200), (5, 1), 6),
])
def test_dynamic_tile_grid_and_count_follow_vilas_rule(size, grid, inputs):
    from edge_vila.preprocess import image_tiles, tile_grid

    spec = _dyn()
    assert tile_grid(*size, spec) == grid
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    px = image_tiles(img, spec)
    assert px.shape == (inputs, 3, 448, 448) and px.dtype == np.float32


def test_dynamic_max_tiles_caps_the_grid():
    from edge_vila.preprocess import tile_grid

    assert tile_grid(2000, 1000, _dyn(max_tiles=6)) == (2, 1)  # 4x2 no longer allowed; 2/1 exact
    assert tile_grid(1024, 1024, _dyn(max_tiles=6)) == (2, 2)
    assert tile_grid(512, 512, _dyn(min_tiles=4)) == (2, 2)  # 1 tile is below the minimum


def test_dynamic_tiles_are_row_major_crops_then_the_thumbnail():
    """2000x1000 -> a 4x2 grid: the image is resized (bicubic) to 1792x896 and cut row by
    row; tile k is column k % 4, row k // 4; the 9th input is the whole image at 448."""
    from edge_vila.preprocess import image_tiles

    img = np.zeros((1000, 2000, 3), np.uint8)
    img[:500, :500] = (255, 0, 0)      # top-left quarter of the top row: tile 0
    img[:500, 1500:] = (0, 255, 0)     # top-right: tile 3
    img[500:, :500] = (0, 0, 255)      # bottom-left: tile 4
    spec = _dyn()
    px = image_tiles(img, spec)
    mean = px.mean(axis=(2, 3))  # [9, 3] in normalised units (-1 black, +1 full)
    assert mean[0, 0] > 0.9 and mean[0, 1] < -0.9       # red
    assert mean[3, 1] > 0.9 and mean[3, 0] < -0.9       # green
    assert mean[4, 2] > 0.9 and mean[4, 0] < -0.9       # blue
    assert (mean[[1, 2, 5, 6, 7]] < -0.9).all()         # black
    resized = np.asarray(Image.fromarray(img).resize((448, 448), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(px[8], preprocess_image(Image.fromarray(resized), spec), atol=1e-6)
    whole = Image.fromarray(img).resize((1792, 896), Image.Resampling.BICUBIC)
    np.testing.assert_allclose(px[5], preprocess_image(whole.crop((448, 448, 896, 896)), spec), atol=1e-6)


def test_dynamic_mode_tiles_only_a_lone_image():
    """VILA tiles an image only when it is the message's only one; several are each resized."""
    from edge_vila.preprocess import message_tiles

    img = np.full((1000, 2000, 3), 128, np.uint8)
    assert [t.shape[0] for t in message_tiles([img], _dyn())] == [9]
    assert [t.shape[0] for t in message_tiles([img, img], _dyn())] == [1, 1]
