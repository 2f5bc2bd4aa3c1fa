"""`vfusion3d-lightning infer` on an RGBA PNG, an RGB JPEG and a folder, with a tiny random model."""

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.data.preprocess import preprocess
from vfusion3d_lightning.geometry.mesh import density_grid
from vfusion3d_lightning.inference import ImageTo3D
from vfusion3d_lightning.models.lrm import LRM, LRMConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = LRM(LRMConfig.from_name("tiny")).eval()
    return model, model.save_pretrained(tmp_path_factory.mktemp("lrm") / "tiny")


def write_inputs(folder):
    folder.mkdir()
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 20:44] = (200, 40, 40, 255)
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
    rgb = np.full((64, 80, 3), 255, np.uint8)
    rgb[10:50, 20:60] = (30, 90, 200)
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=95)
    return folder


def median_threshold(model, path):
    """A density level the random field crosses, so marching cubes finds a surface."""
    engine = ImageTo3D(model, input_size=56, background="white")
    planes = engine.planes(preprocess(path, 56, background="white"))
    return float(density_grid(model, planes, 16).median())


def test_infer_writes_videos_and_coloured_meshes(checkpoint, tmp_path):
    model, directory = checkpoint
    inputs = write_inputs(tmp_path / "inputs")
    threshold = median_threshold(model, inputs / "photo.jpg")
    out = tmp_path / "out"
    common = ["--checkpoint", str(directory), "--frames", "6", "--render_size", "24", "--frames_per_batch", "4",
              "--input_size", "56", "--mesh_resolution", "24", "--mesh_threshold", f"{threshold}",
              "--video_format", "gif", "--device", "cpu"]
    assert main(["infer", "--input", str(inputs), "--out", str(out), "--background", "white", *common]) == 0
    for name in ("cutout", "photo"):
        gif = Image.open(out / name / "turntable.gif")
        assert gif.n_frames == 6 and gif.size == (24, 24)
        assert Image.open(out / name / "input.png").size == (56, 56)
        mesh = trimesh.load(out / name / "mesh.glb", force="mesh")
        assert len(mesh.faces) > 0 and mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    # one RGBA file on its own uses its alpha channel; PLY and no video on request
    assert main(["infer", "--input", str(inputs / "cutout.png"), "--out", str(tmp_path / "single"), *common[:-4],
                 "--video_format", "none", "--mesh_format", "ply"]) == 0
    assert sorted(p.name for p in (tmp_path / "single" / "cutout").iterdir()) == ["input.png", "mesh.ply"]


def test_batched_turntable_equals_frame_by_frame(checkpoint):
    model, _ = checkpoint
    engine = ImageTo3D(model, input_size=56)
    planes = torch.randn(1, 3, 8, 16, 16)
    torch.manual_seed(1)
    batched = engine.turntable(planes, frames=5, size=12, frames_per_batch=5)
    torch.manual_seed(1)
    single = engine.turntable(planes, frames=5, size=12, frames_per_batch=1)
    assert batched.shape == single.shape == (5, 3, 12, 12)
    # stratified jitter differs with the batch layout; the frames agree to sampling noise
    assert (batched - single).abs().mean() < 0.02


def test_a_turntable_does_not_depend_on_the_global_rng(checkpoint):
    model, _ = checkpoint
    engine = ImageTo3D(model, input_size=56)
    planes = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    first = engine.turntable(planes, frames=3, size=12)
    torch.manual_seed(2)
    assert torch.equal(engine.turntable(planes, frames=3, size=12), first)
    assert not torch.equal(engine.turntable(planes, frames=3, size=12, seed=1), first)


def test_missing_inputs_are_clear(checkpoint, tmp_path):
    _, directory = checkpoint
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        main(["infer", "--input", str(tmp_path / "nothing.png"), "--checkpoint", str(directory),
              "--out", str(tmp_path)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        main(["infer", "--input", str(tmp_path / "empty"), "--checkpoint", str(directory), "--out", str(tmp_path)])


def test_mp4_and_gif_keep_every_frame(tmp_path):
    import imageio.v2 as imageio

    from vfusion3d_lightning.inference import write_video

    frames = torch.rand(7, 3, 24, 24)
    mp4 = write_video(frames, tmp_path / "turntable.mp4", fps=40)
    reader = imageio.get_reader(str(mp4))
    assert sum(1 for _ in reader) == 7 and reader.get_meta_data()["fps"] == 40
    assert Image.open(write_video(frames, tmp_path / "turntable.gif")).n_frames == 7
    with pytest.raises(ValueError, match="must end in one of"):
        write_video(frames, tmp_path / "turntable.avi")


def test_missing_or_wrong_checkpoints_are_clear(checkpoint, tmp_path):
    inputs = write_inputs(tmp_path / "inputs")
    with pytest.raises(FileNotFoundError, match="no LRM weights"):
        main(["infer", "--input", str(inputs), "--checkpoint", str(tmp_path / "nothing.safetensors"),
              "--out", str(tmp_path)])
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        main(["infer", "--input", str(inputs), "--checkpoint", str(wrong / "model.safetensors"),
              "--out", str(tmp_path)])

