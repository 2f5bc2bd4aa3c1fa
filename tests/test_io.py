import pytest

from vfusion3d_lightning.io import atomic_write


def test_a_failed_write_leaves_the_existing_file_whole(tmp_path):
    path = tmp_path / "mesh.glb"
    path.write_bytes(b"the user's file")

    def crash(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, crash)
    assert path.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh.glb"]  # no temporary file left
    atomic_write(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new"


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from vfusion3d_lightning.io import atomic_write

    path = atomic_write(tmp_path / "out.txt", lambda tmp: tmp.write_text("x"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as open() makes them, not mkstemp's 0600


def test_a_failed_folder_write_leaves_the_folder_whole(tmp_path, monkeypatch):
    import os

    from vfusion3d_lightning.io import atomic_write_folder

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("old config")
    (folder / "weights.bin").write_text("old weights")
    (folder / "notes.txt").write_text("the user's")

    def crash(tmp):
        (tmp / "weights.bin").write_text("new weights")
        (tmp / "config.json").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_folder(folder, crash, last=("weights.bin",))
    assert {p.name: p.read_text() for p in folder.iterdir()} == {
        "config.json": "old config", "weights.bin": "old weights", "notes.txt": "the user's"}  # no temporary folder

    moved = []

    def write(tmp):
        (tmp / "weights.bin").write_text("new weights")
        (tmp / "config.json").write_text("new config")
        (tmp / "part").mkdir()
        (tmp / "part" / "a.bin").write_text("a")

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (moved.append(os.path.relpath(dst, folder)),
                                                         real_replace(src, dst)))
    assert atomic_write_folder(folder, write, last=("weights.bin",)) == folder
    monkeypatch.undo()
    assert moved[-1] == "weights.bin" and sorted(moved) == ["config.json", "part/a.bin", "weights.bin"]
    assert (folder / "part" / "a.bin").read_text() == "a" and (folder / "notes.txt").read_text() == "the user's"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "notes.txt", "part", "weights.bin"]
