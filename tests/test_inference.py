"""`vfusion3d-lightning infer` on an RGBA PNG, an RGB JPEG and a folder, with a tiny random model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
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


def test_infer_writes_videos_and_textured_meshes(checkpoint, tmp_path):
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
        mesh = trimesh.load(out / name / "mesh.glb", force="mesh")  # textured by default
        assert len(mesh.faces) > 0 and mesh.visual.uv.shape == (len(mesh.vertices), 2)
        assert mesh.visual.material.baseColorTexture.size == (512, 512)  # the CPU's auto --texture_size
    # one RGBA file on its own uses its alpha channel; PLY (vertex colours) and no video on request
    assert main(["infer", "--input", str(inputs / "cutout.png"), "--out", str(tmp_path / "single"), *common[:-4],
                 "--video_format", "none", "--mesh_format", "ply"]) == 0
    assert sorted(p.name for p in (tmp_path / "single" / "cutout").iterdir()) == ["input.png", "mesh.ply"]
    mesh = trimesh.load(tmp_path / "single" / "cutout" / "mesh.ply")
    assert mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    # --texture_size 0 keeps vertex colours in a GLB; OBJ comes with its .mtl and texture
    assert main(["infer", "--input", str(inputs / "cutout.png"), "--out", str(tmp_path / "plain"), *common[:-4],
                 "--video_format", "none", "--texture_size", "0"]) == 0
    mesh = trimesh.load(tmp_path / "plain" / "cutout" / "mesh.glb", force="mesh")
    assert mesh.visual.kind == "vertex"
    assert main(["infer", "--input", str(inputs / "cutout.png"), "--out", str(tmp_path / "obj"), *common[:-4],
                 "--video_format", "none", "--mesh_format", "obj", "--texture_size", "64"]) == 0
    folder = tmp_path / "obj" / "cutout"
    assert sorted(p.name for p in folder.iterdir()) == ["input.png", "mesh.mtl", "mesh.obj", "mesh.png"]
    mesh = trimesh.load(folder / "mesh.obj", force="mesh")
    assert mesh.visual.material.image.size == (64, 64) and len(mesh.visual.uv) == len(mesh.vertices)


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


def test_a_streamed_turntable_is_the_same_file_and_a_failed_render_leaves_none(checkpoint, tmp_path, monkeypatch):
    """`run(out_dir=...)` encodes frames batch by batch in a thread: the same MP4 as one call with every frame; a
    render that fails mid-way leaves no video (nor its temporary file); a writer that fails stops the render with
    its own error instead of leaving it waiting."""
    from vfusion3d_lightning.inference import write_video

    model, _ = checkpoint
    image = write_inputs(tmp_path / "inputs") / "cutout.png"
    engine = ImageTo3D(model, input_size=56)
    settings = dict(frames=6, render_size=24, frames_per_batch=2, mesh=False)
    timings = {}
    result = engine.run(image, **settings, out_dir=tmp_path / "streamed", timings=timings)
    assert [p.name for p in result.files] == ["input.png", "turntable.mp4"]
    assert set(timings) == {"preprocess", "planes", "turntable", "finish"}
    whole = write_video(result.frames, tmp_path / "whole" / "turntable.mp4", fps=8)
    assert (tmp_path / "streamed" / "turntable.mp4").read_bytes() == whole.read_bytes()

    render = type(model).render
    calls = []

    def failing_render(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the second batch")
        return render(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "render", failing_render)
    with pytest.raises(RuntimeError, match="second batch"):
        engine.run(image, **settings, out_dir=tmp_path / "failed")
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == ["input.png"]
    monkeypatch.setattr(type(model), "render", render)

    def broken_writer(*args, **kwargs):
        raise OSError("no space left for the video")

    monkeypatch.setattr("vfusion3d_lightning.inference.write_video", broken_writer)
    with pytest.raises(OSError, match="no space left"):  # not a hang: the queue holds 4 of the 6 batches
        engine.run(image, **{**settings, "frames_per_batch": 1}, out_dir=tmp_path / "broken")


def test_a_bf16_engine_bakes_at_float32_surface_points(checkpoint, monkeypatch):
    """Autocast covers the field query alone: the texels' surface points are not rounded to bf16."""
    import vfusion3d_lightning.inference as inference

    model, _ = checkpoint
    engine = ImageTo3D(LRM.from_pretrained(model.config and checkpoint[1]), "cpu", torch.bfloat16)
    seen = []

    def recording(model, planes):
        def colour(points):
            seen.append((points.dtype, torch.is_autocast_enabled("cpu")))
            seen.append((points.bfloat16().float() != points).float().mean().item())
            return torch.full((len(points), 3), 0.5)
        return colour

    monkeypatch.setattr(inference, "field_colour", recording)
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    engine.texture(torch.zeros(1, 3, 2, 4, 4), sphere, size=128, max_faces=500)
    assert seen[0] == (torch.float32, True) and seen[1] > 0.5  # most coordinates need more than bf16's 8 bits


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



def run_command(*words: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "vfusion3d_lightning.cli", *words], env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_command_shows_each_phase_and_the_auto_settings(checkpoint, tmp_path):
    model, directory = checkpoint
    inputs = write_inputs(tmp_path / "inputs")
    threshold = median_threshold(model, inputs / "cutout.png")
    done = run_command("infer", "--input", str(inputs / "cutout.png"), "--out", str(tmp_path / "out"),
                       "--checkpoint", str(directory), "--frames", "4", "--render_size", "16", "--input_size", "56",
                       "--mesh_resolution", "24", "--mesh_threshold", f"{threshold}", "--max_faces", "500",
                       "--video_format", "gif", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    # only the settings left unset are chosen, each with its flag
    assert re.search(r"auto settings for cpu: --fps 8 --texture_size 512 \(pass a flag to override it\)",
                     done.stderr), done.stderr
    for phase, unit in [("planes", "image"), ("frames", "frame"), ("mesh", "slice"), ("texture", "step")]:
        assert re.search(rf"{phase}: +\d+%.*\d+/\d+ \[[0-9:]+<[0-9:?]+", done.stderr), phase  # count and ETA
        assert f"{unit}/s" in done.stderr
    assert re.search(r"decimated \d+ -> \d+ faces \(--max_faces 500\)", done.stderr)
    assert sorted(p.name for p in (tmp_path / "out" / "cutout").iterdir()) == ["input.png", "mesh.glb",
                                                                                "turntable.gif"]


def test_no_surface_keeps_the_input_and_turntable_and_suggests_a_threshold(checkpoint, tmp_path):
    _, directory = checkpoint
    inputs = write_inputs(tmp_path / "inputs")
    done = run_command("infer", "--input", str(inputs / "cutout.png"), "--out", str(tmp_path / "out"),
                       "--checkpoint", str(directory), "--frames", "2", "--render_size", "8", "--input_size", "56",
                       "--mesh_resolution", "16", "--mesh_threshold", "1e9", "--video_format", "gif",
                       "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    warning = [line for line in done.stderr.splitlines() if "vfusion3d-lightning: warning:" in line]
    assert len(warning) == 1, done.stderr
    match = re.search(r"cutout\.png: no mesh written: no surface at density threshold 1000000000\.0: the density "
                      r"grid ranges over \[([^,]+), ([^\]]+)\]; pick a threshold inside that range, e.g\. "
                      r"(\S+) \(its 95th percentile\) \(--mesh_threshold\)", warning[0])
    assert match, warning[0]
    low, high, suggested = (float(v) for v in match.groups())
    assert low <= suggested <= high
    assert sorted(p.name for p in (tmp_path / "out" / "cutout").iterdir()) == ["input.png", "turntable.gif"]
    # the suggested level has a surface
    done = run_command("infer", "--input", str(inputs / "cutout.png"), "--out", str(tmp_path / "out"),
                       "--checkpoint", str(directory), "--frames", "2", "--render_size", "8", "--input_size", "56",
                       "--mesh_resolution", "16", "--mesh_threshold", f"{suggested}", "--video_format", "none",
                       "--texture_size", "0", "--device", "cpu")
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr[-3000:]
    assert (tmp_path / "out" / "cutout" / "mesh.glb").is_file()


def test_infer_takes_a_lightning_checkpoint(checkpoint, tmp_path):
    from torch.utils.data import DataLoader

    from vfusion3d_lightning.cameras import canonical_source_camera, turntable_cameras
    from vfusion3d_lightning.training import LRMModule

    torch.manual_seed(0)
    module = LRMModule(network=LRMConfig.from_name("tiny"), lpips_random_backbone=True, lpips_weight=0.0,
                       l2_weight=1.0, render_size=16, patch_size=8, warmup_steps=1)
    items = [{"input_image": torch.rand(3, 56, 56), "source_camera": canonical_source_camera(1)[0],
              "render_cameras": turntable_cameras(2), "target_images": torch.rand(2, 3, 16, 16),
              "target_masks": torch.ones(2, 1, 16, 16)} for _ in range(2)]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader(items, batch_size=2))
    path = tmp_path / "lrm.ckpt"
    trainer.save_checkpoint(path)
    inputs = write_inputs(tmp_path / "inputs")
    out = tmp_path / "out"
    assert main(["infer", "--input", str(inputs / "cutout.png"), "--out", str(out), "--checkpoint", str(path),
                 "--frames", "2", "--render_size", "8", "--input_size", "56", "--mesh_format", "none",
                 "--video_format", "gif", "--device", "cpu"]) == 0
    assert Image.open(out / "cutout" / "turntable.gif").n_frames == 2
    # the command's loader reads the trained weights, not a fresh network
    loaded = LRM.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), module.model.state_dict().values()))
