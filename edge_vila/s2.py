"""NVILA's `dynamic_s2` multi-scale features, as numpy maths (no torch): the tiling, how
the vision tower's per-tile features become the projector's inputs and its outputs one
image's tokens, and the two-stage encode every runtime shares.

What VILA does (llava/mm_utils.py dynamic_s2_preprocess, llava_arch.py
merge_features_for_dynamic_s2 and encode_images, s2wrapper's chessboard helpers), for
scales s0 < s1 < ... < sL (NVILA-8B: 448, 896, 1344) and tiles of s0 pixels:

1. Tiles. For every scale but the last, the image is resized to k·s0 square (k = s/s0) and
   cut into k x k tiles; for the last, into a rows x cols grid picked by the dynamic rule
   (tile_grid) among grids of at least (sL/s0)^2 and at most max_tiles tiles. No thumbnail.
2. Per tile the ViT gives a g x g map of C channels (g = s0 / patch). Each scale's tiles are
   laid back together ("merged as a chessboard"): a (k·g)^2 map, and (rows·g) x (cols·g) for
   the last. Every map is resized by area averaging to the last one's size and the maps are
   concatenated along channels (C·(L+1): 3 x 1152 = 3456 for NVILA-8B).
3. That map is cut back into the rows x cols blocks of g x g (the projector's inputs,
   [rows·cols, g·g, 3C]); the projector folds each block into t x t tokens, and the
   blocks' token maps are merged again into one (rows·t) x (cols·t) map, read row by row:
   rows·cols·t² tokens for the image (NVILA-8B's mlp_downsample folds 2x2, t = 16: 256 per
   block, 2304-3072 per image), then the encoder's "\n".

An image that shares its message with others is not tiled (VILA's block size None): it is
resized whole to one s0 tile and its features are repeated across the scales' channels.

A dynamic_s2 bundle therefore has two graphs: `vision.onnx` (the ViT: pixels -> features
per tile) and `projector.onnx` (blocks of merged features -> tokens); the merge between
them runs here, on the host, for every backend (`encode`).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .config import PreprocessSpec


def s2_grid(width: int, height: int, spec: PreprocessSpec, scales: list[int]) -> tuple[int, int]:
    """(columns, rows) of the last scale's tiles: the dynamic rule between (sL/s0)^2 and max_tiles."""
    from .preprocess import tile_grid

    lo = (scales[-1] // scales[0]) ** 2
    return tile_grid(width, height, replace(spec, min_tiles=lo, max_tiles=max(spec.max_tiles, lo)))


def s2_tile_counts(width: int, height: int, spec: PreprocessSpec, scales: list[int]) -> tuple[int, tuple[int, int]]:
    """(vision inputs, (rows, cols) of the last scale) for one image."""
    cols, rows = s2_grid(width, height, spec, scales)
    fixed = sum((s // scales[0]) ** 2 for s in scales[:-1])
    return fixed + rows * cols, (rows, cols)


def merge_chessboard(x: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """[n·nh·nw, C, h, w] -> [n, C, nh·h, nw·w]: block i·nw + j (of each group) at row i, column j."""
    b = x.shape[0] // (nh * nw)
    rows = [np.concatenate([x[(i * nw + j) * b:(i * nw + j + 1) * b] for j in range(nw)], axis=-1)
            for i in range(nh)]
    return np.concatenate(rows, axis=-2)


def split_chessboard(x: np.ndarray, nh: int, nw: int) -> np.ndarray:
    """[n, C, H, W] -> [nh·nw·n, C, H/nh, W/nw], blocks row by row (the inverse of merge)."""
    h, w = x.shape[-2] // nh, x.shape[-1] // nw
    return np.concatenate([x[..., i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(nh) for j in range(nw)])


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging matrix of torch's interpolate(mode="area") (adaptive average
    pooling): output o averages inputs floor(o·in/out) .. ceil((o+1)·in/out) - 1."""
    m = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        a, b = (o * n_in) // n_out, -(-((o + 1) * n_in) // n_out)
        m[o, a:b] = 1.0 / (b - a)
    return m


def area_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[..., H, W] -> [..., h, w] by area averaging (separable: rows, then columns)."""
    mh, mw = _area_weights(x.shape[-2], size[0]), _area_weights(x.shape[-1], size[1])
    y = np.einsum("oh,...hw->...ow", mh, x.astype(np.float64))
    return np.einsum("pw,...ow->...op", mw, y).astype(x.dtype)


def _to_map(feats: np.ndarray) -> np.ndarray:
    """[n, g·g, C] -> [n, C, g, g]."""
    n, length, c = feats.shape
    g = math.isqrt(length)
    return feats.reshape(n, g, g, c).transpose(0, 3, 1, 2)


def projector_inputs(features: np.ndarray, scales: list[int], rows: int, cols: int) -> np.ndarray:
    """One image's ViT features [inputs, g·g, C] (tiles in s2_tiles' order) -> the projector's
    inputs [rows·cols, g·g, C·len(scales)] (step 2-3 above)."""
    maps, at = [], 0
    for s in scales[:-1]:
        k = s // scales[0]
        maps.append(merge_chessboard(_to_map(features[at:at + k * k]), k, k))
        at += k * k
    maps.append(merge_chessboard(_to_map(features[at:at + rows * cols]), rows, cols))
    if at + rows * cols != len(features):
        raise ValueError(f"{len(features)} vision inputs; the scales and the {rows}x{cols} grid need "
                         f"{at + rows * cols}")
    size = maps[-1].shape[-2:]
    merged = np.concatenate([area_resize(m, size) for m in maps], axis=1)  # [1, C·L, rows·g, cols·g]
    blocks = split_chessboard(merged, rows, cols)  # [rows·cols, C·L, g, g]
    n, c, g, _ = blocks.shape
    return blocks.transpose(0, 2, 3, 1).reshape(n, g * g, c)


def image_tokens(projected: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The projector's outputs for one image's blocks [rows·cols, t·t, D] -> [rows·cols·t², D],
    the blocks' token maps merged and read row by row (step 3)."""
    m = merge_chessboard(_to_map(projected), rows, cols)[0]  # [D, rows·t, cols·t]
    return m.reshape(m.shape[0], -1).T


def s2_tiles(img, spec: PreprocessSpec, scales: list[int]) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> (float32 [inputs, 3, s0, s0], (rows, cols)): each scale's tiles, row by row."""
    from .preprocess import _normalise, cut_grid, load_image

    im = load_image(img)
    s0 = scales[0]
    tiles = [t for s in scales[:-1] for t in cut_grid(im, s // s0, s // s0, s0)]
    cols, rows = s2_grid(im.width, im.height, spec, scales)
    tiles += cut_grid(im, cols, rows, s0)
    return _normalise(np.stack(tiles), spec), (rows, cols)


def message_inputs(images, spec: PreprocessSpec) -> list[tuple[np.ndarray, tuple[int, int] | None]]:
    """A message's images -> (pixels [n, 3, s0, s0], (rows, cols) of the last scale) each: a lone
    image is S2-tiled; several are each resized whole (grid None), as VILA's generate_content does."""
    from .preprocess import preprocess_images

    if len(images) == 1:
        return [s2_tiles(images[0], spec, spec.s2_scales)]
    return [(p[None], None) for p in preprocess_images(images, spec)]


def untiled_inputs(features: np.ndarray, n_scales: int) -> np.ndarray:
    """[n, g·g, C] -> [n, g·g, C·n_scales]: an untiled image's features repeated for every scale."""
    return np.tile(features, (1, 1, n_scales))


def encode(backend, pixels: np.ndarray, grid: tuple[int, int] | None, scales: list[int]) -> np.ndarray:
    """One image's tiles -> its tokens [rows·cols·t², D] through a backend's two stages
    (`encode_images`: the ViT, `project`: the projector), merged here in between."""
    feats = backend.encode_images(pixels)
    if grid is None:
        return backend.project(untiled_inputs(feats, len(scales))).reshape(-1, backend.hidden_size)
    rows, cols = grid
    return image_tokens(backend.project(projector_inputs(feats, scales, rows, cols)), rows, cols)


__all__ = ["message_inputs", "untiled_inputs", "encode", "s2_grid", "s2_tile_counts", "merge_chessboard", "split_chessboard", "area_resize",
           "projector_inputs", "image_tokens", "s2_tiles"]
