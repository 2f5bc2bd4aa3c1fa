import numpy as np
import pytest
import yaml
from PIL import Image

from vfusion3d_lightning.cli import COMMANDS, command_function, main


def test_demo_writes_a_rendered_turntable_frame(tmp_path, capsys):
    out = tmp_path / "frames" / "demo.png"
    assert main(["demo", "--out", str(out), "--size", "24", "--frames", "8"]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    # the random field absorbs some light: not a blank white frame
    assert image.min() < 250
    assert "turntable frame 0 of 8" in capsys.readouterr().out


def test_weights_lists_the_registry(tmp_path, capsys):
    assert main(["weights", "--checkpoint_dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "vfusion3d" in printed and "missing" in printed and str(tmp_path) in printed


def _command(args, tmp_path, **env):
    import os
    import subprocess
    import sys

    environment = {**os.environ, "VFUSION3D_CHECKPOINTS": str(tmp_path / "no_weights"), **env}
    return subprocess.run([sys.executable, "-m", "vfusion3d_lightning.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=environment, timeout=300)


def test_missing_weights_are_one_error_line_not_a_traceback(tmp_path):
    from pathlib import Path

    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "photo.png")
    infer = _command(["infer", "--input", "photo.png", "--out", "out"], tmp_path)
    assert infer.returncode == 1 and "Traceback" not in infer.stderr
    assert "vfusion3d-lightning: error: weights 'vfusion3d'" in infer.stderr
    assert "huggingface.co/facebook/vfusion3d" in infer.stderr
    # a Lightning command: the config parser wraps the module's error, which is still the one printed
    features = Path(__file__).parents[1] / "configs" / "curation" / "features.yaml"
    predict = _command(["predict", "--config", str(features), "--trainer.accelerator", "cpu"], tmp_path)
    assert predict.returncode == 1 and "Traceback" not in predict.stderr
    assert "vfusion3d-lightning: error: weights 'dino-vitb16'" in predict.stderr
    shown = _command(["infer", "--input", "photo.png", "--out", "out"], tmp_path, VFUSION3D_TRACEBACK="1")
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "FileNotFoundError" in shown.stderr


def test_a_data_error_in_a_loader_worker_prints_its_own_message(monkeypatch, capsys):
    from torch.utils.data import DataLoader, Dataset

    from vfusion3d_lightning import cli
    from vfusion3d_lightning.data.schema import SampleError

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise SampleError("shard x.tar holds no samples; write it again")

    monkeypatch.setattr(cli, "main", lambda: list(DataLoader(Broken(), num_workers=1)))
    assert cli.console_main() == 1
    assert capsys.readouterr().err == "vfusion3d-lightning: error: shard x.tar holds no samples; write it again\n"


def _required_arguments(function) -> list[str]:
    """Placeholder values for a command's required parameters (parsing only: nothing runs)."""
    import inspect

    words = []
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.default is inspect.Parameter.empty:
            value = "[placeholder]" if str(parameter.annotation).startswith("list") else "placeholder"
            words += [f"--{name}", value]
    return words


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_prints_a_config_that_it_reads_back(name, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, *_required_arguments(command_function(name)), "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert printed.strip()
    config = tmp_path / f"{name}.yaml"
    config.write_text(printed)
    with pytest.raises(SystemExit):
        main([name, "--config", str(config), "--print_config"])
    assert capsys.readouterr().out == printed


def test_help_lists_every_subcommand_and_fit_help_points_to_print_config(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    for name in [*COMMANDS, "fit", "validate", "test", "predict"]:
        assert f"    {name} " in listed or f"    {name}\n" in listed, name
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--print_config" in text and "lrm/tiny" in text and len(text.splitlines()) < 60


def test_fit_reads_a_shipped_config_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "lrm/tiny", "--trainer.max_epochs", "3", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 3
    assert printed["model"]["class_path"] == "vfusion3d_lightning.training.LRMModule"
