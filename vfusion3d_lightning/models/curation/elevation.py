"""The elevation estimator: a 2-layer MLP from averaged DINO features of 4 orbit views to the camera elevation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vfusion3d_lightning.io import atomic_write
from vfusion3d_lightning.hub import load_state_file

FORMAT = "vfusion3d-elevation-mlp/1"
WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"


class ElevationMLP(nn.Module):
    """features (B, D) -> elevation (B,) in radians. Features are standardised with statistics of the
    training set (buffers, saved with the weights), since raw DINO features vary widely in scale."""

    def __init__(self, feature_dim: int, hidden_dim: int = 512, dropout: float = 0.0, feature_tag: str = ""):
        super().__init__()
        self.config = {"feature_dim": feature_dim, "hidden_dim": hidden_dim, "dropout": dropout,
                       "feature_tag": feature_tag}  # feature_tag: the cached features it reads (feature_cache.py)
        self.layers = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden_dim, 1))
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    @torch.no_grad()
    def set_normalization(self, features: torch.Tensor) -> None:
        """Standardise with the mean and std of training features (N, D)."""
        self.feature_mean.copy_(features.float().mean(0))
        std = features.float().std(0)
        # a dimension nearly constant in training would blow up whatever it holds at test time (dead ReLU
        # channels of a CNN): no dimension is scaled up more than 100x the median one's scaling
        self.feature_std.copy_(std.clamp_min(max(1e-6, 0.01 * std.median().item())))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.feature_mean.numel():
            raise ValueError(f"ElevationMLP takes features (B, {self.feature_mean.numel()}), got "
                             f"{tuple(features.shape)}")
        return self.layers((features.float() - self.feature_mean) / self.feature_std).squeeze(-1)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `model.safetensors` and `config.json` into `directory`."""
        directory = Path(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        text = json.dumps({"format": FORMAT, **self.config}, indent=2)

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp))
            # the config goes in while the new weights wait beside it: a full disk leaves the old pair whole
            atomic_write(directory / CONFIG_NAME, lambda config: config.write_text(text))

        atomic_write(directory / WEIGHTS_NAME, write)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ElevationMLP":
        """Load a `save_pretrained` folder (ElevationModule writes one at the end of training)."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not an elevation MLP folder (needs {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}); train one with vfusion3d-lightning fit --config "
                                    "configs/curation/elevation.yaml, which writes <log dir>/elevation_mlp")
        config = json.loads(config_path.read_text())
        if config.pop("format", None) != FORMAT:
            raise ValueError(f"{config_path} is not an elevation MLP config ({FORMAT})")
        model = cls(**config)
        state = load_state_file(directory / WEIGHTS_NAME)  # a clear error for a cut or foreign file
        try:
            model.load_state_dict(state)
        except RuntimeError as err:  # torch's message names neither file
            raise ValueError(f"{directory / WEIGHTS_NAME} does not fit the elevation MLP that {config_path} "
                             f"describes; both must come from one save_pretrained ({err})") from err
        return model.eval()
