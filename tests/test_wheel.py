"""The package as a user installs it: a wheel built from this tree, installed into a fresh virtual environment
outside it, carries the shipped configs, callback presets and weights registry (package data read through
importlib.resources), and finds nothing of the source tree.

The slow tests share one wheel install through the session fixture `installed_wheel_python`, which gives the
new environment's python (its `bin/` also holds the `vfusion3d-lightning` console script); run a command
from a directory outside the repository (`outside_dir`) so that nothing is found through the current
directory. The environment reaches torch and the other dependencies through a `.pth` line naming this
interpreter's site-packages, so nothing is downloaded or reinstalled; a plain path line in a `.pth` adds
that folder to sys.path without processing its own `.pth` files, so this interpreter's editable install
(its import finder) is not active there.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"vfusion3d_lightning.presets.configs": "configs", "vfusion3d_lightning.presets.callbacks": "callbacks",
          "vfusion3d_lightning.presets.checkpoints": "checkpoints",
          "vfusion3d_lightning.presets.eval_sets": "eval_sets"}


def source_copy(destination: Path) -> Path:
    """The files of a checkout of this tree as it is now (tracked and new, not ignored; deleted ones left out),
    copied to `destination`: the wheel is built from them, so build/ and egg-info folders left in the working
    tree by earlier builds cannot slip stale modules into it, and the tree is not written to."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"the wheel is built from the files git lists, and {ROOT} is not a git checkout ({err})")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is still listed
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without what would point the installed package back at this tree."""
    drop = {"PYTHONPATH", "VFUSION3D_CHECKPOINTS", "PYTHONHOME", "VIRTUAL_ENV"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """A wheel of this tree: `pip wheel --no-deps --no-build-isolation` (setuptools as installed here)."""
    root = tmp_path_factory.mktemp("wheel")
    source = source_copy(root / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(root / "dist"), "."], cwd=source, check=True, capture_output=True,
                   env=clean_environment())
    (wheel,) = (root / "dist").glob("vfusion3d_lightning-*.whl")
    return wheel


@pytest.fixture(scope="session")
def installed_wheel_python(built_wheel, tmp_path_factory) -> Path:
    """The python of a fresh virtual environment (outside the source tree) with the wheel installed in it.

    Run it (or `<its folder>/vfusion3d-lightning`) with cwd `outside_dir` and env `clean_environment()`."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "_vfusion3d_test_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # pip comes from the parent site-packages; --ignore-installed: pip sees this interpreter's own install of
    # the package through that line, and must neither skip the wheel nor uninstall that one
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                    str(built_wheel)], check=True, capture_output=True, env=clean_environment())
    return python


@pytest.fixture(scope="session")
def outside_dir(tmp_path_factory) -> Path:
    """A working directory outside the repository, for commands of the installed package."""
    return tmp_path_factory.mktemp("outside")


def run_installed(python: Path, code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=clean_environment(**env))


INSTALLED_CHECK = """
import json, sys
import vfusion3d_lightning
from vfusion3d_lightning import LRMConfig, hub, presets

print(json.dumps({
    "package": vfusion3d_lightning.__file__,
    "finders": [str(finder) for finder in sys.meta_path],
    "configs": presets.list_configs(),
    "tiny_config": str(presets.shipped_config("lrm/tiny")),
    "tiny_network": LRMConfig.from_name("tiny").to_dict(),
    "networks": presets.network_names(),
    "registry": str(hub.registry_path()),
    "entries": sorted(hub.load_registry()),
    "callbacks": presets.callbacks_preset().read_text(),
    "source_tree": str(presets.source_tree()),
    "checkpoint_dir": str(hub.checkpoint_dir()),
}))
"""


@pytest.mark.slow
def test_the_installed_wheel_reads_its_shipped_presets_and_nothing_of_the_tree(installed_wheel_python, outside_dir,
                                                                               tmp_path):
    from vfusion3d_lightning import LRMConfig, hub, presets

    started = time.monotonic()
    venv = installed_wheel_python.parents[1]
    done = run_installed(installed_wheel_python, INSTALLED_CHECK, outside_dir, XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    package = Path(found["package"])
    assert package.is_relative_to(venv) and not package.is_relative_to(ROOT)
    assert not any("editable" in finder.lower() for finder in found["finders"])  # the tree's finder is not active
    assert found["configs"] == presets.list_configs()  # every config of the tree ships
    assert Path(found["tiny_config"]).is_relative_to(package.parent)
    assert found["tiny_network"] == LRMConfig.from_name("tiny").to_dict()
    assert found["networks"] == ["quickstart", "tiny", "vfusion3d"]
    assert Path(found["registry"]).is_relative_to(package.parent) and found["entries"] == sorted(hub.load_registry())
    assert found["callbacks"] == presets.callbacks_preset().read_text()
    # no repository around a wheel install: weights go to the user cache
    assert found["source_tree"] == "None"
    assert found["checkpoint_dir"] == str(tmp_path / "cache" / "vfusion3d_lightning" / "checkpoints")
    print(f"installed-package check: {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_its_presets_only(built_wheel):
    names = zipfile.ZipFile(built_wheel).namelist()
    assert all(name.startswith(("vfusion3d_lightning/", "vfusion3d_lightning-")) for name in names), names
    shipped = {name for name in names if name.startswith("vfusion3d_lightning/presets/")}
    # the checkpoints folder holds downloaded weights too: only the registry and its README ship
    assert {n for n in shipped if "/checkpoints/" in n} == {f"vfusion3d_lightning/presets/checkpoints/{f}"
                                                            for f in ("__init__.py", "registry.yaml", "README.md")}
    assert "vfusion3d_lightning/presets/configs/lrm/network/tiny.yaml" in shipped
    assert "vfusion3d_lightning/presets/callbacks/vfusion3d_stages.yaml" in shipped
    assert {"real.yaml", "gso.txt", "omniobject3d.txt", "real/real_bunny.glb"} <= {
        n.removeprefix("vfusion3d_lightning/presets/eval_sets/") for n in shipped}


def test_pyproject_lists_every_package_of_the_tree():
    # pyproject.toml names its packages (packages.find cannot also map the presets): a new subpackage must be
    # added there, or the wheel would leave it out
    tomllib = pytest.importorskip("tomllib")
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "vfusion3d_lightning").rglob("*.py")
               if "__pycache__" not in path.parts}
    assert set(settings["packages"]) == on_disk | set(MAPPED)
    assert settings["package-dir"] == MAPPED
    for folder in MAPPED.values():  # a regular package: editable installs map only those onto other folders
        assert (ROOT / folder / "__init__.py").is_file()


@pytest.mark.slow
def test_the_installed_command_lists_weights_trains_a_shipped_config_by_name_and_infers(installed_wheel_python,
                                                                                      outside_dir, tmp_path):
    command = installed_wheel_python.parent / "vfusion3d-lightning"
    env = clean_environment(XDG_CACHE_HOME=str(tmp_path / "cache"))

    def run(*words: str) -> str:
        done = subprocess.run([str(command), *words], cwd=outside_dir, capture_output=True, text=True, timeout=600,
                              env=env)
        assert done.returncode == 0, f"{words}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return done.stdout

    listing = run("weights")
    assert "vfusion3d" in listing and "missing" in listing and str(tmp_path / "cache") in listing
    run("procedural", "--out", "outputs/tiny/assets", "--count", "4", "--progress", "false")
    run("render", "--assets", "outputs/tiny/assets", "--out", "outputs/tiny/set32", "--views", "random32",
        "--resolution", "48", "--workers", "1", "--progress", "false")
    # tiny.yaml validates on held-out objects: a procedural one and a real one, which ships in the wheel
    run("procedural", "--out", "outputs/tiny/held_out_assets", "--count", "1", "--seed", "1000000", "--prefix",
        "held_out", "--progress", "false")
    assert "1 objects written" in run("eval-set", "--out", "outputs/tiny/held_out_assets", "--objects", "[nut]")
    run("render", "--assets", "outputs/tiny/held_out_assets", "--out", "outputs/tiny/held_out32", "--views",
        "uniform32", "--resolution", "48", "--workers", "1", "--progress", "false")
    # `lrm/tiny` is no file here: the shipped config of that name is read (data paths relative to this folder)
    run("fit", "--config", "lrm/tiny", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.check_val_every_n_epoch", "1", "--data.init_args.num_workers", "0")
    (checkpoint,) = (outside_dir / "outputs" / "tiny" / "lrm").rglob("last.ckpt")
    from PIL import Image

    photo = Image.new("RGB", (64, 64), (255, 255, 255))
    photo.paste((200, 60, 60), (16, 16, 48, 48))  # an object on white
    photo.save(outside_dir / "photo.png")
    run("infer", "--input", "photo.png", "--out", "results", "--checkpoint", str(checkpoint), "--frames", "2",
        "--render_size", "16", "--input_size", "56", "--video_format", "gif", "--mesh_format", "none",
        "--background", "white", "--device", "cpu")  # meshes of a minute-trained LRM: tests/test_inference.py
    assert sorted(p.name for p in (outside_dir / "results" / "photo").iterdir()) == ["input.png", "turntable.gif"]
