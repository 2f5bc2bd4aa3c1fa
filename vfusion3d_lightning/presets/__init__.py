"""The YAML the package ships: LightningCLI configs, callback presets and the weights registry.

They live at the top of the repository, where users browse them (`configs/`, `callbacks/`,
`checkpoints/registry.yaml`), and travel inside the wheel as the package data of three subpackages that
pyproject.toml maps onto those folders:

    vfusion3d_lightning.presets.configs      -> configs/
    vfusion3d_lightning.presets.callbacks    -> callbacks/
    vfusion3d_lightning.presets.checkpoints  -> checkpoints/  (registry.yaml and README.md only)

Everything here reads them through importlib.resources, so a source checkout, an editable install and a wheel
install find the same files (in a checkout and an editable install, the repository's own; in a wheel install,
the copies in site-packages). The files must be real files on disk: LightningCLI reads a config by its path and
resolves the paths inside it (`network: network/tiny.yaml`) relative to it.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

CONFIG_SUFFIX = ".yaml"
REGISTRY_FILE = "registry.yaml"
DEFAULT_CALLBACKS = "vfusion3d_stages"
_PROJECT_NAME = "vfusion3d-lightning"


def _shipped_folder(kind: str) -> Path:
    """The folder of one shipped subpackage (`configs`, `callbacks`, `checkpoints`) on disk."""
    package = f"{__name__}.{kind}"
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            f"this install of vfusion3d-lightning lacks its shipped {kind}/ ({package} is missing); reinstall it: "
            "`pip install -e .` in a source checkout (editable installs made before the presets shipped lack "
            "them), else `pip install --force-reinstall vfusion3d-lightning`") from err
    if not isinstance(root, Path):
        raise FileNotFoundError(
            f"{package} is not a folder on disk ({type(root).__name__}): vfusion3d-lightning reads its configs by "
            "path, so install it unpacked (pip does), not as a zip")
    return root


def configs_root() -> Path:
    """The folder of the shipped LightningCLI configs (the repository's `configs/`)."""
    return _shipped_folder("configs")


def list_configs() -> list[str]:
    """Names of every shipped config, without the suffix: `lrm/tiny`, `lrm/network/tiny`, `video/tiny`, ..."""
    root = configs_root()
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob(f"*{CONFIG_SUFFIX}"))


def shipped_config(name: str) -> Path:
    """The shipped config file called `name`.

    Args:
        name: a config's path under `configs/`, with or without `.yaml` and with or without a leading
            `configs/` (`lrm/tiny`, `lrm/tiny.yaml`, `configs/lrm/tiny.yaml`), as `list_configs()` lists them.

    Raises:
        FileNotFoundError: no shipped config has that name; the message lists those that do.
    """
    relative = str(name).replace("\\", "/").strip("/")
    relative = relative.removeprefix("configs/")
    if not relative.endswith(CONFIG_SUFFIX):
        relative += CONFIG_SUFFIX
    root = configs_root()
    path = root / relative
    # a name must stay inside the configs: `../checkpoints/registry` is not a config
    if ".." not in Path(relative).parts and path.is_file():
        return path
    raise FileNotFoundError(f"no shipped config named {name!r}; give a YAML file's path or one of: "
                            f"{', '.join(list_configs())}")


def network_names() -> list[str]:
    """Names of the shipped LRM network sizes (`configs/lrm/network/<name>.yaml`): `tiny`, `vfusion3d`."""
    prefix = "lrm/network/"
    return [name.removeprefix(prefix) for name in list_configs() if name.startswith(prefix)]


def registry_path() -> Path:
    """The weights registry (`checkpoints/registry.yaml`) that `vfusion3d_lightning.hub` reads."""
    return _shipped_folder("checkpoints") / REGISTRY_FILE


def callbacks_preset(name: str = DEFAULT_CALLBACKS) -> Path:
    """A shipped list of Lightning callbacks (`callbacks/<name>.yaml`), for `--trainer.callbacks FILE`.

    Args:
        name: the preset's file name, with or without `.yaml` (default: the paper's multi-stage schedule).

    Raises:
        FileNotFoundError: no shipped preset has that name; the message lists those that do.
    """
    root = _shipped_folder("callbacks")
    file = name if name.endswith(CONFIG_SUFFIX) else name + CONFIG_SUFFIX
    path = root / file
    if Path(file).name == file and path.is_file():
        return path
    known = sorted(p.stem for p in root.glob(f"*{CONFIG_SUFFIX}"))
    raise FileNotFoundError(f"no shipped callbacks preset named {name!r}; shipped: {', '.join(known)}")


def source_tree() -> Path | None:
    """The repository this package runs from (a source checkout or an editable install), else None (a wheel
    install: the package sits in site-packages with no repository around it)."""
    root = Path(__file__).resolve().parents[2]
    try:
        project = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    # a line match, not a TOML parser: tomllib is Python 3.11+ and this package supports 3.10
    named = re.search(rf'^name\s*=\s*"{_PROJECT_NAME}"\s*$', project, re.MULTILINE)
    return root if named else None
