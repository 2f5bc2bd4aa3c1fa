"""`vfusion3d-lightning images`: prompts -> first frames with a tiny random text-to-image pipeline; per-prompt
seeds, resume, the object-centric suffix, the folder `generate` reads, and the errors for a wrong model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.commands.common import PredictOptions
from vfusion3d_lightning.commands.generate import generate
from vfusion3d_lightning.commands.images import images
from vfusion3d_lightning.data.first_frames import ImageSettings, load_text_to_image, resolve_pipeline
from vfusion3d_lightning.models.tiny_random import build_tiny_clip, build_tiny_text_to_image
from vfusion3d_lightning.models.video import VideoDiffusionModel
from vfusion3d_lightning.training.generation import make_first_frames

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red wooden chair", "a blue ceramic mug", "a toy robot made of tin", "a green desk lamp",
           "a leather backpack"]
FAST = dict(steps=2, size=64, trainer=PredictOptions(accelerator="cpu"), progress=False)


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    return build_tiny_text_to_image(tmp_path_factory.mktemp("t2i") / "tiny")


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2] + [""] + PROMPTS[2:]) + "\n")  # a blank line is no prompt
    return path


def pixels(folder, index: int) -> np.ndarray:
    return np.asarray(Image.open(folder / f"{index:06d}.png")).astype(int)


class CountingPipeline:
    """The real pipeline, recording the prompts of each call."""

    def __init__(self, pipeline):
        self.pipeline, self.calls = pipeline, []

    def __call__(self, prompt, **kwargs):
        self.calls.append(list(prompt))
        return self.pipeline(prompt, **kwargs)


def test_builders_are_deterministic_and_idempotent(t2i, tmp_path):
    again = build_tiny_text_to_image(tmp_path / "again")
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (t2i / name).read_bytes() == (again / name).read_bytes()
    stamp = (again / "model_index.json").stat().st_mtime_ns
    assert build_tiny_text_to_image(again) == again and (again / "model_index.json").stat().st_mtime_ns == stamp
    assert resolve_pipeline(t2i)[1] == "StableDiffusionPipeline"
    clips = [build_tiny_clip(tmp_path / name, seed=1) for name in ("clip", "clip2")]
    assert (clips[0] / "model.safetensors").read_bytes() == (clips[1] / "model.safetensors").read_bytes()
    assert (clips[0] / "model.safetensors").read_bytes() != (build_tiny_clip(tmp_path / "clip0") /
                                                             "model.safetensors").read_bytes()


def test_each_prompt_gets_its_image_whatever_the_batching_and_a_rerun_makes_none(t2i, prompts_file, tmp_path):
    report = images(prompts_file, str(t2i), tmp_path / "batched", batch_size=3, **FAST)
    assert (report["prompts"], report["written"], report["skipped_existing"]) == (5, 5, 0)
    written = sorted(p.name for p in (tmp_path / "batched").iterdir())
    assert written == sorted([f"{i:06d}.{s}" for i in range(5) for s in ("png", "txt")] + ["images_report.json"])
    for i, prompt in enumerate(PROMPTS):
        assert (tmp_path / "batched" / f"{i:06d}.txt").read_text() == prompt + "\n"
        assert Image.open(tmp_path / "batched" / f"{i:06d}.png").size == (64, 64)
    assert np.abs(pixels(tmp_path / "batched", 0) - pixels(tmp_path / "batched", 1)).max() > 10

    # one prompt a call, killed after two prompts then resumed: the same images
    first = images(prompts_file, str(t2i), tmp_path / "resumed", batch_size=1, max_prompts=2, **FAST)
    assert first["written"] == 2
    (tmp_path / "resumed" / "000001.txt").unlink()  # a kill between an image and its prompt
    resumed = images(prompts_file, str(t2i), tmp_path / "resumed", batch_size=1, **FAST)
    assert (resumed["written"], resumed["skipped_existing"]) == (4, 1)
    for i in range(5):
        assert np.abs(pixels(tmp_path / "batched", i) - pixels(tmp_path / "resumed", i)).max() <= 1, i

    # a finished folder: nothing is generated and the model is never loaded
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "batched").glob("0*")}
    report = make_first_frames(PROMPTS, tmp_path / "batched", lambda device: pytest.fail("loaded the model"),
                               ImageSettings(steps=2, size=64))
    assert (report["written"], report["skipped_existing"]) == (0, 5)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "batched").glob("0*")}
    saved = json.loads((tmp_path / "batched" / "images_report.json").read_text())
    assert saved["prompts"] == 5 and saved["settings"]["steps"] == 2


def test_the_suffix_reaches_the_model_but_not_the_prompt_files(t2i, tmp_path):
    counted = CountingPipeline(load_text_to_image(t2i))
    settings = ImageSettings(suffix=", on white", negative_prompt="blurry", steps=2, size=64)
    make_first_frames(PROMPTS[:3], tmp_path / "suffix", lambda device: counted, settings, batch_size=2, progress=False)
    assert counted.calls == [[p + ", on white" for p in PROMPTS[:2]], [PROMPTS[2] + ", on white"]]
    assert [(tmp_path / "suffix" / f"{i:06d}.txt").read_text().strip() for i in range(3)] == PROMPTS[:3]
    plain = ImageSettings(suffix="", negative_prompt="blurry", steps=2, size=64)
    make_first_frames(PROMPTS[:1], tmp_path / "plain", lambda device: counted, plain, progress=False)
    assert counted.calls[-1] == PROMPTS[:1]
    assert np.abs(pixels(tmp_path / "suffix", 0) - pixels(tmp_path / "plain", 0)).max() > 0  # the model saw it


def test_the_folder_feeds_generate(t2i, prompts_file, tmp_path):
    images(prompts_file, str(t2i), tmp_path / "frames", batch_size=5, max_prompts=3, **FAST)
    torch.manual_seed(0)
    VideoDiffusionModel.build("tiny-svd").save_pretrained(tmp_path / "video")
    report = generate(str(tmp_path / "video"), tmp_path / "frames", tmp_path / "videos", size=32, steps=1,
                      batch_size=3, background="white", trainer=PredictOptions(accelerator="cpu"), num_workers=0,
                      progress=False)
    assert report.written == 3
    import webdataset as wds

    from vfusion3d_lightning.data.schema import complete_shards, decode_sample

    samples = [decode_sample(raw) for raw in wds.WebDataset([str(p) for p in complete_shards(tmp_path / "videos")],
                                                            shardshuffle=False)]
    assert {s.key: s.prompt for s in samples} == {f"{i:06d}": PROMPTS[i] for i in range(3)}


@pytest.mark.slow
def test_two_processes_write_the_same_images_as_one(t2i, prompts_file, tmp_path):
    """`--trainer.devices 2` on the CPU (DDP over gloo, one thread a process as in the generate test): prompt i is
    in batch i // batch_size on any number of ranks, seeded by (seed, prompt, i)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    written = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        done = subprocess.run([sys.executable, "-m", "vfusion3d_lightning.cli", "images", "--prompts",
                               str(prompts_file), "--model", str(t2i), "--out", str(out), "--steps", "2", "--size",
                               "64", "--batch_size", "2", "--progress", "false", "--trainer.accelerator", "cpu",
                               "--trainer.devices", str(devices)], capture_output=True, text=True, timeout=600,
                              env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("5 prompts: 5 images written, 0 already present") == 1  # rank 0 only
        written[devices] = {p.name: p.read_bytes() for p in sorted(out.glob("0*"))}
    assert len(written[1]) == 10 and written[1] == written[2]
    assert json.loads((tmp_path / "devices2" / "images_report.json").read_text())["written"] == 5


def test_wrong_models_are_one_clear_line(t2i, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no model_index.json.*hf download"):
        resolve_pipeline(tmp_path / "empty")
    from diffusers import StableDiffusionImg2ImgPipeline

    StableDiffusionImg2ImgPipeline.from_pretrained(t2i).save_pretrained(tmp_path / "img2img")
    with pytest.raises(ValueError, match="is a StableDiffusionImg2ImgPipeline, not a text-to-image pipeline"):
        resolve_pipeline(tmp_path / "img2img")
    # through the command line: a Hub id not in the cache is one line with the download to run
    (tmp_path / "prompts.txt").write_text("a chair\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # this checkout's package
    env.pop("VFUSION3D_TRACEBACK", None)
    done = subprocess.run([sys.executable, "-m", "vfusion3d_lightning.cli", "images", "--prompts", "prompts.txt",
                           "--model", "someone/no-such-model", "--out", "frames"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("vfusion3d-lightning: error:")]
    assert len(errors) == 1 and "hf download someone/no-such-model --local-dir checkpoints/no-such-model" in errors[0]
    assert not (tmp_path / "frames").exists()


@pytest.mark.parametrize("command", ["images", "text-to-3d"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--suffix" in text and "--negative_prompt" in text and "--seed" in text
    if command == "text-to-3d":  # infer's settings, described by infer's docstring
        assert "turntable frames (auto: 160 on a GPU" in " ".join(text.split())
