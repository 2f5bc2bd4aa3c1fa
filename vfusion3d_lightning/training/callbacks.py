"""Training callbacks: the paper's multi-stage schedule (render resolution by epoch, an LR restart at a stage
switch), the LRM baseline's random render resolution per step, camera noise, and what a sweep trial reports
back (its result file, Optuna pruning)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from vfusion3d_lightning.cameras import add_camera_noise
from vfusion3d_lightning.io import atomic_write, run_log_dir
from vfusion3d_lightning.training.seeding import draw_seed, run_seed, step_generator

SWEEP_RESULT_FILE = "sweep_result.json"
SWEEP_STORAGE_ENV = "VFUSION3D_SWEEP_STORAGE"  # the sweep gives its trials the study's RDB URL here, not in argv


class ResolutionStages(Callback):
    """Sets the LRM's render resolution by epoch: `resolutions[i]` for `epochs[i]` epochs, the last stage
    lasting for the rest of training. The stage follows from the epoch, so a resumed run is in the right one."""

    def __init__(self, resolutions: list[int] = [128, 192, 256, 320, 384],  # noqa: B006 (LightningCLI prints it)
                 epochs: list[int] = [5, 5, 5, 5, 10]):  # noqa: B006 (copied below, never mutated)
        if len(resolutions) != len(epochs) or not resolutions:
            raise ValueError(f"need one epoch count per resolution, got {resolutions} and {epochs}")
        if min(resolutions) < 1 or min(epochs) < 1:
            raise ValueError(f"resolutions and epochs must be positive, got {resolutions} and {epochs}")
        self.resolutions, self.epochs = list(resolutions), list(epochs)

    def stage_at(self, epoch: int) -> int:
        end = 0
        for index, length in enumerate(self.epochs):
            end += length
            if epoch < end:
                return index
        return len(self.epochs) - 1

    def resolution_at(self, epoch: int) -> int:
        return self.resolutions[self.stage_at(epoch)]

    def end_epoch_of(self, resolution: int) -> int:
        """The first epoch after the stage at `resolution`."""
        if resolution not in self.resolutions:
            raise ValueError(f"no stage renders at {resolution}; stages: {self.resolutions}")
        return sum(self.epochs[: self.resolutions.index(resolution) + 1])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # per batch, not per epoch: a run resumed mid-epoch gets no epoch-start hook for that epoch
        pl_module.render_size = self.resolution_at(trainer.current_epoch)
        pl_module.log("train/render_size", float(pl_module.render_size), on_step=True, on_epoch=False)


class RandomResolution(Callback):
    """The LRM baseline that VFusion3D's multi-stage schedule is compared with: one stage, each training step
    rendering at a resolution drawn uniformly from `resolutions`.

    A callback of its own rather than a mode of `ResolutionStages`: that one's stages, epochs and `end_epoch_of`
    (which `LRRestartAtStage` reads) mean nothing here, and an LR restart "after 192" has no stage to follow, so
    the pair refuses to run with this one instead of restarting at a made-up epoch.

    The draw is `draw_seed(seed, 0, global step, micro-batch, "render_size")`, not the global RNG: a resumed run
    draws the same sizes at the same steps, and every DDP rank the same size (rank 0 in the key), so no rank waits
    for another's larger render. seed None takes the run's `seed_everything` seed."""

    def __init__(self, resolutions: list[int] = [128, 192, 256, 320, 384],  # noqa: B006 (LightningCLI prints it)
                 seed: int | None = None):
        if not resolutions or min(resolutions) < 1:
            raise ValueError(f"resolutions must be a non-empty list of positive sizes, got {resolutions}")
        self.resolutions, self.seed = list(resolutions), seed

    def resolution_at(self, step: int, micro_batch: int = 0) -> int:
        """The render size of the training batch `micro_batch` of optimizer step `step`."""
        draw = draw_seed(run_seed(self.seed), 0, step, micro_batch, "render_size")
        return self.resolutions[draw % len(self.resolutions)]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        clash = [type(c).__name__ for c in trainer.callbacks if isinstance(c, (ResolutionStages, LRRestartAtStage))]
        if clash:
            raise ValueError(f"RandomResolution draws the render size of every step; {', '.join(clash)} in the same "
                             "trainer would set it too: keep one schedule (the random-resolution baseline has no "
                             "stages and no LR restart)")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        pl_module.render_size = self.resolution_at(trainer.global_step, batch_idx % accumulate)
        pl_module.log("train/render_size", float(pl_module.render_size), on_step=True, on_epoch=False)


class LRRestartAtStage(Callback):
    """Restarts the cosine LR schedule when the stage at `after_resolution` ends (the paper: after 192).

    Works with `ResolutionStages` in the same trainer; it sets the module's `restart_epochs` before the
    optimizer and its scheduler are built."""

    def __init__(self, after_resolution: int = 192):
        self.after_resolution = after_resolution

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        stages = [c for c in trainer.callbacks if isinstance(c, ResolutionStages)]
        if len(stages) != 1:
            raise ValueError(f"LRRestartAtStage needs exactly one ResolutionStages callback, found {len(stages)}")
        if not hasattr(pl_module, "restart_epochs"):
            raise TypeError(f"{type(pl_module).__name__} has no restart_epochs; LRRestartAtStage drives LRMModule")
        pl_module.restart_epochs = [stages[0].end_epoch_of(self.after_resolution)]


class CameraNoise(Callback):
    """Adds uniform noise to the batch's `source_camera` and/or `render_cameras` in training steps only.

    Each camera's generator is seeded by (seed, global rank, global step, micro-batch, key) (`step_generator`): every
    rank and every gradient-accumulation micro-batch draws its own noise, and a rerun or a resumed run the same."""

    def __init__(self, scale: float = 0.02, source: bool = True, render: bool = True, seed: int = 0):
        if scale < 0:
            raise ValueError(f"camera noise scale must be >= 0, got {scale}")
        self.scale, self.source, self.render, self.seed = scale, source, render, seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict,
                             batch_idx: int) -> None:
        keys = [k for k, on in (("source_camera", self.source), ("render_cameras", self.render)) if on]
        for key in keys:
            camera = batch[key]
            generator = step_generator(trainer, self.seed, batch_idx, f"camera_noise/{key}", camera.device)
            batch[key] = add_camera_noise(camera, self.scale, generator)


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """Trainer.callback_metrics -> {name: float}, scalars only."""
    out = {}
    for name, value in metrics.items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError, RuntimeError):  # a tensor with more than one element, or not a number
            continue
    return out


class SweepResult(L.Callback):
    """Writes `<default_root_dir>/sweep_result.json` (atomically) when `fit` ends: the logged metrics (floats)
    after every validation (`history`, sanity check excluded) and at the end (`metrics`), the log folder, the
    checkpoints, and `pruned` (the epoch, step and value at which an `OptunaPruning` callback of the same trainer
    stopped the run, else null). Nothing is written when fit is interrupted or fails, so the sweep sees an
    unfinished trial."""

    def __init__(self, filename: str = SWEEP_RESULT_FILE):
        self.filename = filename
        self.history: list[dict[str, Any]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step,
                                 "metrics": scalar_metrics(trainer.callback_metrics)})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not trainer.is_global_zero:
            return
        checkpoint = trainer.checkpoint_callback
        pruned = [c.pruned for c in trainer.callbacks if isinstance(c, OptunaPruning) and c.pruned]
        result = {
            "metrics": scalar_metrics(trainer.callback_metrics),
            "history": self.history,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "log_dir": str(run_log_dir(trainer)),
            "checkpoints": {"best": getattr(checkpoint, "best_model_path", "") or None,
                            "last": getattr(checkpoint, "last_model_path", "") or None},
            "pruned": pruned[0] if pruned else None,
        }
        text = json.dumps(result, indent=2)
        atomic_write(Path(trainer.default_root_dir) / self.filename, lambda tmp: tmp.write_text(text))

    def state_dict(self) -> dict[str, Any]:  # a trial resumed from a checkpoint keeps its earlier validations
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def make_pruner(name: str = "median", args: dict[str, Any] | None = None):
    """An Optuna pruner by name: `none` (never prunes), `median` (MedianPruner) or `hyperband`
    (HyperbandPruner), with `args` its keyword arguments (e.g. `{n_startup_trials: 2, n_warmup_steps: 1}`)."""
    import optuna

    pruners = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
               "hyperband": optuna.pruners.HyperbandPruner}
    if name not in pruners:
        raise ValueError(f"unknown pruner {name!r}; choose one of {', '.join(pruners)}")
    try:
        return pruners[name](**(args or {}))
    except TypeError as err:
        raise ValueError(f"pruner {name}: {err} (pruner_args {args})") from None


def rdb_storage(url: str):
    """optuna.storages.RDBStorage on `url`; SQLite waits up to a minute for a lock (the sweep's threads and its
    trials' processes all write to one file)."""
    import optuna

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


class OptunaPruning(L.Callback):
    """Reports the monitored metric to the trial of an Optuna study after every validation (step = the epoch,
    as Optuna's own Lightning integration does) and stops the run when the study's pruner says so: the trainer
    stops at the end of that epoch, and `SweepResult` records `pruned` so the sweep tells the trial PRUNED.

    The sweep appends it to each trial's callbacks. `storage` is the study's RDB URL; when None it is read from
    $VFUSION3D_SWEEP_STORAGE (the sweep sets it, so a database password stays out of argv and config.yaml);
    with neither, the callback does nothing (a trial's config.yaml rerun by hand). A validation that did not log
    `monitor` reports nothing; a NaN is reported (pruners treat it as worst). Only global rank 0 talks to the
    database; its decision is broadcast to every rank."""

    def __init__(self, study_name: str, trial_number: int, monitor: str, storage: str | None = None,
                 pruner: Literal["none", "median", "hyperband"] = "median", pruner_args: dict[str, Any] | None = None):
        self.study_name, self.trial_number, self.monitor = study_name, trial_number, monitor
        self.storage, self.pruner, self.pruner_args = storage, pruner, dict(pruner_args or {})
        make_pruner(pruner, pruner_args)  # a bad name or argument fails here, before training
        self.pruned: dict[str, Any] | None = None
        self._trial = None
        self._reported: set[int] = set()

    def _optuna_trial(self):
        if self._trial is None:
            import optuna

            url = self.storage or os.environ.get(SWEEP_STORAGE_ENV)
            if not url:
                return None
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(study_name=self.study_name, storage=rdb_storage(url),
                                      sampler=optuna.samplers.RandomSampler(),
                                      pruner=make_pruner(self.pruner, self.pruner_args))
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, self.trial_number)
            self._trial = optuna.Trial(study, trial_id)
        return self._trial

    def check(self, epoch: int, step: int, value: float) -> bool:
        """Report `value` at `epoch` and return whether the pruner prunes the trial (records `pruned`)."""
        trial = self._optuna_trial()
        if trial is None or epoch in self._reported:  # several validations in one epoch: the first one counts
            return False
        self._reported.add(epoch)
        trial.report(value, epoch)
        if trial.should_prune():
            self.pruned = {"epoch": epoch, "step": step, "value": value}
            return True
        return False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero and self.monitor in trainer.callback_metrics:
            value = scalar_metrics({self.monitor: trainer.callback_metrics[self.monitor]}).get(self.monitor,
                                                                                             math.nan)
            prune = self.check(trainer.current_epoch, trainer.global_step, value)
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            self.pruned = self.pruned or {"epoch": trainer.current_epoch, "step": trainer.global_step}
            trainer.should_stop = True
            rank_zero_info(f"OptunaPruning: the study's {self.pruner} pruner stops trial {self.trial_number} after "
                           f"epoch {trainer.current_epoch} ({self.monitor} = {self.pruned.get('value')})")

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned, "reported": sorted(self._reported)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned = state_dict.get("pruned")
        self._reported = set(state_dict.get("reported", []))
