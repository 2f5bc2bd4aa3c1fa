"""The numbers the VFusion3D paper (Han et al., "VFusion3D: Learning Scalable 3D Generative Models from Video
Diffusion Models", ECCV 2024) states, each with the shipped config file and key that encodes it.

`tests/test_paper_numbers.py` reads every record's key from its file (`lookup`) and checks the value, so a
config that drifts from the paper names the number, the file and the key. Where a config deviates on purpose,
the record's `note` says so and its `value` is the documented one.

Where the paper states them:
- video model as a multi-view data engine (section 3.1): 16-frame orbit videos of renders of 3D assets, camera
  elevation drawn in [0, pi/4] per object, azimuths 2*pi*i/16 (EMU Video; here I2VGen-XL, see
  configs/video/i2vgen_xl_orbit.yaml).
- data curation and camera poses (section 3.2): DINO ViT-B/16 features averaged over 8 uniformly spaced frames
  for the quality SVM, over 4 uniformly spaced views for the 2-layer elevation MLP.
- LRM pre-training (sections 3.3 and 4.1, appendix A): AdamW lr 4e-4, betas (0.9, 0.95), weight decay 0.05,
  grad clip 1.0, bf16, 3,000 warm-up iterations, cosine restarted after the 192 stage, 30 epochs of
  128/192/256/320/384 renders (5, 5, 5, 5, 10 epochs), 4 supervision views as 128x128 patches, LPIPS and
  opacity losses (no pixel loss), camera noise in [-0.02, 0.02], batch 1024 on 128 GPUs.
- 3D fine-tuning (section 4.1): lr 1e-4, 10 epochs, pixel L2 added, "all other parameters remain consistent".
- the network (section 4.1, appendix A; the released model): DINOv2 ViT-B/14 encoder on 512x512 inputs,
  16 transformer blocks of width 1024, a 3x80x64x64 triplane, 64 + 64 samples a ray.

`config_file` is a path in the repository: a YAML file under configs/ (references inside it, such as
`network: network/vfusion3d.yaml` or `callbacks: ../../callbacks/vfusion3d_stages.yaml`, are followed relative to
the file, as LightningCLI does), or a Python module whose function default is the number (`function.argument`).
`config_key` is a dotted path; in a list of `class_path` entries a part names the class
(`trainer.callbacks.ResolutionStages.init_args.resolutions`).
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

import yaml

from vfusion3d_lightning import presets

__all__ = ["PAPER_NUMBERS", "PaperNumber", "lookup"]


@dataclass(frozen=True)
class PaperNumber:
    """One number of the paper and where a shipped config encodes it."""

    name: str
    value: Any
    where_in_paper: str
    config_file: str
    config_key: str
    note: str = ""  # how the config's value maps to the paper's, or why it deviates


DATA_ENGINE = "section 3.1 (the video model as a multi-view data engine)"
CURATION = "section 3.2 (curating the generated videos, camera poses)"
LRM_TRAINING = "sections 3.3 and 4.1, appendix A (LRM training)"
FINETUNE = "section 4.1 (fine-tuning with 3D data)"
NETWORK = "section 4.1, appendix A (model details; the released model)"

PRETRAIN = "configs/lrm/vfusion3d_pretrain.yaml"
FINETUNE_3D = "configs/lrm/vfusion3d_finetune_3d.yaml"
NETWORK_SIZE = "configs/lrm/network/vfusion3d.yaml"
VIDEO = "configs/video/i2vgen_xl_orbit.yaml"
PIPELINE = "configs/pipeline/paper.yaml"
FEATURES = "configs/curation/features.yaml"
STAGES = "trainer.callbacks.ResolutionStages.init_args"


def _recipe(file: str, where: str) -> tuple[PaperNumber, ...]:
    """The optimiser and regularisation numbers pre-training states and fine-tuning keeps."""
    return (
        PaperNumber("AdamW betas", (0.9, 0.95), where, file, "model.init_args.betas"),
        PaperNumber("weight decay", 0.05, where, file, "model.init_args.weight_decay"),
        PaperNumber("gradient clipping", 1.0, where, file, "trainer.gradient_clip_val"),
        PaperNumber("bf16 training", "bf16-mixed", where, file, "trainer.precision"),
        PaperNumber("warm-up iterations", 3000, where, file, "model.init_args.warmup_steps"),
        PaperNumber("camera noise", 0.02, where, file, "trainer.callbacks.CameraNoise.init_args.scale",
                    "uniform in [-0.02, 0.02]"),
        PaperNumber("supervision views a sample", 4, where, file, "data.init_args.num_supervision_views"),
        PaperNumber("supervision patch size", 128, where, file, "model.init_args.patch_size",
                    "128x128 patches cropped from the stage's render resolution"),
        PaperNumber("LPIPS loss", 1.0, where, file, "model.init_args.lpips_weight",
                    "the paper names the loss, not a weight: 1.0 here"),
        PaperNumber("opacity loss", 1.0, where, file, "model.init_args.opacity_weight",
                    "the paper names the loss, not a weight: 1.0 here"),
        PaperNumber("input image size", 512, where, file, "data.init_args.input_size"),
        PaperNumber("images a GPU", 8, where, file, "data.init_args.batch_size",
                    "batch 1024 on 128 GPUs: set devices / num_nodes (or accumulate_grad_batches) to match"),
    )


PAPER_NUMBERS: tuple[PaperNumber, ...] = (
    # LRM pre-training on the synthetic multi-view data
    PaperNumber("render resolution stages", (128, 192, 256, 320, 384), LRM_TRAINING, PRETRAIN,
                f"{STAGES}.resolutions"),
    PaperNumber("epochs per resolution stage", (5, 5, 5, 5, 10), LRM_TRAINING, PRETRAIN, f"{STAGES}.epochs"),
    PaperNumber("pre-training epochs", 30, LRM_TRAINING, PRETRAIN, "trainer.max_epochs"),
    PaperNumber("pre-training learning rate", 4e-4, LRM_TRAINING, PRETRAIN, "model.init_args.lr"),
    PaperNumber("learning-rate restart after the stage of", 192, LRM_TRAINING, PRETRAIN,
                "trainer.callbacks.LRRestartAtStage.init_args.after_resolution",
                "cosine restarted when the 192 stage ends (epoch 10)"),
    PaperNumber("pixel loss in pre-training", 0.0, LRM_TRAINING, PRETRAIN, "model.init_args.l2_weight",
                "no pixel loss: LPIPS and opacity only"),
    PaperNumber("encoder initialisation", "dinov2-base", LRM_TRAINING, PRETRAIN, "model.init_args.encoder_weights",
                "DINOv2 ViT-B/14 (facebook/dinov2-base), trained with the rest"),
    *_recipe(PRETRAIN, LRM_TRAINING),
    # fine-tuning on renders of 3D assets
    PaperNumber("fine-tuning learning rate", 1e-4, FINETUNE, FINETUNE_3D, "model.init_args.lr"),
    PaperNumber("fine-tuning epochs", 10, FINETUNE, FINETUNE_3D, "trainer.max_epochs"),
    PaperNumber("fine-tuning stage epochs", (10,), FINETUNE, FINETUNE_3D, f"{STAGES}.epochs",
                "one stage at the last pre-training resolution"),
    PaperNumber("pixel L2 loss added", 1.0, FINETUNE, FINETUNE_3D, "model.init_args.l2_weight",
                "the paper adds L2 without a weight: 1.0 here"),
    *_recipe(FINETUNE_3D, FINETUNE + ": all other parameters as pre-training"),
    # the network
    PaperNumber("image encoder", "vit_base_patch14_dinov2", NETWORK, NETWORK_SIZE, "encoder_name",
                "DINOv2 ViT-B/14"),
    PaperNumber("transformer blocks", 16, NETWORK, NETWORK_SIZE, "transformer_layers"),
    PaperNumber("transformer width", 1024, NETWORK, NETWORK_SIZE, "transformer_dim"),
    PaperNumber("triplane channels", 80, NETWORK, NETWORK_SIZE, "triplane_dim"),
    PaperNumber("triplane tokens a side", 32, NETWORK, NETWORK_SIZE, "triplane_low_res",
                "a 2x upsampler makes the 64x64 planes (LRMConfig.triplane_high_res)"),
    PaperNumber("coarse samples a ray", 64, NETWORK, NETWORK_SIZE, "coarse_samples"),
    PaperNumber("importance samples a ray", 64, NETWORK, NETWORK_SIZE, "importance_samples"),
    # the video model and its orbit renders
    PaperNumber("orbit views", 16, DATA_ENGINE, "vfusion3d_lightning/data/render.py", "orbit_cameras.n_views"),
    PaperNumber("orbit elevation range", (0.0, math.pi / 4), DATA_ENGINE, "vfusion3d_lightning/data/render.py",
                "orbit_cameras.elevation_range", "radians, one elevation for all views of an orbit"),
    PaperNumber("orbit starts at azimuth 0 (not at random)", False, DATA_ENGINE, "vfusion3d_lightning/data/render.py",
                "orbit_cameras.random_start_azimuth", "the first frame is the view at azimuth 0"),
    PaperNumber("video frames (fine-tuning)", 16, DATA_ENGINE, VIDEO, "data.init_args.num_frames"),
    PaperNumber("video frames (generation)", 16, DATA_ENGINE, PIPELINE, "generate.frames"),
    # curation and camera poses
    PaperNumber("DINO feature model", "vit_base_patch16_224.dino", CURATION, FEATURES, "model.init_args.model_name",
                "DINO ViT-B/16"),
    PaperNumber("frames of a video", 16, CURATION, FEATURES, "model.init_args.num_frames"),
    PaperNumber("uniform frames for the quality score", 8, CURATION, FEATURES, "model.init_args.quality_frames"),
    PaperNumber("uniform views for the elevation", 4, CURATION, FEATURES, "model.init_args.elevation_views"),
    PaperNumber("quality classifier (an SVM)", "vfusion3d_lightning.training.QualityModule", CURATION,
                "configs/curation/quality.yaml", "model.class_path"),
    PaperNumber("elevation estimator (a 2-layer MLP)", "vfusion3d_lightning.training.ElevationModule", CURATION,
                "configs/curation/elevation.yaml", "model.class_path"),
    PaperNumber("elevation MLP input (DINO ViT-B width)", 768, CURATION, "configs/curation/elevation.yaml",
                "model.init_args.feature_dim"),
)


def _python_default(config_file: str, key: str) -> Any:
    module_name = config_file.removesuffix(".py").replace("/", ".")
    function_name, _, argument = key.partition(".")
    function = getattr(importlib.import_module(module_name), function_name, None)
    if function is None:
        raise KeyError(f"{config_file} has no function {function_name!r} (record key {key!r})")
    parameter = inspect.signature(function).parameters.get(argument)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise KeyError(f"{config_file}: {function_name} has no argument {argument!r} with a default")
    return parameter.default


def _step(node: Any, part: str, where: str) -> Any:
    if isinstance(node, dict) and part in node:
        return node[part]
    if isinstance(node, list):
        named = [item for item in node if isinstance(item, dict)
                 and str(item.get("class_path", "")).rsplit(".", 1)[-1] == part]
        if len(named) == 1:
            return named[0]
        if part.isdigit() and int(part) < len(node):
            return node[int(part)]
    raise KeyError(f"{where} has no {part!r}")


def lookup(config_file: str, config_key: str) -> Any:
    """The value at `config_key` of a shipped file, YAML lists as tuples.

    Raises:
        KeyError: the key (or a part of it) is not in the file; the message names both.
        FileNotFoundError: no shipped file has that name.
    """
    if config_file.endswith(".py"):
        return _python_default(config_file, config_key)
    source = presets.source_tree()  # a checkout reads its own files; a wheel install its shipped copies
    path = source / config_file if source is not None else presets.shipped_config(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"no shipped config {config_file} (at {path})")
    node: Any = yaml.safe_load(path.read_text())
    walked = []
    for part in config_key.split("."):
        if isinstance(node, str) and node.endswith(".yaml"):  # a reference: LightningCLI reads it relative to the file
            path = (path.parent / node).resolve()
            node = yaml.safe_load(path.read_text())
        node = _step(node, part, f"{config_file}: {'.'.join(walked) or 'the top level'} (in {path.name})")
        walked.append(part)
    if isinstance(node, str) and node.endswith(".yaml"):
        node = yaml.safe_load((path.parent / node).read_text())
    return tuple(node) if isinstance(node, list) else node
