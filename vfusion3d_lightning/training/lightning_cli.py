"""LightningCLI over every LightningModule and LightningDataModule of the package, chosen by `class_path`."""

from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI

from vfusion3d_lightning.training.media import require_logger_extra

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# every LightningModule and DataModule of the package, chosen by `class_path` in the config
CLI_SETTINGS = {"subclass_mode_model": True, "subclass_mode_data": True}


DEFAULT_LOGGER = "lightning.pytorch.loggers.CSVLogger"


class _CLI(LightningCLI):
    """LightningCLI whose default logger is a CSVLogger under the run's default_root_dir whatever is installed
    (Lightning picks TensorBoard when tensorboard happens to be installed): runs, their resume and the tests read
    `<log dir>/metrics.csv`. Any other logger is one `--trainer.logger CLASS` away (training/media.py)."""

    def before_instantiate_classes(self) -> None:
        from jsonargparse import Namespace

        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None:
            return
        if trainer.get("logger") in (None, True):
            save_dir = trainer.get("default_root_dir") or "."
            trainer.logger = Namespace(class_path=DEFAULT_LOGGER, init_args=Namespace(save_dir=save_dir))
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for logger in loggers:  # W&B, MLflow: the extra's pip line, before anything is built
            if isinstance(logger, Namespace) and isinstance(logger.get("class_path"), str):
                require_logger_extra(logger.class_path)


def lightning_cli(argv: list[str] | None, run: bool = True, overwrite_config: bool = False) -> LightningCLI:
    """Build (and with `run`, run) LightningCLI on `argv`, e.g. `["fit", "--config", "configs/lrm/tiny.yaml"]`.

    Args:
        argv: command-line words; None reads sys.argv.
        run: run the subcommand; False only parses and instantiates.
        overwrite_config: let a rerun write the run's config.yaml again where there is no versioned log folder
            (predict).
    """
    # parse errors raise (argparse.ArgumentError) rather than print the usage of every flag: the CLI says them
    # in one line
    # the CLI hands over its command line with shipped config names resolved, so both are given on purpose
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    raising = {"exit_on_error": False, **{command: {"exit_on_error": False} for command in LIGHTNING_COMMANDS}}
    return _CLI(L.LightningModule, L.LightningDataModule, **CLI_SETTINGS, args=argv, run=run,
                save_config_kwargs={"overwrite": overwrite_config}, parser_kwargs=raising)


def fit_parser():
    """The parser of `fit`'s config, as `lightning_cli` builds it, without instantiating anything (a model, a
    trainer); parse errors raise argparse.ArgumentError instead of exiting."""
    from jsonargparse import Namespace

    class ParserOnly(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            self.config = Namespace(seed_everything=False)

        def instantiate_classes(self) -> None:
            pass

    cli = ParserOnly(L.LightningModule, L.LightningDataModule, **CLI_SETTINGS, args=[], run=False,
                     load_from_checkpoint_support=False, seed_everything_default=False)
    cli.parser.exit_on_error = False
    return cli.parser
