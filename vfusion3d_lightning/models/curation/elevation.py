"""The elevation estimator: a 2-layer MLP from averaged DINO features of 4 orbit views to the camera elevation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vfusion3d_lightning import hub
from vfusion3d_lightning.io import atomic_write_folder

FORMAT = "vfusion3d-elevation-mlp/1"
WEIGHTS_NAME, CONFIG_NAME, README_NAME = "model.safetensors", "config.json", "README.md"
FEATURE_TAG_KEY = "elevation_feature_tag"  # ElevationModule's checkpoints record the features the MLP reads
FIT_CONFIG = "configs/curation/elevation.yaml"
EXPECTED_SOURCES = (f"a folder ElevationMLP.save_pretrained wrote, a Lightning .ckpt of ElevationModule or a registry "
                    f"name; train one with vfusion3d-lightning fit --config {FIT_CONFIG}, which writes "
                    "<log dir>/elevation_mlp; or a Hugging Face Hub repo id push_to_hub wrote")
HUB_FILES = (WEIGHTS_NAME, CONFIG_NAME)


class ElevationMLP(hub.PushToHubMixin, nn.Module):
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

    def save_pretrained(self, directory: str | Path, card_data: dict | None = None) -> Path:
        """Write `model.safetensors`, `config.json` and a `README.md` model card into `directory`, replacing an
        earlier save only once every new file is written (`io.atomic_write_folder`). `push_to_hub(repo_id)`
        uploads the same files.

        Args:
            directory: the folder; created if absent.
            card_data: what the model card records (`hub.model_card`: license, training data, recipe, metrics).
        """
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        text = json.dumps({"format": FORMAT, **self.config}, indent=2)
        card = hub.model_card(
            "VFusion3D elevation MLP",
            f"VFusion3D's curation elevation estimator: a 2-layer MLP (hidden {self.config['hidden_dim']}) from the "
            f"averaged DINO features of 4 views of an orbit video to the camera elevation in radians. Features: "
            f"{self.config['feature_tag'] or 'unrecorded'} ({self.config['feature_dim']} dimensions), standardised "
            "with its training set's statistics (saved with the weights).",
            "from vfusion3d_lightning.models.curation.elevation import ElevationMLP\n\n"
            "mlp = ElevationMLP.from_pretrained(FOLDER)\nelevation = mlp(features)  # (B, D) -> (B,) radians",
            {CONFIG_NAME: "the sizes and the features it reads", WEIGHTS_NAME: "the weights and feature statistics"},
            pipeline_tag="tabular-regression", tags=("curation", "elevation"), card_data=card_data)

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(text)
            (tmp / README_NAME).write_text(card)

        return atomic_write_folder(directory, write, last=(WEIGHTS_NAME,))

    @classmethod
    def from_pretrained(cls, source: str | Path, checkpoint_dir: str | Path | None = None, *,
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        token: str | bool | None = None) -> "ElevationMLP":
        """Load a trained MLP, in eval mode.

        Args:
            source: a `save_pretrained` folder (ElevationModule exports one at the end of training), a Hugging
                Face Hub repo id (`org/name`, as push_to_hub wrote it), a registry name (converter
                `elevation_mlp`), or a Lightning `.ckpt` of `ElevationModule`.
            checkpoint_dir: where registry names resolve (default: `hub.checkpoint_dir()`).
            revision, cache_dir, token: for a Hub repo id (see `LRM.from_pretrained`).
        """
        _, path = hub.locate_weights(source, checkpoint_dir, what="elevation MLP", expected=EXPECTED_SOURCES,
                                     converters=("elevation_mlp",), hub_files=HUB_FILES, revision=revision,
                                     cache_dir=cache_dir, token=token)
        if hub.is_lightning_checkpoint(path):
            checkpoint = hub.read_lightning_checkpoint(path, "ElevationModule",
                                                       ("feature_dim", "hidden_dim", "dropout"), fit_config=FIT_CONFIG)
            hp = checkpoint.hparams
            model = cls(hp["feature_dim"], hp["hidden_dim"], hp["dropout"],
                        feature_tag=checkpoint.raw.get(FEATURE_TAG_KEY, ""))
            hub.load_state_into(model, checkpoint.state, path)
            return model.eval()
        config_path = path / CONFIG_NAME
        if not config_path.is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is not an elevation MLP folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                                    f"give {EXPECTED_SOURCES}")
        config = json.loads(config_path.read_text())
        if config.pop("format", None) != FORMAT:
            raise ValueError(f"{config_path} is not an elevation MLP config ({FORMAT})")
        model = cls(**config)
        state = hub.load_state_file(path / WEIGHTS_NAME)  # a clear error for a cut or foreign file
        try:
            model.load_state_dict(state)
        except RuntimeError as err:  # torch's message names neither file
            raise ValueError(f"{path / WEIGHTS_NAME} does not fit the elevation MLP that {config_path} "
                             f"describes; both must come from one save_pretrained ({err})") from err
        return model.eval()
