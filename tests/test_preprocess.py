import numpy as np
import pytest
import torch
from PIL import Image

from vfusion3d_lightning.data.preprocess import foreground, load_image, preprocess, recenter


def rgba_square(size=100, box=(10, 30, 40, 90), colour=(200, 30, 30)):
    """An opaque red rectangle rows box[0]:box[1], cols box[2]:box[3] on a transparent canvas."""
    image = np.zeros((size, size, 4), np.uint8)
    image[box[0]:box[1], box[2]:box[3]] = (*colour, 255)
    return image


def test_recenter_puts_the_object_in_the_middle_at_the_border_ratio():
    image = rgba_square()
    canvas = recenter(image[..., :3], image[..., 3], border_ratio=0.2)
    assert canvas.shape == (100, 100, 4)
    rows, cols = np.nonzero(canvas[..., 3] > 127)
    # the longer side (50 columns) fills 80% of the canvas; the object is centred
    assert cols.max() - cols.min() + 1 == 80 and abs((rows.min() + rows.max()) / 2 - 49.5) <= 1
    assert abs((cols.min() + cols.max()) / 2 - 49.5) <= 1
    assert tuple(canvas[50, 50, :3]) == (200, 30, 30)


def test_rgba_file_uses_its_alpha_and_comes_out_on_white(tmp_path):
    path = tmp_path / "object.png"
    Image.fromarray(rgba_square(), "RGBA").save(path)
    image = preprocess(path, size=64)
    assert image.shape == (3, 64, 64) and image.min() >= 0 and image.max() <= 1
    assert torch.allclose(image[:, 0, 0], torch.ones(3))  # background composited on white
    assert torch.allclose(image[:, 32, 32], torch.tensor([200, 30, 30]) / 255, atol=0.02)


def test_rgb_jpeg_on_white_with_the_white_background_mask(tmp_path):
    image = np.full((80, 120, 3), 255, np.uint8)
    image[20:60, 30:70] = (20, 120, 220)
    path = tmp_path / "photo.jpg"
    Image.fromarray(image).save(path, quality=95)
    out = preprocess(path, size=48, background="white")
    assert out.shape == (3, 48, 48)
    assert torch.allclose(out[:, 24, 24], torch.tensor([20, 120, 220]) / 255, atol=0.05)


def test_missing_rembg_or_inputs_give_clear_errors(tmp_path, monkeypatch):
    rgb = np.full((16, 16, 3), 128, np.uint8)
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    with pytest.raises((ModuleNotFoundError, FileNotFoundError), match="rembg|isnet-general-use"):
        foreground(rgb, "auto")
    with pytest.raises(ValueError, match="needs an RGBA image"):
        foreground(rgb, "alpha")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="mask is empty"):
        preprocess(np.zeros((32, 32, 4), np.uint8))


def test_threshold_masks_fill_small_holes_keep_large_ones_and_drop_specks():
    from vfusion3d_lightning.data.preprocess import foreground_masks, threshold_mask

    rgb = np.full((100, 100, 3), 255, np.uint8)
    rgb[20:80, 20:80] = (40, 90, 200)  # the object
    rgb[30:33, 30:33] = 250  # near-white texture inside it: filled
    rgb[45:65, 45:65] = 255  # a large hole through it (20x20 = 4% of the image): kept
    rgb[5, 5] = (0, 0, 0)  # a speck of noise in the background: dropped
    rgb[90:92, 90:92] = (0, 0, 0)
    mask = threshold_mask(rgb) > 127
    expected = np.zeros((100, 100), bool)
    expected[20:80, 20:80] = True
    expected[45:65, 45:65] = False
    np.testing.assert_array_equal(mask, expected)
    video = foreground_masks(np.stack([rgb, rgb]))
    assert video.shape == (2, 100, 100) and (video[1] == video[0]).all()
    with pytest.raises(ValueError, match="mask method must be one of"):
        foreground_masks(video[..., None].repeat(3, -1), "saliency")
