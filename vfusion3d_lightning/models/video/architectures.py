"""Video model architectures that build with random weights: tiny ones for tests and the CPU config, a small
pixel-space one for from-scratch GPU runs, and the real sizes of the public backbones for benchmarks.

Pretrained models load from diffusers folders instead (`VideoDiffusionModel.from_pretrained`).
"""

from __future__ import annotations

from typing import Any

# Schedulers of the public checkpoints (their scheduler/scheduler_config.json).
SVD_SCHEDULER = ("EulerDiscreteScheduler", dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
    timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True))
I2VGEN_SCHEDULER = ("DDIMScheduler", dict(
    beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000, prediction_type="v_prediction",
    rescale_betas_zero_snr=True, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=True, steps_offset=1))

_CLIP_H_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               layers_per_block=2, latent_channels=4, scaling_factor=0.18215)
_TINY_VAE = dict(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3, layers_per_block=1,
                 latent_channels=4, scaling_factor=0.18215)
_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                    patch_size=8, projection_dim=32)
# 514 ids: the character-level tokenizer of `char_tokenizer` (random-weight text encoders only)
_TINY_TEXT = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, projection_dim=32, bos_token_id=512, eos_token_id=513, pad_token_id=513)

# name -> component -> (class name, constructor/config kwargs); a missing "vae" means pixel-space diffusion.
ARCHITECTURES: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "tiny-svd": {
        "unet": ("UNetSpatioTemporalConditionModel", dict(
            sample_size=8, in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, num_attention_heads=(2, 4),
            projection_class_embeddings_input_dim=3 * 8, addition_time_embed_dim=8, num_frames=16)),
        "vae": ("AutoencoderKLTemporalDecoder", _TINY_VAE),
        "image_encoder": ("CLIPVisionModelWithProjection", _TINY_VISION),
        "scheduler": SVD_SCHEDULER,
    },
    "tiny-i2vgen-xl": {
        "unet": ("I2VGenXLUNet", dict(
            sample_size=8, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), block_out_channels=(32, 64), layers_per_block=1,
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32)),
        "vae": ("AutoencoderKL", dict(_TINY_VAE, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32)),
        "image_encoder": ("CLIPVisionModelWithProjection", _TINY_VISION),
        "text_encoder": ("CLIPTextModel", _TINY_TEXT),
        "scheduler": I2VGEN_SCHEDULER,
    },
    # from-scratch runs on procedural orbits: SVD-style conditioning on 64x64 pixels, no VAE
    "small-svd-pixels": {
        "unet": ("UNetSpatioTemporalConditionModel", dict(
            sample_size=64, in_channels=6, out_channels=3,
            # no attention at full resolution: 4096-token attention per frame costs most and adds little
            down_block_types=("DownBlockSpatioTemporal",) + ("CrossAttnDownBlockSpatioTemporal",) * 2,
            up_block_types=("CrossAttnUpBlockSpatioTemporal",) * 2 + ("UpBlockSpatioTemporal",),
            block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=256,
            num_attention_heads=(2, 4, 8), projection_class_embeddings_input_dim=3 * 64, addition_time_embed_dim=64,
            num_frames=16)),
        "image_encoder": ("CLIPVisionModelWithProjection", dict(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=64,
            patch_size=8, projection_dim=256)),
        # EDM's pixel-space noise range (sigma_max 80) instead of SVD's latent-space 700
        "scheduler": (SVD_SCHEDULER[0], dict(SVD_SCHEDULER[1], sigma_max=80.0)),
    },
    # the shapes of stabilityai/stable-video-diffusion-img2vid-xt (UNet defaults are that model's config)
    "svd-xt": {
        "unet": ("UNetSpatioTemporalConditionModel", dict(sample_size=96, num_frames=25)),
        "vae": ("AutoencoderKLTemporalDecoder", _SD_VAE),
        "image_encoder": ("CLIPVisionModelWithProjection", _CLIP_H_VISION),
        "scheduler": SVD_SCHEDULER,
    },
    # the shapes of ali-vilab/i2vgen-xl
    "i2vgen-xl": {
        "unet": ("I2VGenXLUNet", dict(sample_size=32)),
        "vae": ("AutoencoderKL", dict(_SD_VAE, up_block_types=("UpDecoderBlock2D",) * 4)),
        "image_encoder": ("CLIPVisionModelWithProjection", _CLIP_H_VISION),
        "text_encoder": ("CLIPTextModel", dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                               num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu",
                                               projection_dim=1024, max_position_embeddings=77)),
        "scheduler": I2VGEN_SCHEDULER,
    },
}


def char_tokenizer(model_max_length: int = 77):
    """A CLIP tokenizer with one token per byte (no merges) for random-weight text encoders: real pretrained
    text encoders load their own BPE tokenizer from their folder. Built from files, which every transformers
    version reads."""
    import json
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab))
        Path(folder, "merges.txt").write_text("#version: 0.2\n")
        Path(folder, "tokenizer_config.json").write_text(json.dumps({"model_max_length": model_max_length}))
        return CLIPTokenizer.from_pretrained(folder)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))
