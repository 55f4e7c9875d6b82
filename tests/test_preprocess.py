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
