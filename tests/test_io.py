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
