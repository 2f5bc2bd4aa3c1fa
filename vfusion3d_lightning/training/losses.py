"""Training losses of the LRM: LPIPS (VGG), opacity against masks, pixel L2."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vfusion3d_lightning.hub import load_state_file, missing_weights_error

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16, the LPIPS trunk
VGG16_SOURCE = "https://download.pytorch.org/models/vgg16-397923af.pth"


def torch_hub_vgg16() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def build_lpips(backbone_weights: str | None = None, random_backbone: bool = False) -> nn.Module:
    """LPIPS-VGG with the calibrated linear layers that ship in the `lpips` package, frozen, in eval mode.

    The VGG16 trunk comes from `backbone_weights` (a torchvision VGG16 state dict), else from the torch hub
    cache; nothing is downloaded. `random_backbone` builds a randomly initialised trunk (tests only: the
    loss then measures nothing perceptual).
    """
    import lpips
    import torchvision

    # lpips prints a banner; a random trunk is the same in every process, whatever the global RNG went through
    with contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if not random_backbone:
        path = Path(backbone_weights) if backbone_weights else torch_hub_vgg16()
        if not path.is_file():
            raise missing_weights_error(
                f"torchvision's ImageNet VGG16 weights for LPIPS (looked for at {path})", VGG16_SOURCE,
                torch_hub_vgg16(),
                "that folder is the torch hub cache ($TORCH_HOME); or pass the file's path (LRMModule: "
                "lpips_backbone_weights; evaluate: --lpips_weights); lpips_random_backbone: true builds an untrained "
                "trunk, for tests")

        vgg = torchvision.models.vgg16()
        state = load_state_file(path)  # refuses pickled code, names a cut file
        try:
            vgg.load_state_dict(state)
        except RuntimeError as err:  # torch's message does not name the file
            raise ValueError(f"{path} is not torchvision's VGG16 state dict ({VGG16_FILE} from {VGG16_SOURCE}): "
                             f"{str(err)[:300]}") from err
        for stage in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5):
            for index, layer in stage.named_children():
                layer.load_state_dict(vgg.features[int(index)].state_dict())
    model.eval().requires_grad_(False)
    return model


def lpips_loss(lpips_model: nn.Module, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS of images in [0, 1]: (N, 3, H, W) each. The trunk runs in float32 for stable features."""
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        return lpips_model(prediction.float() * 2 - 1, target.float() * 2 - 1).mean()


def opacity_loss(opacity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between rendered opacity and the foreground mask, both (..., 1, H, W) in [0, 1]."""
    return F.mse_loss(opacity.float(), mask.float())


def pixel_l2(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float())

