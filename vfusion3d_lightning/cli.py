"""`vfusion3d-lightning`: the project's command line.

Training (`fit`, `validate`, `test`, `predict`) is LightningCLI over the YAML configs; every other subcommand
is generated from one typed function of `vfusion3d_lightning.commands` (jsonargparse, as LightningCLI does), so
each takes `--config FILE`, `--print_config` and the same `--key value` / `--group.key value` overrides.
A `--config` that names no file but a shipped config (`lrm/tiny`, `pipeline/quickstart.yaml`) reads that one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import re
import sys
from collections.abc import Callable

from jsonargparse import ActionConfigFile, ArgumentParser

# subcommand -> (its function in vfusion3d_lightning.commands, one-line help), in the order of the system's data
# flow; a command's module is imported when it runs (`command_function`), so a command, and every process a
# command spawns (which imports this module again as its main), pays only for its own imports
COMMANDS: dict[str, tuple[str, str]] = {
    "procedural": ("procedural:procedural", "write seeded procedural 3D assets (GLB, OBJ, PLY)"),
    "render": ("render:render", "render a folder of 3D assets into multi-view shards (resumable)"),
    "captions": ("captions:captions",
                 "caption 3D assets' renders as Cap3D does: view captions summarised by an LLM (resumable)"),
    "prompts": ("prompts:prompts", "keep the captions an LLM judges to describe a single object (resumable)"),
    "images": ("images:images", "prompts -> first-frame images with a text-to-image model (resumable)"),
    "generate": ("generate:generate", "condition images + prompts -> orbit videos as shards (resumable)"),
    "label-ui": ("label_ui:label_ui", "a local web page to label generated videos good or bad"),
    "filter": ("filter:filter_videos", "keep the generated videos the quality SVM scores as good (resumable)"),
    "label": ("label:label",
              "write elevation + orbit cameras, masks and quality scores into videos' shards (resumable)"),
    "infer": ("infer:infer", "image(s) -> turntable video and mesh"),
    "text-to-3d": ("text_to_3d:text_to_3d",
                   "a prompt -> an image (text-to-image model) -> turntable video and mesh"),
    "app": ("app:app", "a local web page: upload an image, see and download its turntable video and mesh (Gradio)"),
    "eval-set": ("eval_set:eval_set", "real held-out meshes as +y-up GLB: our registry set, or our list from your "
                                      "GSO / OmniObject3D copy"),
    "export": ("export:export", "an LRM training checkpoint -> a save_pretrained folder with its model card (LoRA "
                                "adapters merged, and saved alone)"),
    "evaluate": ("evaluate:evaluate",
                 "novel-view metrics (PSNR, SSIM, LPIPS, CLIP) of LRMs on held-out multi-view shards"),
    "mesh-metrics": ("mesh_metrics:mesh_metrics", "Chamfer distance and F-score of a mesh against a ground-truth "
                                                  "mesh, after normalisation and alignment"),
    "pipeline": ("pipeline:pipeline", "the whole system end to end, resumable: assets -> renders -> captions; "
                                      "prompts -> images; video model -> videos -> curation -> LRM -> metrics, "
                                      "samples"),
    "sweep": ("sweep:sweep", "hyperparameter search over config overrides with Optuna (resumable, parallel)"),
    "weights": ("weights:weights", "list known pretrained weights and whether they are present"),
    "demo": ("demo:demo", "build an LRM with random weights and render one turntable frame to PNG"),
}
TRAINING_HELP = {
    "fit": "train a LightningModule: fit --config configs/lrm/tiny.yaml (LightningCLI; fit --print_config "
           "shows every key)",
    "validate": "validate a checkpoint: validate --config CONFIG --ckpt_path CKPT (LightningCLI)",
    "test": "test a checkpoint: test --config CONFIG --ckpt_path CKPT (LightningCLI)",
    "predict": "run predict_step, e.g. the curation features: predict --config configs/curation/features.yaml "
               "(LightningCLI)",
}
LIGHTNING_COMMANDS = tuple(TRAINING_HELP)  # parsed by LightningCLI (imported only for them: lightning takes seconds)


def command_function(name: str) -> Callable:
    """The function of subcommand `name` (imported now)."""
    module, _, function = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(f"vfusion3d_lightning.commands.{module}"), function)


def command_parser(function: Callable) -> ArgumentParser:
    """The parser of one command: `--config`, `--print_config` and one argument per parameter of `function`."""
    doc = (function.__doc__ or "").strip().split("\n\n")[0]
    parser = ArgumentParser(description=" ".join(doc.split()), exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of this command's arguments")
    parser.add_function_arguments(function, fail_untyped=True)
    return parser


def build_parser(only: str | None = None) -> ArgumentParser:
    """The parser of every subcommand, or of subcommand `only` alone (which imports only its function)."""
    parser = ArgumentParser(prog="vfusion3d-lightning", exit_on_error=False,
                            description="VFusion3D in PyTorch Lightning: the video data engine, curation and the LRM. "
                                        "Every subcommand takes --config FILE and --print_config.")
    subcommands = parser.add_subcommands(dest="command")
    for name, text in TRAINING_HELP.items():  # listed here; parsed by LightningCLI
        subcommands.add_subcommand(name, ArgumentParser(description=text), help=text)
    for name, (_, text) in COMMANDS.items():
        if only is None or name == only:
            subcommands.add_subcommand(name, command_parser(command_function(name)), help=text)
    return parser


def shipped_config_args(words: list[str]) -> list[str]:
    """`--config NAME` where NAME is no file but a shipped config's name -> that file's path."""
    from vfusion3d_lightning.presets import shipped_config

    words = list(words)
    for i, word in enumerate(words[:-1]):
        if word == "--config" and not os.path.exists(words[i + 1]):
            try:
                words[i + 1] = str(shipped_config(words[i + 1]))
            except FileNotFoundError:
                pass  # the parser reports the missing file
    return words


def training_help(command: str) -> str:
    """`fit --help` without a config: how to get in, rather than LightningCLI's hundreds of flags."""
    from vfusion3d_lightning.presets import list_configs

    names = "\n".join(f"  {name}" for name in list_configs())
    return (f"usage: vfusion3d-lightning {command} --config CONFIG [--config MORE] [--KEY VALUE ...]\n\n"
            f"{TRAINING_HELP[command]}\n\n"
            f"CONFIG is a YAML file or the name of a shipped config:\n{names}\n\n"
            f"See every key of a config and its value:  vfusion3d-lightning {command} --config CONFIG --print_config\n"
            f"Override any key:  --trainer.max_epochs 2 --model.init_args.lr 1.0e-4\n"
            f"LightningCLI's full list of flags:  vfusion3d-lightning {command} --config CONFIG --help\n")


def check_resume_checkpoint(words: list[str]) -> None:
    """`--ckpt_path FILE` must be a checkpoint that loads without running code from it, checked before
    Lightning reads it (Lightning's torch.load error advises weights_only=False, which would run that code)."""
    from vfusion3d_lightning.hub import load_state_file

    for i, word in enumerate(words):
        value = words[i + 1] if word == "--ckpt_path" and i + 1 < len(words) else None
        value = word.partition("=")[2] if word.startswith("--ckpt_path=") else value
        if value and value not in ("last", "best", "hpc", "registry") and os.path.isfile(value):
            try:
                load_state_file(value, mmap=True)
            except ValueError as err:
                raise ValueError(f"--ckpt_path {value}: {err}") from None


def main(argv: list[str] | None = None) -> int:
    words = shipped_config_args(sys.argv[1:] if argv is None else list(argv))
    if words and words[0] in LIGHTNING_COMMANDS and {"-h", "--help"} & set(words) and "--config" not in words:
        print(training_help(words[0]))
        return 0
    if words and words[0] in LIGHTNING_COMMANDS:
        check_resume_checkpoint(words)
        # predict writes no versioned log folder, so its rerun (skipping cached shards) meets its own config.yaml
        from vfusion3d_lightning.training.lightning_cli import lightning_cli

        lightning_cli(words, overwrite_config=words[0] == "predict")
        return 0
    parser = build_parser(words[0] if words and words[0] in COMMANDS else None)
    config = parser.parse_args(words)
    name = config.command
    function = command_function(name)
    arguments = parser.instantiate(config)[name]
    kwargs = {key: value for key, value in vars(arguments).items() if key != "config"}
    result = function(**kwargs)
    if name == "sweep" and result.get("failed_now"):  # the table is written; failed trials rerun on the next call
        return 1
    return 0


def _user_error(err: BaseException) -> BaseException | None:
    """The error in `err`'s chain that is the user's to mend, with a message that says how: a missing file
    (weights to fetch, an input path), an argument or config key the parser refuses, a value the code refuses
    (ValueError: a wrong size, an empty mask, a file of another kind), or data that breaks the shard schema or
    cannot be rendered. Lightning's config parser wraps errors from building a module, so the chain is searched.
    Other errors are bugs: their traceback is shown."""
    from PIL import UnidentifiedImageError

    from vfusion3d_lightning.data.render import AssetLoadError
    from vfusion3d_lightning.data.schema import SampleError
    from vfusion3d_lightning.io import FolderInUseError

    # a missing file or bad data says the most wherever it sits in the chain (the config parser wraps it in a
    # ValueError or ArgumentError of its own); else the outermost refusal, which names the input
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    for kinds in ((FileNotFoundError, SampleError, AssetLoadError, FolderInUseError),
                  (ValueError, UnidentifiedImageError, pickle.UnpicklingError), (argparse.ArgumentError,)):
        found = next((e for e in chain if isinstance(e, kinds)), None)
        if found is not None:
            return found
    # an optional package a chosen path needs, whose message says how to install it
    return next((e for e in chain if isinstance(e, ImportError) and "pip install" in str(e)), None)


def _plain_message(text: str) -> str:
    """An error's text on one line; of jsonargparse's list of every subtype it tried, the one that names the
    problem (`Option 'lrr' is not accepted`)."""
    message = " ".join(text.split())
    if message.startswith("Does not validate against any of the Union subtypes"):
        found = re.search(r"Problem with given class_path '([^']+)': (.*?)(?= - Expected|$)", message)
        if found:
            message = f"{found.group(2)} by {found.group(1)}"
    return message


def console_main() -> int:
    """The `vfusion3d-lightning` command: `main`, with errors the user can mend printed as one message
    rather than a traceback (VFUSION3D_TRACEBACK=1 shows the traceback too)."""
    try:
        return main()
    except Exception as err:
        found = _user_error(err)
        if found is None or os.environ.get("VFUSION3D_TRACEBACK") == "1":
            raise
        if isinstance(found, pickle.UnpicklingError):  # torch's text advises weights_only=False: never repeat it
            from vfusion3d_lightning.hub import unsafe_pickle_error

            found = unsafe_pickle_error("the checkpoint", found)
        message = str(found)
        if "Original Traceback" in message:  # raised in a DataLoader worker: its message ends the worker's traceback
            name, _, text = message.strip().splitlines()[-1].partition(": ")
            message = text if text and " " not in name else message
        message = _plain_message(message)
        if isinstance(found, argparse.ArgumentError) or "is not accepted" in message:
            command = " ".join(["vfusion3d-lightning", *sys.argv[1:2]])
            message += f" ({command} --help lists the arguments)"
        print(f"vfusion3d-lightning: error: {' '.join(message.split())}", file=sys.stderr)
        return 2 if isinstance(found, argparse.ArgumentError) else 1


if __name__ == "__main__":
    sys.exit(console_main())
