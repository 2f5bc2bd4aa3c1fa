"""Training callbacks: resolution stages, the LR restart at a stage switch, camera noise."""

from .camera_noise import CameraNoise
from .stages import LRRestartAtStage, ResolutionStages

__all__ = ["CameraNoise", "LRRestartAtStage", "ResolutionStages"]
