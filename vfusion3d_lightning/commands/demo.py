"""`vfusion3d-lightning demo`: an LRM with random weights renders one turntable frame."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from vfusion3d_lightning.cameras import canonical_source_camera, turntable_cameras
from vfusion3d_lightning.io import atomic_write, to_uint8_images
from vfusion3d_lightning.models.lrm import LRM, LRMConfig


def demo(preset: str = "tiny", out: Path = Path("demo.png"), size: int = 128, frames: int = 160,
         seed: int = 0) -> Path:
    """Build an LRM with random weights and render frame 0 of a turntable to a PNG.

    Args:
        preset: network size by name (`tiny`, `vfusion3d`: configs/lrm/network/).
        out: PNG to write.
        size: render resolution in pixels.
        frames: turntable length; frame 0 is rendered.
        seed: seeds the weights, the input and the renderer's jitter.
    """
    torch.manual_seed(seed)
    config = LRMConfig.from_name(preset)
    model = LRM(config).eval()
    image_size = model.encoder.vit.patch_embed.img_size[0]
    image = torch.rand(1, 3, image_size, image_size)
    with torch.no_grad():
        planes = model(image, canonical_source_camera(1))
        frame = model.render(planes, turntable_cameras(frames)[:1][None], size=size,
                             generator=torch.Generator().manual_seed(seed))
    picture = to_uint8_images(frame.rgb[0, 0])
    atomic_write(out, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LRM '{preset}' ({n_params:,} parameters, random weights): planes {tuple(planes.shape)}, "
          f"turntable frame 0 of {frames} at {size}x{size}, mean opacity {frame.opacity.mean().item():.3f} -> {out}")
    return Path(out)
