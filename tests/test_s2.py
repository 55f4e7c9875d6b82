"""NVILA's dynamic_s2 maths (edge_vila/s2.py) against examples worked by hand.

These pin the tiling, the multi-scale feature merge and the token order that NVILA-8B's
runtime path (edge_vila.s2.encode, used by every backend) relies on, as VILA computes them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_vila.config import PreprocessSpec
from edge_vila.s2 import (area_resize, image_tokens, merge_chessboard, projector_inputs, s2_tile_counts, s2_tiles,
                          split_chessboard)

NVILA8B = PreprocessSpec(height=448, width=448, mean=[0.5] * 3, std=[0.5] * 3, mode="dynamic_s2", max_tiles=12)
SCALES = [448, 896, 1344]


def test_area_resize_by_hand_and_as_torch_computes_it():
    # 2 -> 3: output o averages inputs floor(2o/3) .. ceil(2(o+1)/3)-1: [a], [a, b], [b]
    np.testing.assert_allclose(area_resize(np.array([[1.0, 3.0]]), (1, 3)), [[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(area_resize(np.array([[1.0, 2.0, 3.0, 4.0]]), (1, 2)), [[1.5, 3.5]])
    np.testing.assert_allclose(area_resize(np.array([[5.0]]), (3, 3)), np.full((3, 3), 5.0))
    x = np.random.default_rng(0).normal(size=(1, 2, 64, 32)).astype(np.float32)
    for size in [(96, 96), (96, 128), (32, 64)]:
        ref = F.interpolate(torch.from_numpy(x), size=size, mode="area").numpy()
        np.testing.assert_allclose(area_resize(x, size), ref, atol=1e-5)


def test_chessboard_merge_and_split_by_hand():
    blocks = np.arange(4.0).reshape(4, 1, 1, 1)  # four 1x1 blocks, values 0..3
    assert merge_chessboard(blocks, 2, 2)[0, 0].tolist() == [[0, 1], [2, 3]]
    assert merge_chessboard(blocks, 1, 4)[0, 0].tolist() == [[0, 1, 2, 3]]
    assert merge_chessboard(blocks, 2, 2).shape == (1, 1, 2, 2)
    x = np.random.default_rng(1).normal(size=(6, 3, 2, 2))
    np.testing.assert_array_equal(split_chessboard(merge_chessboard(x, 2, 3), 2, 3), x)


def test_multiscale_merge_by_hand():
    """Scales 1, 2, 3 tiles wide, one patch per tile (g = 1), one channel: scale 1 is a
    single value a; scale 2 four tiles b0..b3 laid 2x2; the last a 3x3 grid c0..c8. Each map
    is area-resized to 3x3: a everywhere; b's 2x2 -> rows/columns (0 | 0,1 | 1): the centre is
    (b0+b1+b2+b3)/4, the top middle (b0+b1)/2. Block (i, j) of the projector's input is
    [a, B(i, j), c(3i + j)] (channels in scale order)."""
    a, b, c = 1.0, [10.0, 20.0, 30.0, 40.0], [100.0 + k for k in range(9)]
    feats = np.array([a] + b + c).reshape(14, 1, 1)  # [inputs, g*g, C]
    got = projector_inputs(feats, [1, 2, 3], rows=3, cols=3)
    assert got.shape == (9, 1, 3)
    B = [[10, 15, 20], [20, 25, 30], [30, 35, 40]]
    for i in range(3):
        for j in range(3):
            assert got[3 * i + j, 0].tolist() == [a, B[i][j], c[3 * i + j]]


def test_token_map_is_read_row_by_row_across_blocks():
    """2x2 blocks of 2x2 tokens (t = 2): the merged 4x4 map's first row is block 0's first
    row then block 1's, its third row block 2's first row then block 3's."""
    proj = np.array([[[10 * blk + k] for k in range(4)] for blk in range(4)], np.float64)  # [4, 4, 1]
    tok = image_tokens(proj, 2, 2)[:, 0].tolist()
    assert tok == [0, 1, 10, 11, 2, 3, 12, 13, 20, 21, 30, 31, 22, 23, 32, 33]


@pytest.mark.parametrize("size, grid, inputs", [
    # square: among grids of 9..12 tiles only 3x3 matches 1.0 -> 1 + 4 + 9 inputs, 9 x 256 tokens
    ((448, 448), (3, 3), 14),
    # 2:1: 4x2 has too few tiles (8 < 9); 5x2 = 2.5 is nearest (6x2 = 3, 4x3 = 1.33) -> 1 + 4 + 10
    ((2000, 1000), (2, 5), 15),
    # 5:1: 6x2 = 3 is nearest (5x2 = 2.5, 9x1 = 9) -> 1 + 4 + 12
    ((1000, 200), (2, 6), 17),
])
def test_s2_tiles_and_counts(size, grid, inputs):
    n, (rows, cols) = s2_tile_counts(*size, NVILA8B, SCALES)
    assert (rows, cols) == grid and n == inputs
    img = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    px, rc = s2_tiles(img, NVILA8B, SCALES)
    assert px.shape == (inputs, 3, 448, 448) and rc == grid
    # the ViT gives 32x32 patches per tile; the 3456-channel blocks fold 2x2 (mlp_downsample) to 256 tokens
    feats = np.zeros((inputs, 1024, 1152), np.float32)
    assert projector_inputs(feats, SCALES, rows, cols).shape == (rows * cols, 1024, 3456)
    assert image_tokens(np.zeros((rows * cols, 256, 8)), rows, cols).shape == (rows * cols * 256, 8)


def _vila_s2_merge(feats: torch.Tensor, scales: list[int], rows: int, cols: int) -> torch.Tensor:
    """VILA's sequence written out in torch: [n, g·g, C] tiles -> [rows·cols, g·g, C·scales]
    (merge each scale's tiles, area-resize to the last, concatenate channels, split blocks)."""
    g = int(feats.shape[1] ** 0.5)
    maps = feats.reshape(len(feats), g, g, -1).permute(0, 3, 1, 2)  # [n, C, g, g]

    def merge(x, nh, nw):
        return torch.cat([torch.cat([x[i * nw + j:i * nw + j + 1] for j in range(nw)], dim=-1)
                          for i in range(nh)], dim=-2)

    per_scale, at = [], 0
    for s in scales[:-1]:
        k = s // scales[0]
        per_scale.append(merge(maps[at:at + k * k], k, k))
        at += k * k
    per_scale.append(merge(maps[at:], rows, cols))
    size = per_scale[-1].shape[-2:]
    x = torch.cat([F.interpolate(m, size=size, mode="area") for m in per_scale], dim=1)
    h, w = size[0] // rows, size[1] // cols
    blocks = torch.cat([x[..., i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(rows) for j in range(cols)])
    return blocks.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("rows, cols", [(3, 3), (2, 5), (4, 3)])
def test_projector_inputs_match_vilas_torch_sequence(rows, cols):
    """Full NVILA-8B shapes (1 + 4 + rows·cols tiles of 32x32 patches), random features: the
    numpy merge equals VILA's torch sequence (F.interpolate area) to float32 rounding."""
    feats = torch.randn(5 + rows * cols, 1024, 16)
    got = projector_inputs(feats.numpy(), SCALES, rows, cols)
    np.testing.assert_allclose(got, _vila_s2_merge(feats, SCALES, rows, cols).numpy(), atol=1e-5)
