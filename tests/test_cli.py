import numpy as np
from PIL import Image

from vfusion3d_lightning.cli import main


def test_demo_writes_a_rendered_turntable_frame(tmp_path, capsys):
    out = tmp_path / "frames" / "demo.png"
    assert main(["demo", "--out", str(out), "--size", "24", "--frames", "8"]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    # the random field absorbs some light: not a blank white frame
    assert image.min() < 250
    assert "turntable frame 0 of 8" in capsys.readouterr().out


def test_weights_lists_the_registry(tmp_path, capsys):
    assert main(["weights", "--checkpoint-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "vfusion3d" in printed and "missing" in printed and str(tmp_path) in printed
