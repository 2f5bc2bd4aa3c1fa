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
