"""The video model wrapper: conditions as the public pipelines build them, the EDM objective consistent with the
scheduler that samples, per-sample seeding, and folders that round-trip."""

import json

import pytest
import torch

from vfusion3d_lightning.models.video import (
    Conditioning,
    EDMObjective,
    OrbitVideoPipeline,
    SamplerSettings,
    SchedulerObjective,
    VideoDiffusionModel,
    objective_for,
)


@pytest.fixture(scope="module")
def svd():
    torch.manual_seed(0)
    return VideoDiffusionModel.build("tiny-svd")


@pytest.fixture(scope="module")
def i2vgen():
    torch.manual_seed(0)
    return VideoDiffusionModel.build("tiny-i2vgen-xl")


def test_svd_conditions_follow_the_svd_pipeline(svd):
    images = torch.rand(2, 3, 32, 32)
    cond = svd.conditions(images, None, 16, drop=torch.tensor([False, True]))
    assert cond.concat.shape == (2, 16, 4, 8, 8)
    assert cond.unet_kwargs["encoder_hidden_states"].shape == (2, 1, 32)
    # SVD was trained on fps - 1; the motion bucket and noise augmentation follow
    assert cond.unet_kwargs["added_time_ids"][0].tolist() == pytest.approx([6, 127, 0.02])
    # a dropped sample carries the unconditional inputs of classifier-free guidance: zeros
    assert cond.concat[1].abs().sum() == 0 and cond.unet_kwargs["encoder_hidden_states"][1].abs().sum() == 0
    assert cond.concat[0].abs().sum() > 0
    # every frame sees the same first-frame latent
    assert torch.equal(cond.concat[0, 0], cond.concat[0, 15])


def test_i2vgen_conditions_carry_text_image_and_frame_positions(i2vgen):
    images = torch.rand(2, 3, 32, 32)
    cond = i2vgen.conditions(images, ["a red chair", "a blue car"], 16)
    kwargs = cond.unet_kwargs
    assert kwargs["encoder_hidden_states"].shape == (2, 77, 32)
    assert kwargs["image_embeddings"].shape == (2, 1, 32) and kwargs["fps"].tolist() == [7, 7]
    latents = kwargs["image_latents"]
    assert latents.shape == (2, 4, 16, 8, 8)
    # frames after the first hold their position (i / (F - 1)) as I2VGen-XL's pipeline does
    assert torch.allclose(latents[:, :, 15], torch.ones_like(latents[:, :, 15]))
    assert torch.allclose(latents[:, :, 1], torch.full_like(latents[:, :, 1], 1 / 15))
    # different prompts, different text context; a dropped prompt is the empty prompt
    assert not torch.allclose(kwargs["encoder_hidden_states"][0], kwargs["encoder_hidden_states"][1])
    dropped = i2vgen.conditions(images, ["a red chair", "a blue car"], 16, drop=torch.tensor([True, False]))
    empty = i2vgen.text_embeddings([""])
    assert torch.allclose(dropped.unet_kwargs["encoder_hidden_states"][0], empty[0])
    assert dropped.unet_kwargs["image_embeddings"][0].abs().sum() == 0


def test_edm_objective_inverts_what_the_svd_scheduler_does(svd):
    """Training's preconditioning must be the one the Euler scheduler applies when sampling."""
    scheduler = type(svd.scheduler).from_config(svd.scheduler.config)
    scheduler.set_timesteps(10)
    index = 3
    t, sigma = scheduler.timesteps[index], scheduler.sigmas[index]
    assert float(t) == pytest.approx(0.25 * float(sigma.log()), rel=1e-5)
    scheduler._step_index = index
    sample = torch.randn(1, 2, 4, 8, 8)
    assert torch.allclose(scheduler.scale_model_input(sample, t), sample / (sigma ** 2 + 1).sqrt())
    output = torch.randn_like(sample)
    scheduler._step_index = index
    denoised = scheduler.step(output, t, sample).pred_original_sample
    ours = sample / (sigma ** 2 + 1) - sigma / (sigma ** 2 + 1).sqrt() * output
    assert torch.allclose(denoised, ours, atol=1e-5)
    assert isinstance(objective_for(svd), EDMObjective)


def test_objectives_follow_the_backbones_scheduler(svd, i2vgen):
    objective = objective_for(i2vgen)
    assert isinstance(objective, SchedulerObjective) and objective.prediction_type == "v_prediction"
    frames = torch.rand(1, 16, 3, 32, 32)
    for model in (svd, i2vgen):
        latents = model.encode_frames(frames)
        cond = model.conditions(frames[:, 0], ["x"], 16)
        generator = torch.Generator().manual_seed(0)
        first = objective_for(model).loss(model, latents, cond, generator)
        again = objective_for(model).loss(model, latents, cond, torch.Generator().manual_seed(0))
        assert torch.isfinite(first) and first > 0 and torch.equal(first, again)


@pytest.mark.parametrize("name", ["svd", "i2vgen"])
def test_samples_depend_on_their_own_seed_only(name, request):
    model = request.getfixturevalue(name)
    pipe = OrbitVideoPipeline(model, SamplerSettings(num_inference_steps=3, min_guidance=2.0, max_guidance=3.0))
    images = torch.rand(2, 3, 32, 32)
    both = pipe(images, ["a", "b"], seeds=[5, 6], progress=False)
    alone = pipe(images[1:], ["b"], seeds=[6], progress=False)
    other = pipe(images[1:], ["b"], seeds=[7], progress=False)
    assert both.shape == (2, 16, 3, 32, 32) and both.min() >= 0 and both.max() <= 1
    assert torch.allclose(both[1], alone[0], atol=1e-4)
    assert (other[0] - alone[0]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe(torch.rand(1, 3, 36, 36), ["a"], seeds=[0], progress=False)


def test_folders_round_trip_with_their_conditioning(tmp_path, i2vgen):
    i2vgen.conditioning = Conditioning(fps=12)
    folder = i2vgen.save_pretrained(tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "I2VGenXLUNet"] and index["tokenizer"][1] == "CLIPTokenizer"
    assert "VideoDiffusionModel.from_pretrained(FOLDER)" in (folder / "README.md").read_text()
    weights = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    assert weights and not list(folder.rglob("*.bin")) and not list(folder.glob(".partial-*"))
    loaded = VideoDiffusionModel.from_pretrained(folder)
    assert loaded.conditioning.fps == 12
    assert all(torch.equal(a, b) for a, b in zip(i2vgen.state_dict().values(), loaded.state_dict().values()))
    settings = SamplerSettings(num_inference_steps=2, min_guidance=9.0, max_guidance=9.0)
    images = torch.rand(1, 3, 32, 32)
    assert torch.allclose(OrbitVideoPipeline(i2vgen, settings)(images, ["a"], [1], progress=False),
                          OrbitVideoPipeline(loaded, settings)(images, ["a"], [1], progress=False), atol=1e-5)
    i2vgen.conditioning = Conditioning()


def test_missing_models_say_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("VFUSION3D_CHECKPOINTS", str(tmp_path / "weights"))
    with pytest.raises(FileNotFoundError, match="hf download stabilityai/stable-video-diffusion") as err:
        VideoDiffusionModel.from_pretrained(tmp_path / "nothing")
    assert "\n" not in str(err.value) and f"save it as {tmp_path / 'weights'}" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json missing"):
        VideoDiffusionModel.from_pretrained(tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a repo id is fetched into the Hugging Face cache unless offline
    with pytest.raises(FileNotFoundError, match=r"repo 'someone/not-cached-model' .*`hf download "
                                                r"someone/not-cached-model`"):
        VideoDiffusionModel.from_pretrained("someone/not-cached-model")
    with pytest.raises(FileNotFoundError, match=r"^weights 'svd-xt-pretrained' .* not found: fetch https://"):
        VideoDiffusionModel.from_pretrained("svd-xt-pretrained")
    with pytest.raises(ValueError, match=r"'vfusion3d' .* is not a video model: it loads with LRM\.from_pretrained"):
        (tmp_path / "weights" / "vfusion3d").mkdir(parents=True)
        (tmp_path / "weights" / "vfusion3d" / "vfusion3dckpt").write_bytes(b"x")
        VideoDiffusionModel.from_pretrained("vfusion3d")
    with pytest.raises(ValueError, match="unknown video architecture"):
        VideoDiffusionModel.build("huge")
