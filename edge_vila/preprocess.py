"""Image -> pixels, exactly as the checkpoint's image processor and VILA's
`image_aspect_ratio` say (resize; pad to a square with the mean colour first; or NVILA's
dynamic tiling).

Pure numpy + Pillow so the device runtime never needs torch for this.
"""
from __future__ import annotations

import contextlib
import contextvars
import io
import logging
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import PreprocessSpec
from .errors import ImageTooLargeError, InputError
from .options import DEFAULT_MAX_PIXELS

ImageLike = Union[str, Path, bytes, Image.Image, np.ndarray]
log = logging.getLogger(__name__)


# Images whose header claims more pixels than the limit are refused before decoding. The limit
# is a pipeline's (RuntimeOptions.max_pixels), set around its image loading by `pixel_limit`
# (a context variable: each thread and server request sees its own pipeline's).
_MAX_PIXELS: contextvars.ContextVar[int] = contextvars.ContextVar("max_pixels", default=DEFAULT_MAX_PIXELS)
# Pillow's own bomb check stays below ours so that ours, with its clear message, runs first
Image.MAX_IMAGE_PIXELS = None


@contextlib.contextmanager
def pixel_limit(n: int | None) -> Iterator[None]:
    if n is not None and n < 1:
        raise InputError(f"max_pixels must be >= 1, got {n}")
    token = _MAX_PIXELS.set(int(n) if n is not None else _MAX_PIXELS.get())
    try:
        yield
    finally:
        _MAX_PIXELS.reset(token)


def load_image(src: ImageLike, max_pixels: int | None = None) -> Image.Image:
    """Open a path / bytes / PIL image / HxWx3 uint8 RGB array as an RGB PIL image.

    Files and bytes: the pixel count is checked from the header before any decoding; the EXIF
    orientation is applied (what a camera meant, as a viewer shows it); an animated GIF/WebP/PNG
    gives its first frame (said in the log); 16-bit and float greyscale are scaled to 8 bits;
    CMYK, palette, alpha and greyscale become RGB (alpha dropped, as VILA's convert("RGB")).
    `max_pixels`: the limit (default: the enclosing `pixel_limit`'s, 64 MP outside one)."""
    if max_pixels is not None:
        with pixel_limit(max_pixels):
            return load_image(src)
    if isinstance(src, Image.Image):
        return _to_rgb(src, "image")
    if isinstance(src, np.ndarray):
        if src.ndim == 2:
            src = np.stack([src] * 3, axis=-1)
        if src.ndim != 3 or src.shape[2] not in (3, 4):
            raise InputError(f"image array has shape {src.shape}, expected HxWx3 (RGB) or HxWx4")
        if src.dtype != np.uint8:
            raise InputError(f"image array has dtype {src.dtype}, expected uint8")
        _check_pixels(src.shape[1], src.shape[0], "image array")
        return Image.fromarray(src[..., :3])
    if isinstance(src, (bytes, bytearray)):
        return _decode(io.BytesIO(src), "image bytes")
    path = Path(src)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an image file")
    if not path.is_file():
        raise InputError(f"{path}: image file not found")
    with open(path, "rb") as fh:
        return _decode(fh, str(path))


def _check_pixels(w: int, h: int, what: str) -> None:
    limit = _MAX_PIXELS.get()
    if w * h > limit:
        raise ImageTooLargeError(f"{what}: {w}x{h} is {w * h / 1e6:.0f} MP, above the limit of "
                                 f"{limit / 1e6:g} MP (max_pixels / --max-pixels)")
    if w < 1 or h < 1:
        raise InputError(f"{what}: {w}x{h} has no pixels")


def _decode(fh, what: str) -> Image.Image:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fh)
            _check_pixels(*img.size, what)  # from the header: nothing decoded yet
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                log.info("%s: animated (%d frames); using the first", what, frames)
                img.seek(0)
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        head = "image bytes are not a readable image" if what == "image bytes" else f"{what}: not an image"
        raise InputError(f"{head} (expected PNG, JPEG or another format Pillow reads; {e.__class__.__name__})") \
            from None
    return _to_rgb(img, what)


def _to_rgb(img: Image.Image, what: str) -> Image.Image:
    from PIL import ImageOps

    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        log.info("%s: unreadable EXIF orientation, ignored", what)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # 16-bit / 32-bit / float greyscale
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255) else 255.0
        if img.mode == "F":
            top = max(float(a.max(initial=0)), 1e-12) if a.max(initial=0) > 1 else 1.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _resized(img: ImageLike, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [H, W, 3] at the model's size (padded to square first in 'pad' mode)."""
    im = load_image(img)
    if spec.mode == "pad":
        im = expand_to_square(im, tuple(int(m * 255) for m in spec.mean))
    return np.asarray(im.resize((spec.width, spec.height), resample=Image.Resampling(spec.resample)))


def _normalise(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W]."""
    x = x.astype(np.float32) * np.float32(spec.rescale_factor)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess_image(img: ImageLike, spec: PreprocessSpec) -> np.ndarray:
    """One image -> float32 [3, H, W], normalised."""
    return _normalise(_resized(img, spec), spec)


def preprocess_images(images: Sequence[ImageLike], spec: PreprocessSpec) -> np.ndarray:
    """Several images (or video frames) -> float32 [N, 3, H, W]; normalised as one array
    (the same numbers as one by one, without the per-image numpy calls training paid for)."""
    if not images:
        return np.zeros((0, 3, spec.height, spec.width), np.float32)
    return _normalise(np.stack([_resized(i, spec) for i in images]), spec)


def tile_grid(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(columns, rows) of the tile grid VILA's dynamic_preprocess picks for an image.

    Candidates are every grid with min_tiles <= columns*rows <= max_tiles, visited by tile
    count; the one whose columns/rows is closest to the image's width/height wins. On a tie
    a later (larger) grid wins only if the image has more than half the pixels of the grid
    at tile size. Grids with the same tile count are visited in the order of VILA's Python
    set of (columns, rows) pairs, which we reproduce by building the same set.
    """
    lo, hi, size = spec.min_tiles, spec.max_tiles, spec.width
    grids = {(c, r) for n in range(lo, hi + 1) for c in range(1, n + 1) for r in range(1, n + 1) if lo <= c * r <= hi}
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in sorted(grids, key=lambda g: g[0] * g[1]):
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * size * size * c * r:
            best = (c, r)
    return best


def cut_grid(im: Image.Image, cols: int, rows: int, size: int) -> list[np.ndarray]:
    """The image resized to cols x rows tiles of `size` px and cut row by row (uint8 [size, size, 3]
    each). VILA resizes with PIL's default filter (bicubic); the processor's own resize of a tile
    already at its size is the identity."""
    grid = np.asarray(im.resize((cols * size, rows * size), resample=Image.Resampling.BICUBIC))
    return [grid[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]


def image_tiles(img: ImageLike, spec: PreprocessSpec, tiled: bool = True) -> np.ndarray:
    """One image -> float32 [n, 3, H, W]: n = 1 outside dynamic mode (or with tiled=False,
    VILA's treatment of an image that shares its message with others); else the grid's tiles
    row by row, then the thumbnail (the whole image at tile size) when there are several."""
    if not (spec.tiled and tiled):
        return preprocess_image(img, spec)[None]
    im = load_image(img)
    tiles = cut_grid(im, *tile_grid(im.width, im.height, spec), spec.width)
    if len(tiles) > 1:
        tiles.append(np.asarray(im.resize((spec.width, spec.width), resample=Image.Resampling.BICUBIC)))
    return _normalise(np.stack(tiles), spec)


def tiles_message(n_images: int, spec: PreprocessSpec | None) -> bool:
    """Whether a message's images are tiled: VILA tiles an image only when it is the message's
    only one (several images are each resized whole)."""
    return spec is not None and spec.tiled and n_images == 1


def message_tiles(images: Sequence[ImageLike], spec: PreprocessSpec) -> list[np.ndarray]:
    """The images of one message, each as [n_i, 3, H, W] (see tiles_message)."""
    if tiles_message(len(images), spec):
        return [image_tiles(images[0], spec)]
    return list(preprocess_images(images, spec)[:, None])  # one input each, normalised as one array


def sample_frame_indices(num_frames: int, want: int) -> list[int]:
    """Evenly spaced frame indices (VILA samples a fixed number of frames per video)."""
    if num_frames <= 0 or want <= 0:
        return []
    if want >= num_frames:
        return list(range(num_frames))
    return [int((i + 0.5) * num_frames / want) for i in range(want)]
