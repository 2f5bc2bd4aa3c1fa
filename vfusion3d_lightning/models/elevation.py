"""The elevation estimator: a 2-layer MLP from averaged DINO features of 4 orbit views to the camera elevation."""

from __future__ import annotations

import torch
from torch import nn


class ElevationMLP(nn.Module):
    """features (B, D) -> elevation (B,) in radians. Features are standardised with statistics of the
    training set (buffers, saved with the weights), since raw DINO features vary widely in scale."""

    def __init__(self, feature_dim: int, hidden_dim: int = 512, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
                                    nn.Linear(hidden_dim, 1))
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    @torch.no_grad()
    def set_normalization(self, features: torch.Tensor) -> None:
        """Standardise with the mean and std of training features (N, D)."""
        self.feature_mean.copy_(features.float().mean(0))
        self.feature_std.copy_(features.float().std(0).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.feature_mean.numel():
            raise ValueError(f"ElevationMLP takes features (B, {self.feature_mean.numel()}), got "
                             f"{tuple(features.shape)}")
        return self.layers((features.float() - self.feature_mean) / self.feature_std).squeeze(-1)
