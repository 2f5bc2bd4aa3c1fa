"""Input preprocessing as released: foreground mask, recentre by the mask, composite on white, resize."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from vfusion3d_lightning.data.schema import has_alpha, image_to_array
from vfusion3d_lightning.hub import missing_weights_error
from vfusion3d_lightning.io import require_extra

BACKGROUNDS = ("auto", "rembg", "alpha", "white")
REMBG_MODEL = "isnet-general-use"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


MAX_INPUT_PIXELS = 64 * 2**20  # width x height of an input image; larger ones are refused before decoding
MIN_INPUT_SIDE = 16  # pixels; a smaller image cannot show an object to reconstruct


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 (H, W, 4) when it has transparency, else (H, W, 3).

    Every mode is read at its range (16-bit grey scaled to 8 bits, palette or grey transparency kept as
    alpha, CMYK converted: schema.image_to_array); the size in the header is checked against
    MAX_INPUT_PIXELS before decoding, so a small file declaring a huge image is refused, not decoded.
    """
    try:
        with warnings.catch_warnings():  # PIL warns above 89 Mpx; MAX_INPUT_PIXELS, lower, is checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"input image {path} does not exist") from None
    except Image.DecompressionBombError as err:  # PIL refuses above 179 Mpx while reading the header
        raise ValueError(_too_large(path, f"more than {2 * Image.MAX_IMAGE_PIXELS} pixels")) from err
    except (UnidentifiedImageError, OSError) as err:
        raise _unreadable(path, err) from err
    with image:
        width, height = image.size
        if width * height > MAX_INPUT_PIXELS:
            raise ValueError(_too_large(path, f"{width}x{height} pixels"))
        try:
            image.load()
            return image_to_array(image, "RGBA" if has_alpha(image) else "RGB")
        except (OSError, ValueError) as err:  # truncated data; values no 8-bit image holds (schema.image_to_array)
            raise _unreadable(path, err) from err


def _unreadable(path, err: Exception) -> ValueError:
    return ValueError(f"cannot read {path} as an image ({err}); replace it by a PNG, JPEG, WebP or BMP file, "
                      "or move it out of the inputs")


def _too_large(path, size: str) -> str:
    return (f"input image {path} is {size}, over the limit of {MAX_INPUT_PIXELS} pixels "
            f"(preprocess.MAX_INPUT_PIXELS, {MAX_INPUT_PIXELS / 2**20:g} Mpx); downscale it (the model sees "
            "512x512 pixels) or move it out of the inputs")


def rembg_model_path() -> Path:
    return Path(os.environ.get("U2NET_HOME", Path.home() / ".u2net")) / f"{REMBG_MODEL}.onnx"


def rembg_mask(rgb: np.ndarray) -> np.ndarray:
    """Foreground mask (H, W) uint8 from rembg's isnet-general-use model, which must be present locally."""
    session = _rembg_session()  # first: it explains a missing rembg or model
    from rembg import remove

    return np.asarray(remove(Image.fromarray(rgb), session=session, only_mask=True))


@functools.cache
def _rembg_session():  # loading the ONNX model takes seconds; videos ask for a mask per frame
    rembg = require_extra("rembg", "rembg", "background removal",
                          "or give an RGBA image, or use background 'white' (mask method 'threshold') for objects "
                          "on a plain white background")
    model = rembg_model_path()
    if not model.is_file():
        raise missing_weights_error(f"rembg's {REMBG_MODEL} model", f"{REMBG_MODEL}.onnx from the rembg releases "
                                    "(https://github.com/danielgatis/rembg/releases)", model,
                                    "or set $U2NET_HOME to its folder, or use background 'alpha' / 'white'")
    return rembg.new_session(REMBG_MODEL)


def white_background_mask(rgb: np.ndarray, tolerance: int = 12) -> np.ndarray:
    """Foreground of an object on a plain white background: pixels darker than white by more than tolerance."""
    return np.where((255 - rgb.astype(np.int16)).max(axis=-1) > tolerance, 255, 0).astype(np.uint8)


MASK_METHODS = ("threshold", "rembg")


def threshold_mask(rgb: np.ndarray, tolerance: int = 12, max_hole: float = 0.01,
                   min_component: float = 0.02) -> np.ndarray:
    """Foreground (H, W) uint8 of an object rendered or generated on white, without a saliency model.

    The white threshold, then clean-up by connected components (no opening, which would erase thin parts at
    low resolution): enclosed background smaller than `max_hole` of the image (near-white texture inside the
    object) is filled, larger enclosed background (a handle's or torus's hole) kept; parts smaller than
    `min_component` of the largest (specks of noise) are dropped.
    """
    from scipy import ndimage

    mask = white_background_mask(rgb, tolerance) > 0
    holes, count = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if count:
        sizes = np.bincount(holes.ravel())[1:]
        mask |= np.isin(holes, 1 + np.flatnonzero(sizes < max_hole * mask.size))
    parts, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(parts.ravel())[1:]
        mask = np.isin(parts, 1 + np.flatnonzero(sizes >= min_component * sizes.max()))
    return np.where(mask, 255, 0).astype(np.uint8)


def foreground_masks(frames: np.ndarray, method: str = "threshold", tolerance: int = 12) -> np.ndarray:
    """Masks (N, H, W) uint8 of video frames (N, H, W, 3): `threshold` (objects on white, offline) or `rembg`
    (a saliency model, for any background; its weights must be local)."""
    if method not in MASK_METHODS:
        raise ValueError(f"mask method must be one of {MASK_METHODS}, got {method!r}")
    if method == "threshold":
        return np.stack([threshold_mask(frame, tolerance) for frame in frames])
    return np.stack([rembg_mask(np.ascontiguousarray(frame)) for frame in frames])


def foreground(image: np.ndarray, background: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """RGB (H, W, 3) and mask (H, W) uint8. `auto`: the alpha channel if there is one, else rembg."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    rgb = np.ascontiguousarray(image[..., :3])
    if background in ("auto", "alpha") and image.shape[-1] == 4:
        return rgb, image[..., 3]
    if background == "alpha":
        raise ValueError("background 'alpha' needs an RGBA image; this one has no alpha channel")
    if background == "white":
        return rgb, white_background_mask(rgb)
    return rgb, rembg_mask(rgb)


def recenter(rgb: np.ndarray, mask: np.ndarray, border_ratio: float = 0.2) -> np.ndarray:
    """Crop the object by its mask and centre it on a square RGBA canvas of side max(H, W), its longer side
    filling (1 - border_ratio) of the canvas (as kiui's recenter, which the release uses)."""
    if not 0 <= border_ratio < 1:
        raise ValueError(f"border_ratio must be in [0, 1), got {border_ratio}")
    rows, cols = np.nonzero(mask > 127)
    if rows.size == 0:
        raise ValueError("the foreground mask is empty: no object found in the image")
    size = max(mask.shape)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    height, width = bottom - top, right - left
    if height < 1 or width < 1:  # the crop (the last row and column left out, as released) would be empty
        raise ValueError(f"the object found is a line of pixels (rows {top}-{bottom}, columns {left}-{right}), an "
                         "empty crop that would give a blank input; give an image where the object spans more "
                         "pixels, or check its alpha channel or background")
    scale = int(size * (1 - border_ratio)) / max(height, width, 1)
    new_h, new_w = max(1, int(height * scale)), max(1, int(width * scale))
    crop = np.concatenate([rgb, mask[..., None]], axis=-1)[top:bottom, left:right]
    resized = np.asarray(Image.fromarray(crop, "RGBA").resize((new_w, new_h), Image.Resampling.BOX))
    canvas = np.zeros((size, size, 4), dtype=np.uint8)
    y0, x0 = (size - new_h) // 2, (size - new_w) // 2
    canvas[y0:y0 + new_h, x0:x0 + new_w] = resized
    return canvas


def preprocess(image: np.ndarray | str | os.PathLike, size: int = 512, border_ratio: float | None = 0.2,
               background: str = "auto") -> torch.Tensor:
    """An input image -> the LRM's input (3, size, size) in [0, 1]: foreground, recentred, on white, resized
    bicubically (align_corners=True, clamped) as the release does. `border_ratio` None keeps the image's own
    framing (a square image of a rendered object)."""
    array = load_image(image) if not isinstance(image, np.ndarray) else image
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (H, W, 3 or 4), got {array.shape} {array.dtype}")
    if min(array.shape[:2]) < MIN_INPUT_SIDE:
        name = "the input image" if isinstance(image, np.ndarray) else f"input image {image}"
        raise ValueError(f"{name} is {array.shape[1]}x{array.shape[0]} pixels, too small to show an object (at least "
                         f"{MIN_INPUT_SIDE}x{MIN_INPUT_SIDE}, preprocess.MIN_INPUT_SIDE); give a larger image")
    rgb, mask = foreground(array, background)
    if border_ratio is None:
        if rgb.shape[0] != rgb.shape[1]:
            raise ValueError(f"keeping the framing needs a square image, got {rgb.shape[1]}x{rgb.shape[0]}; "
                             "give a border ratio to recentre it")
        rgba = np.concatenate([rgb, mask[..., None]], axis=-1)
    else:
        rgba = recenter(rgb, mask, border_ratio=border_ratio)
    tensor = torch.from_numpy(rgba.copy()).permute(2, 0, 1).float() / 255
    rgb = tensor[:3] * tensor[3:] + (1 - tensor[3:])
    rgb = F.interpolate(rgb[None], size=(size, size), mode="bicubic", align_corners=True)[0]
    return rgb.clamp(0, 1)
