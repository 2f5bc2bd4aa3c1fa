"""`vfusion3d-lightning text-to-3d`: a prompt -> a tiny random text-to-image pipeline's image -> a tiny random LRM's
turntable and textured mesh, through the command line."""

import numpy as np
import torch
import trimesh
from PIL import Image

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.commands.text_to_3d import slug
from vfusion3d_lightning.data.first_frames import ImageSettings, load_text_to_image, render_images
from vfusion3d_lightning.data.preprocess import preprocess
from vfusion3d_lightning.geometry.mesh import density_grid
from vfusion3d_lightning.inference import ImageTo3D
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.tiny_random import build_tiny_text_to_image

PROMPT = "A red wooden chair!"


def test_text_to_3d_writes_the_image_turntable_and_mesh(tmp_path):
    t2i = build_tiny_text_to_image(tmp_path / "t2i")
    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name("tiny")).eval()
    lrm = model.save_pretrained(tmp_path / "lrm")
    # the image the command will make (same settings and seed), for a density level its field crosses
    settings = ImageSettings(steps=2, size=64, seed=5)
    expected = render_images(load_text_to_image(t2i), [PROMPT], [0], settings)[0]
    planes = ImageTo3D(model, input_size=56, background="white").planes(preprocess(expected, 56, background="white"))
    threshold = float(density_grid(model, planes, 16).median())

    out = tmp_path / "out"
    assert main(["text-to-3d", "--prompt", PROMPT, "--t2i", str(t2i), "--checkpoint", str(lrm), "--out", str(out),
                 "--steps", "2", "--image_size", "64", "--seed", "5", "--frames", "4", "--render_size", "24",
                 "--input_size", "56", "--mesh_resolution", "24", "--mesh_threshold", f"{threshold}",
                 "--texture_size", "64", "--video_format", "gif", "--device", "cpu"]) == 0
    folder = out / slug(PROMPT)
    assert folder.name == "a-red-wooden-chair"
    assert sorted(p.name for p in folder.iterdir()) == ["image.png", "input.png", "mesh.glb", "prompt.txt",
                                                        "turntable.gif"]
    assert np.array_equal(np.asarray(Image.open(folder / "image.png")), expected)
    assert (folder / "prompt.txt").read_text() == PROMPT + "\n"
    gif = Image.open(folder / "turntable.gif")
    assert gif.n_frames == 4 and gif.size == (24, 24)
    mesh = trimesh.load(folder / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.material.baseColorTexture.size == (64, 64)
