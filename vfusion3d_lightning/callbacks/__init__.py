"""Training callbacks: resolution stages, the LR restart at a stage switch, camera noise, sweep results."""

from .camera_noise import CameraNoise
from .stages import LRRestartAtStage, ResolutionStages
from .sweep_result import SweepResult

__all__ = ["CameraNoise", "LRRestartAtStage", "ResolutionStages", "SweepResult"]
