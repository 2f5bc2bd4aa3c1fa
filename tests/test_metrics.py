"""3D evaluation: the protocol (views, cameras), the metrics' extremes, CLIP loading, the `evaluate` command."""

import csv

import numpy as np
import pytest
import torch
from torch import nn

from vfusion3d_lightning.cameras import canonical_source_pose
from vfusion3d_lightning.cli import main
from vfusion3d_lightning.commands.evaluate import evaluate
from vfusion3d_lightning.data.procedural import write_assets
from vfusion3d_lightning.data.render_shards import RenderSettings, render_folder
from vfusion3d_lightning.evaluation import (
    CSV_FIELDS,
    PSNR_CAP,
    Evaluator,
    evaluation_views,
    held_out_samples,
    image_scores,
    load_clip,
)
from vfusion3d_lightning.io import on_white
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.renderer import RenderOutput
from vfusion3d_lightning.models.tiny_random import build_tiny_clip
from vfusion3d_lightning.training.losses import build_lpips

SIZE = 24  # shard resolution: SSIM's 11-px window still fits, LPIPS' VGG still has 1 px at its last stage


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 procedural objects rendered as `uniform32` (32 views, cameras, no prompt) in 2-sample shards."""
    root = tmp_path_factory.mktemp("eval_data")
    write_assets(root / "assets", 3, seed=3, progress=False)
    render_folder(root / "assets", root / "uniform32", RenderSettings(views="uniform32", resolution=SIZE),
                  workers=1, shard_size=2, progress=False)
    return str(root / "uniform32" / "shard-*.tar")


@pytest.fixture(scope="module")
def samples(shards):
    return list(held_out_samples(shards))


@pytest.fixture(scope="module")
def lpips_model():
    return build_lpips(random_backbone=True)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP written by save_pretrained, so loading takes the real from_pretrained(path) path."""
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def tiny_lrm(seed: int = 0) -> LRM:
    torch.manual_seed(seed)
    return LRM(LRMConfig.from_name("tiny"))


def relative_poses(poses: torch.Tensor) -> torch.Tensor:
    """(N, 4, 4) -> (N, N, 4, 4): camera j in camera i's frame, which no change of world frame alters."""
    return torch.linalg.inv(poses)[:, None] @ poses[None]


def test_evaluation_views_are_the_samples_views_and_cameras(samples):
    sample = samples[0]
    views = evaluation_views(sample, input_view=5, input_size=SIZE)
    truth = on_white(sample.images)
    assert views["target_images"].shape == (32, 3, SIZE, SIZE)
    torch.testing.assert_close(views["target_images"], truth, atol=1e-6, rtol=0)  # sample order, not reordered
    torch.testing.assert_close(views["input_image"], truth[5], atol=1e-6, rtol=0)
    poses = views["render_cameras"][:, :16].unflatten(-1, (4, 4))
    # the input camera takes the canonical orientation at its own distance; the rig moves rigidly with it
    torch.testing.assert_close(poses[5, :3, :3], canonical_source_pose()[:3, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(poses[5, :3, 3].norm(), torch.tensor(1.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(relative_poses(poses), relative_poses(torch.from_numpy(sample.cam2world)),
                               atol=1e-4, rtol=0)
    k = torch.from_numpy(sample.intrinsics) / torch.tensor([SIZE, SIZE, 1.0])[:, None]
    torch.testing.assert_close(views["render_cameras"][:, 16:].unflatten(-1, (3, 3)), k)
    assert views["source_camera"][12:].tolist() == pytest.approx(k[5, [0, 1, 0, 1], [0, 1, 2, 2]].tolist())
    with pytest.raises(ValueError, match="input view 32 is not one of"):
        evaluation_views(sample, input_view=32)


def test_evaluator_renders_all_views_from_the_ground_truth_cameras(samples, lpips_model):
    model, calls = tiny_lrm(), []
    render = model.render
    model.render = lambda planes, cameras, size, **kw: calls.append(cameras.clone()) or render(planes, cameras,
                                                                                                  size, **kw)
    evaluator = Evaluator(model, lpips_model, input_view=3, input_size=56, views_per_batch=12)
    scores = evaluator.evaluate_sample(samples[1])
    expected = evaluation_views(samples[1], input_view=3, input_size=56)["render_cameras"]
    assert [c.shape[1] for c in calls] == [12, 12, 8]
    torch.testing.assert_close(torch.cat(calls, dim=1)[0], expected)
    assert scores.views == 32 and scores.object_id == samples[1].object_id
    assert 0 < scores.psnr < 60 and -1 <= scores.ssim < 0.999 and scores.lpips > 0
    assert np.isnan(scores.clip_image) and np.isnan(scores.clip_text)  # no CLIP given


def test_evaluator_in_bfloat16_holds_the_network_weights_in_bfloat16(samples, lpips_model):
    model = tiny_lrm()
    evaluator = Evaluator(model, lpips_model, input_view=3, input_size=56, dtype=torch.bfloat16)
    assert model.network_weights_dtype == torch.bfloat16
    assert model.transformer.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    scores = evaluator.evaluate_sample(samples[1])
    assert scores.views == 32 and 0 < scores.psnr < 60


class Oracle(nn.Module):
    """An 'LRM' that renders the ground truth of whichever camera it is given (after `shift` views): it fails
    the test if asked for a camera the sample does not have."""

    def __init__(self, views: dict, shift: int = 0, images: torch.Tensor | None = None):
        super().__init__()
        self.cameras, self.shift = views["render_cameras"], shift
        self.images = views["target_images"] if images is None else images

    def forward(self, image, source_camera):
        return torch.zeros(1, 3, 1, 2, 2)

    def render(self, planes, cameras, size, generator=None, max_rays=None) -> RenderOutput:
        distance = (cameras[0, :, None] - self.cameras[None]).abs().amax(-1)  # (V, N)
        assert bool((distance.amin(1) < 1e-6).all()), "rendered from a camera that is not the sample's"
        index = (distance.argmin(1) + self.shift) % len(self.cameras)
        rgb = self.images[index][None]
        return RenderOutput(rgb=rgb, depth=rgb[:, :, :1], opacity=rgb[:, :, :1])


def test_a_perfect_render_scores_perfectly_and_wrong_ones_worse(samples, lpips_model):
    views = evaluation_views(samples[0], input_size=SIZE)
    other = evaluation_views(samples[2], input_size=SIZE)["target_images"]
    perfect, neighbour, foreign = (
        Evaluator(oracle, lpips_model, input_size=SIZE).evaluate_sample(samples[0])
        for oracle in (Oracle(views), Oracle(views, shift=1), Oracle(views, images=other)))
    assert perfect.views == 32
    assert perfect.psnr == PSNR_CAP  # inf capped: every view identical
    assert perfect.ssim == pytest.approx(1.0, abs=1e-5) and perfect.lpips == pytest.approx(0.0, abs=1e-6)
    for wrong in (neighbour, foreign):
        assert wrong.psnr < 40 and wrong.ssim < 0.95 and wrong.lpips > 1e-3


def test_image_scores_of_identical_and_shifted_images(samples, lpips_model):
    truth = on_white(samples[0].images[:4])
    same = image_scores(truth, truth.clone(), lpips_model)
    assert same == {"psnr": PSNR_CAP, "ssim": pytest.approx(1.0, abs=1e-5), "lpips": pytest.approx(0.0, abs=1e-6)}
    shifted = image_scores(truth.roll(3, dims=-1), truth, lpips_model, chunk=3)
    assert shifted["psnr"] < 35 and shifted["ssim"] < 0.95 and shifted["lpips"] > 1e-3
    with pytest.raises(ValueError, match="must both be"):
        image_scores(truth[:2], truth, lpips_model)


def test_clip_similarity_from_a_saved_folder(clip_dir, samples):
    clip = load_clip(clip_dir)
    image, other = on_white(samples[0].images[:1])[0], on_white(samples[2].images[:1])[0]
    to_image, to_text = clip.similarities(image, torch.stack([image, other, torch.ones_like(image)]), "a red chair")
    assert to_image[0].item() == pytest.approx(1.0, abs=1e-5)
    assert to_image[1] < 1 - 1e-4 and to_image[2] < 1 - 1e-4
    assert to_text.shape == (3,) and bool(((to_text >= -1) & (to_text <= 1)).all())
    _, to_other_text = clip.similarities(image, image[None], "a blue table with four legs")
    assert to_other_text.item() != pytest.approx(to_text[0].item(), abs=1e-6)
    assert clip.similarities(image, image[None])[1] is None


def test_missing_clip_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)no such folder.*hf download openai/clip-vit-large-patch14"):
        load_clip(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)CLIP model .*\(a folder without the config.*--clip none"):
        load_clip(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"(?s)not in the local cache.*hf download"):
        load_clip("nobody-here/no-such-clip-model")


def test_evaluate_command_compares_checkpoints(tmp_path, shards, clip_dir):
    model = tiny_lrm(seed=1)
    folder = model.save_pretrained(tmp_path / "tiny_export")
    ckpt = tmp_path / "last.ckpt"  # the parts of an LRMModule checkpoint that evaluation reads
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"network": model.config.to_dict()}}, ckpt)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint+", str(folder), "--checkpoint+", str(ckpt), "--shards", shards, "--out",
                 str(out), "--clip", str(clip_dir), "--lpips_random_backbone", "true", "--max_objects", "2",
                 "--input_size", "56", "--render_size", "16", "--device", "cpu"]) == 0
    tables = {}
    for name in ("tiny_export", "last"):
        with open(out / name / "objects.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert tuple(rows[0]) == CSV_FIELDS and len(rows) == 2
        assert [r["views"] for r in rows] == ["32", "32"] and all(r["clip_text"] == "nan" for r in rows)
        assert all(np.isfinite(float(r[m])) for r in rows for m in ("psnr", "ssim", "lpips", "clip_image"))
        tables[name] = rows
    assert tables["tiny_export"] == tables["last"]  # the .ckpt loads the same weights as the folder
    summary = (out / "summary.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in summary[2:4]] == ["tiny_export", "last"]
    assert "| 2 | 32 |" in summary[2] and " ± " in summary[2]
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["clip_image.png", "lpips.png", "psnr.png", "ssim.png"]  # no prompts: no CLIP text values
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_evaluate_command_fails_early_without_clip(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match=r"CLIP model '.*no_clip' \(no such folder\) not found: fetch "):
        evaluate([str(tmp_path / "never_loaded")], shards, tmp_path / "o", clip=str(tmp_path / "no_clip"),
                 lpips_random_backbone=True, device="cpu")
    assert not (tmp_path / "o").exists()
