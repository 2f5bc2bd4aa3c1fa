"""What the real command prints for the mistakes a new user makes: one line `vfusion3d-lightning: error: ...`
naming the input and what to do, a non-zero exit, no traceback, and never torch's advice to load with
`weights_only=False` (which would run code from the file)."""

import io
import os
import pickle
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfusion3d_lightning.models.lrm import LRM, LRMConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("errors")
    torch.manual_seed(0)
    LRM(LRMConfig.from_name("tiny")).save_pretrained(folder / "lrm")
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(folder / "blank.png")  # nothing but background
    picture = np.full((64, 64, 3), 255, np.uint8)
    picture[16:48, 16:48] = (200, 60, 60)
    Image.fromarray(picture).save(folder / "object.png")
    Image.fromarray(picture).save(folder / "photo.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    (folder / "bomb.png").write_bytes(_huge_png(30000, 30000))
    torch.save({"state_dict": {}, "hyper_parameters": {}}, folder / "other.ckpt")
    (folder / "tampered.ckpt").write_bytes(pickle.dumps(Payload()))
    (folder / "empty").mkdir()
    (folder / "empty" / "shard-000000.tar").write_bytes(b"")
    return folder


class Payload:  # unpickling it would need this class: torch's weights_only loader stops at it
    def __reduce__(self):
        return (print, ("ran code from the checkpoint",))


def _huge_png(width: int, height: int) -> bytes:
    """A valid grey PNG of width x height white pixels, a few kB on disk, built row by row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    compressor, rows = zlib.compressobj(9), []
    row = b"\x00" + b"\xff" * width
    rows = [compressor.compress(row) for _ in range(height)]
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(rows) + compressor.flush())
            + chunk(b"IEND", b""))


INFER = ["infer", "--out", "results", "--checkpoint", "lrm", "--frames", "2", "--render_size", "8",
         "--input_size", "56", "--mesh_resolution", "8", "--device", "cpu", "--video_format", "gif"]
CASES = {
    # case: (arguments, what the one line must say)
    "unreadable image": (INFER + ["--input", "broken.png"], r"cannot read broken\.png as an image"),
    "empty mask": (INFER + ["--input", "blank.png", "--background", "white"], r"blank\.png"),
    "rembg missing (a JPEG's default path)": (INFER + ["--input", "photo.jpg"], r"needs rembg, which is not "
                                              r"installed: pip install 'vfusion3d-lightning\[rembg\]'"),
    "PNG bomb": (INFER + ["--input", "bomb.png"], r"bomb\.png"),
    "a .ckpt of no LRM given to infer": (INFER + ["--input", "object.png", "--checkpoint", "other.ckpt"],
                                         r"other\.ckpt"),
    "--ckpt_path that is no checkpoint": (["fit", "--config", "lrm/tiny", "--ckpt_path", "tampered.ckpt"],
                                          r"--ckpt_path tampered\.ckpt: refusing to load"),
    "an empty shard as the only shard": (["fit", "--config", "lrm/tiny", "--data.init_args.train_shards",
                                          "empty", "--data.init_args.val_shards", "empty",
                                          "--data.init_args.num_workers", "0"], r"shard-000000\.tar"),
    "a misspelt config key": (["fit", "--config", "lrm/tiny", "--model.init_args.lrr", "1"],
                              r"'lrr' is not accepted by .*LRMModule .*fit --help"),
    "a misspelt command argument": (["render", "--assets", "a", "--out", "b", "--resoltion", "3"],
                                    r"--resoltion.*render --help"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_command_prints_one_line_naming_the_input(case, workdir):
    words, expected = CASES[case]
    env = {**os.environ, "VFUSION3D_CHECKPOINTS": str(workdir / "no_weights"), "PYTHONWARNINGS": "ignore"}
    env.pop("VFUSION3D_TRACEBACK", None)
    done = subprocess.run([sys.executable, "-m", "vfusion3d_lightning.cli", *words], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("vfusion3d-lightning: error:")]
    assert done.returncode != 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "weights_only=False" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1, done.stderr[-3000:]
    assert re.search(expected, errors[0]), errors[0]
    assert "ran code from the checkpoint" not in done.stdout + done.stderr


def test_no_surface_is_one_warning_line_and_success(workdir):
    """The input and turntable exist by the time the mesh is tried, so the command succeeds and warns."""
    env = {**os.environ, "VFUSION3D_CHECKPOINTS": str(workdir / "no_weights"), "PYTHONWARNINGS": "ignore"}
    words = INFER + ["--input", "object.png", "--background", "white", "--mesh_threshold", "1e9"]
    done = subprocess.run([sys.executable, "-m", "vfusion3d_lightning.cli", *words], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("vfusion3d-lightning: warning:")]
    assert len(warnings) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert re.search(r"object\.png: no mesh written: no surface .*--mesh_threshold", warnings[0]), warnings[0]


def test_the_huge_png_is_small_on_disk():
    assert len(_huge_png(30000, 30000)) < 1_000_000
    with Image.open(io.BytesIO(_huge_png(300, 200))) as image:
        assert image.size == (300, 200)
