"""Tiny randomly initialised models saved in each library's own layout (`save_pretrained` folders), for tests and
the quickstart: nothing is downloaded, and each folder loads through the same `from_pretrained` path as the real
model it stands in for. Every builder is deterministic given its seed and idempotent: a folder that already holds
a complete build is returned as it is, and a build is written atomically (a killed build leaves no half folder
that would pass for a complete one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from vfusion3d_lightning.io import atomic_write_folder

# ---------------------------------------------------------------------------------------------- images and CLIP

# the file each layout's loader reads first, moved into place last: its presence marks a complete build
_PIPELINE_INDEX = "model_index.json"
_CLIP_CONFIG = "config.json"
_TEXT_LENGTH = 256  # tokens of the tiny text-to-image text encoder


def _build_once(folder: str | os.PathLike, marker: str, write: Callable[[Path], None]) -> Path:
    """`folder` if it holds `marker` (a complete build), else `write(tmp)` into it atomically, `marker` last."""
    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    return atomic_write_folder(folder, write, last=(marker,))


def build_tiny_text_to_image(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A diffusers `StableDiffusionPipeline` with random weights: a 2-level UNet on 16x16 latents, a 3-level VAE
    (64x64 images by default) and a 2-layer CLIP text encoder over a character-level tokenizer (256 characters),
    with a DDIM scheduler and no safety checker. A 64 px image takes about 10 ms a step on one CPU thread.

    Args:
        folder: where to save it (`DiffusionPipeline.from_pretrained(folder)` loads it).
        seed: seed of the random weights.
    """
    def write(tmp: Path) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from vfusion3d_lightning.models.video.architectures import _TINY_TEXT, char_tokenizer

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=_TINY_TEXT["hidden_size"],
            attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                            norm_num_groups=32, sample_size=64)
        # one token per character: room for a prompt and the object-centric suffix, untruncated
        text_encoder = CLIPTextModel(CLIPTextConfig(**dict(_TINY_TEXT, max_position_embeddings=_TEXT_LENGTH)))
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=char_tokenizer(_TEXT_LENGTH),
                                           unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipeline.save_pretrained(tmp, safe_serialization=True)

    return _build_once(folder, _PIPELINE_INDEX, write)


def build_tiny_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A transformers `CLIPModel` + `CLIPProcessor` with random weights (1-layer text and vision towers, 32 px
    images, a character-level tokenizer), as the CLIP scorer of `vfusion3d_lightning.evaluation` loads it.

    Args:
        folder: where to save it (`CLIPModel.from_pretrained(folder)` and `CLIPProcessor.from_pretrained(folder)`).
        seed: seed of the random weights.
    """
    def write(tmp: Path) -> None:
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

        from vfusion3d_lightning.models.video.architectures import char_tokenizer

        tokenizer = char_tokenizer()
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        config = CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                             pad_token_id=eos),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
            projection_dim=8)
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(tmp)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        CLIPProcessor(image_processor, tokenizer).save_pretrained(tmp)

    return _build_once(folder, _CLIP_CONFIG, write)
