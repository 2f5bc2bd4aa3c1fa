"""3D evaluation: the protocol (input views, cameras, novel views only), the metrics' extremes, CLIP loading, the
geometry track, the `evaluate` command."""

import csv
import math

import numpy as np
import pytest
import torch
import trimesh
from test_mesh import THRESHOLD, sphere_model
from torch import nn

from vfusion3d_lightning.cameras import canonical_source_pose
from vfusion3d_lightning.cli import main
from vfusion3d_lightning.commands.evaluate import evaluate
from vfusion3d_lightning.data.procedural import write_assets
from vfusion3d_lightning.data.render import load_asset
from vfusion3d_lightning.data.render_shards import RenderSettings, render_folder
from vfusion3d_lightning.evaluation import (
    BASELINE,
    CSV_FIELDS,
    PSNR_CAP,
    Evaluator,
    GroundTruthMeshes,
    ObjectScores,
    constant_background_scores,
    evaluation_views,
    held_out_samples,
    image_scores,
    load_clip,
    opacity_iou,
    seeded_input_view,
    summary_tables,
)
from vfusion3d_lightning.geometry.mesh import density_grid, suggest_threshold
from vfusion3d_lightning.io import on_white
from vfusion3d_lightning.models.lrm import LRM, LRMConfig
from vfusion3d_lightning.models.lrm.renderer import RenderOutput
from vfusion3d_lightning.models.tiny_random import build_tiny_clip
from vfusion3d_lightning.training.losses import build_lpips

SIZE = 24  # shard resolution: SSIM's 11-px window still fits, LPIPS' VGG still has 1 px at its last stage


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """3 procedural objects and a sphere (sorted last): the held-out assets."""
    folder = tmp_path_factory.mktemp("eval_data") / "assets"
    write_assets(folder, 3, seed=3, progress=False)
    trimesh.creation.icosphere(subdivisions=3, radius=0.8).export(folder / "sphere.ply")
    return folder


@pytest.fixture(scope="module")
def shards(assets):
    """The assets rendered as `uniform32` (32 views, cameras, no prompt) in 2-sample shards."""
    out = assets.parent / "uniform32"
    render_folder(assets, out, RenderSettings(views="uniform32", resolution=SIZE), workers=1, shard_size=2,
                  progress=False)
    return str(out / "shard-*.tar")


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
    assert [c.shape[1] for c in calls] == [12, 12, 7]  # the 31 views other than the input one
    torch.testing.assert_close(torch.cat(calls, dim=1)[0], expected[[i for i in range(32) if i != 3]])
    assert scores.views == 31 and scores.object_id == samples[1].object_id and scores.input_view == 3
    assert 0 < scores.psnr < 60 and -1 <= scores.ssim < 0.999 and scores.lpips > 0
    assert np.isnan(scores.clip_image) and np.isnan(scores.clip_text)  # no CLIP given


def test_evaluator_in_bfloat16_holds_the_network_weights_in_bfloat16(samples, lpips_model):
    model = tiny_lrm()
    evaluator = Evaluator(model, lpips_model, input_view=3, input_size=56, dtype=torch.bfloat16)
    assert model.network_weights_dtype == torch.bfloat16
    assert model.transformer.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    scores = evaluator.evaluate_sample(samples[1])
    assert scores.views == 31 and 0 < scores.psnr < 60


class Oracle(nn.Module):
    """An 'LRM' that renders the ground truth of whichever camera it is given (after `shift` views): it fails
    the test if asked for a camera the sample does not have."""

    def __init__(self, views: dict, shift: int = 0, images: torch.Tensor | None = None):
        super().__init__()
        self.cameras, self.shift = views["render_cameras"], shift
        self.images = views["target_images"] if images is None else images
        self.masks = views["target_masks"] if images is None else images[:, :1] < 0.99  # not white: the object
        self.asked: list[int] = []  # the views it was asked to render

    def forward(self, image, source_camera):
        return torch.zeros(1, 3, 1, 2, 2)

    def render(self, planes, cameras, size, generator=None, max_rays=None) -> RenderOutput:
        distance = (cameras[0, :, None] - self.cameras[None]).abs().amax(-1)  # (V, N)
        assert bool((distance.amin(1) < 1e-6).all()), "rendered from a camera that is not the sample's"
        self.asked += distance.argmin(1).tolist()
        index = (distance.argmin(1) + self.shift) % len(self.cameras)
        rgb = self.images[index][None]
        return RenderOutput(rgb=rgb, depth=rgb[:, :, :1], opacity=self.masks[index][None].float())


def test_a_perfect_render_scores_perfectly_and_wrong_ones_worse(samples, lpips_model):
    views = evaluation_views(samples[0], input_size=SIZE)
    other = evaluation_views(samples[2], input_size=SIZE)["target_images"]
    perfect, neighbour, foreign = (
        Evaluator(oracle, lpips_model, input_view=0, input_size=SIZE).evaluate_sample(samples[0])
        for oracle in (Oracle(views), Oracle(views, shift=1), Oracle(views, images=other)))
    assert perfect.views == 31
    assert perfect.psnr == PSNR_CAP  # inf capped: every view identical
    assert perfect.ssim == pytest.approx(1.0, abs=1e-5) and perfect.lpips == pytest.approx(0.0, abs=1e-6)
    for wrong in (neighbour, foreign):
        assert wrong.psnr < 40 and wrong.ssim < 0.95 and wrong.lpips > 1e-3


def test_the_constant_background_is_scored_beside_and_a_perfect_render_beats_it(samples, lpips_model):
    views = evaluation_views(samples[0], input_size=SIZE)
    perfect, foreign = (Evaluator(oracle, lpips_model, input_view=0, input_size=SIZE).evaluate_sample(samples[0])
                        for oracle in (Oracle(views), Oracle(views, images=evaluation_views(
                            samples[2], input_size=SIZE)["target_images"])))
    assert perfect.opacity_iou == 1.0 and perfect.value("baseline_opacity_iou") == 0.0  # the objects are not empty
    assert perfect.psnr > perfect.value("baseline_psnr") + 20 and perfect.ssim > perfect.value("baseline_ssim")
    assert perfect.lpips < perfect.value("baseline_lpips")
    assert 0 < foreign.opacity_iou < 0.9  # another object's silhouette overlaps, not fully
    assert foreign.baseline == perfect.baseline  # the same views: the same baseline, whatever the LRM renders
    # by hand: the white image against the 31 novel views' ground truth, PSNR per view then the mean
    truth = views["target_images"][1:]
    by_hand = (10 * torch.log10(1 / ((1 - truth) ** 2).mean(dim=(1, 2, 3)))).mean().item()
    assert perfect.value("baseline_psnr") == pytest.approx(by_hand, abs=1e-4)
    assert 3 < by_hand < 40  # a small object on white: the constant background is not a weak straw man


def test_opacity_iou_by_hand():
    alpha = torch.zeros(2, 1, 4, 4)
    alpha[0, 0, :2, :2] = 1.0  # 4 pixels of the object in view 0, none in view 1
    opacity = torch.zeros(2, 1, 4, 4)
    opacity[0, 0, 1:3, 1:3] = 0.7  # 4 pixels: 1 shared, 7 in the union
    opacity[1, 0, 0, 0] = 0.4  # below the level: not counted
    assert opacity_iou(opacity, alpha) == pytest.approx(1 / 7)
    assert opacity_iou(alpha, alpha) == 1.0 and opacity_iou(torch.zeros_like(alpha), alpha) == 0.0
    assert opacity_iou(torch.zeros_like(alpha), torch.zeros_like(alpha)) == 1.0  # both empty: they agree
    with pytest.raises(ValueError, match="same shape"):
        opacity_iou(opacity[:1], alpha)


def test_constant_background_scores_of_a_white_view_are_perfect(lpips_model):
    white, alpha = torch.ones(2, 3, SIZE, SIZE), torch.zeros(2, 1, SIZE, SIZE)
    scores = constant_background_scores(white, alpha, lpips_model)
    assert scores["psnr"] == PSNR_CAP and scores["opacity_iou"] == 1.0
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-5) and scores["lpips"] == pytest.approx(0.0, abs=1e-6)


def test_the_summary_puts_the_constant_background_under_the_checkpoints():
    def scores(object_id: str, psnr: float, iou: float) -> ObjectScores:
        return ObjectScores(object_id, psnr, 0.5, 0.2, opacity_iou=iou, views=31,
                            baseline={"psnr": 10.0, "ssim": 0.8, "lpips": 0.3, "opacity_iou": 0.0})

    results = {"pretrained": [scores("a", 11.0, 0.1), scores("real_b", 13.0, 0.3)],
               "finetuned": [scores("a", 14.0, 0.5), scores("real_b", 16.0, 0.7)]}
    image, _ = summary_tables(results)
    assert image[0][:7] == ["checkpoint", "objects", "views", "PSNR ↑", "SSIM ↑", "LPIPS ↓", "opacity IoU ↑"]
    names = [row[0] for row in image[1:]]
    assert names == ["pretrained", "pretrained: other", "pretrained: real", "finetuned", "finetuned: other",
                     "finetuned: real", BASELINE, f"{BASELINE}: other", f"{BASELINE}: real"]
    assert image[4][3:7] == ["15.00 ± 1.41", "0.5000 ± 0.0000", "0.2000 ± 0.0000", "0.6000 ± 0.1414"]
    assert image[7][3:7] == ["10.00 ± 0.00", "0.8000 ± 0.0000", "0.3000 ± 0.0000", "0.0000 ± 0.0000"]
    assert image[7][7:] == ["n/a", "n/a"]  # no CLIP scores for the background


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


def test_evaluate_command_compares_checkpoints(tmp_path, shards, samples, clip_dir, capsys):
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
        assert all(0 <= float(r["opacity_iou"]) <= 1 and float(r["baseline_opacity_iou"]) == 0 for r in rows)
        assert all(3 < float(r["baseline_psnr"]) < 40 and float(r["baseline_lpips"]) > 0 for r in rows)
        assert [r["views"] for r in rows] == ["31", "31"] and all(r["clip_text"] == "nan" for r in rows)
        assert all(np.isfinite(float(r[m])) for r in rows for m in ("psnr", "ssim", "lpips", "clip_image"))
        assert [int(r["input_view"]) for r in rows] == [seeded_input_view(0, s.object_id, 32) for s in samples[:2]]
        assert all(r[m] == "nan" for r in rows for m in ("chamfer", "fscore@0.1", "fscore@0.5", "mesh_seconds"))
        tables[name] = rows
    assert tables["tiny_export"] == tables["last"]  # the .ckpt loads the same weights as the folder
    summary = (out / "summary.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in summary[2:4]] == ["tiny_export", "last"]
    assert "| 2 | 31 |" in summary[2] and " ± " in summary[2]
    assert summary[4].startswith(f"| {BASELINE} | 2 | 31 |") and summary[4].count("n/a") == 2  # no CLIP for it
    assert [line.split("|")[1:4] for line in summary[8:10]] == [[" tiny_export ", " 0/2 ", " 0 "],
                                                                [" last ", " 0/2 ", " 0 "]]
    assert summary[8].count("n/a") == 5  # no assets: nothing measured
    assert any(line.startswith("last: PSNR ") and "dB over the constant background, opacity IoU" in line
               for line in summary)
    assert capsys.readouterr().err.count("no --assets: geometry metrics are n/a") == 1  # said once
    plots = sorted(p.name for p in (out / "plots").iterdir())
    # no prompts: no CLIP text values
    assert plots == ["clip_image.png", "lpips.png", "opacity_iou.png", "psnr.png", "ssim.png"]
    assert all((out / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)


def test_evaluate_command_fails_early_without_clip(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match=r"CLIP model '.*no_clip' \(no such folder\) not found: fetch "):
        evaluate([str(tmp_path / "never_loaded")], shards, tmp_path / "o", clip=str(tmp_path / "no_clip"),
                 lpips_random_backbone=True, device="cpu")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- input views: chosen per object, not scored


def test_the_input_view_is_not_scored(samples, lpips_model):
    """An 'LRM' right only on the input view scores exactly as one wrong everywhere: that view is not counted,
    nor rendered."""
    views = evaluation_views(samples[0], input_view=9, input_size=SIZE)
    foreign = evaluation_views(samples[2], input_size=SIZE)["target_images"]
    right_on_input = foreign.clone()
    right_on_input[9] = views["target_images"][9]
    oracles = [Oracle(views, images=right_on_input), Oracle(views, images=foreign)]
    scores = [Evaluator(o, lpips_model, input_view=9, input_size=SIZE).evaluate_sample(samples[0]) for o in oracles]
    assert scores[0].views == 31 and scores[0].input_view == 9
    assert (scores[0].psnr, scores[0].ssim, scores[0].lpips) == (scores[1].psnr, scores[1].ssim, scores[1].lpips)
    assert 9 not in oracles[0].asked and sorted(oracles[0].asked) == [i for i in range(32) if i != 9]
    assert views["scored_views"].tolist() == [i for i in range(32) if i != 9]


def test_seeded_input_views_are_reproducible_and_differ_across_objects(samples, lpips_model):
    ids = [f"object_{i}" for i in range(20)]
    chosen = [seeded_input_view(0, i, 32) for i in ids]
    assert chosen == [seeded_input_view(0, i, 32) for i in ids]  # the same on a rerun
    assert len(set(chosen)) > 5 and all(0 <= v < 32 for v in chosen)
    assert chosen != [seeded_input_view(1, i, 32) for i in ids]  # another seed, other views
    seeded = Evaluator(Oracle(evaluation_views(samples[1], input_size=SIZE)), lpips_model, input_size=SIZE, seed=4)
    views = seeded.views(samples[1])
    assert views["input_view"] == seeded_input_view(4, samples[1].object_id, 32)
    torch.testing.assert_close(views["input_image"], on_white(samples[1].images)[views["input_view"]], atol=1e-6,
                               rtol=0)


# ---------------------------------------------------------------- geometry


class FixedPlanes(nn.Module):
    """An LRM whose encoder gives the same planes for every image: the sphere field of test_mesh."""

    def __init__(self):
        super().__init__()
        self.lrm, planes = sphere_model()
        self.register_buffer("fixed", planes)

    def forward(self, image, source_camera):
        return self.fixed.expand(len(image), *self.fixed.shape[1:])

    def render(self, *args, **kwargs):
        return self.lrm.render(*args, **kwargs)

    def query(self, *args, **kwargs):
        return self.lrm.query(*args, **kwargs)


def test_a_sphere_field_matches_the_sphere_asset_and_not_the_others(samples, assets, lpips_model):
    evaluator = Evaluator(FixedPlanes(), lpips_model, input_size=SIZE, ground_truth=GroundTruthMeshes(assets),
                          mesh_resolution=32, mesh_threshold=THRESHOLD)
    sphere, other = (evaluator.evaluate_sample(s) for s in (samples[3], samples[0]))
    assert sphere.object_id == "sphere" and samples[3].extra["asset"] == "sphere.ply"
    assert sphere.chamfer < 0.01 and sphere.fscore == {0.1: 1.0, 0.2: 1.0, 0.5: 1.0}
    assert not sphere.no_surface and 0 < sphere.mesh_seconds < 60
    assert other.chamfer > 3 * sphere.chamfer and other.fscore[0.1] < 0.99
    row = sphere.row()
    assert [float(row[m]) for m in ("fscore@0.1", "fscore@0.2", "fscore@0.5")] == [1.0, 1.0, 1.0]
    assert float(row["chamfer"]) == pytest.approx(sphere.chamfer, rel=1e-5) and row["no_surface"] == "false"


def test_the_mesh_is_compared_in_the_world_frame_of_the_renders(samples, assets, lpips_model):
    """A prediction that is the asset itself, seen from a camera 45 degrees up (in the LRM's canonical frame of
    that camera, LRM units), matches it: the frame is undone before the metrics (whose rotation search does not
    try 45 degree tilts)."""
    sample = samples[0]
    truth = load_asset(assets / sample.extra["asset"])
    pose = torch.from_numpy(sample.cam2world[20]).double()
    assert math.degrees(math.asin(pose[2, 3] / pose[:3, 3].norm())) == pytest.approx(45, abs=0.1)
    to_canonical = canonical_source_pose()[:3, :3].double() @ pose[:3, :3].T

    class AssetAsSeen(Evaluator):
        def mesh(self, planes):
            return trimesh.Trimesh(2 * truth.vertices @ to_canonical.numpy().T, truth.faces, process=False)

    evaluator = AssetAsSeen(FixedPlanes(), lpips_model, input_view=20, input_size=SIZE,
                            ground_truth=GroundTruthMeshes(assets))
    scores = evaluator.evaluate_sample(sample)
    assert scores.chamfer < 1e-4 and scores.fscore[0.1] == 1.0


def test_no_surface_at_the_threshold_is_nan_counted_and_suggests_a_level(samples, assets, lpips_model):
    lines: list[str] = []
    evaluator = Evaluator(FixedPlanes(), lpips_model, input_size=SIZE, ground_truth=GroundTruthMeshes(assets),
                          mesh_resolution=16, mesh_threshold=1e6, log=lines.append)
    scores = evaluator.evaluate_sample(samples[3])
    assert scores.no_surface and math.isnan(scores.chamfer) and scores.fscore == {} and scores.mesh_seconds > 0
    assert len(lines) == 1 and "sphere: no mesh: no surface at density threshold 1000000" in lines[0]
    assert "e.g." in lines[0] and lines[0].endswith("(--mesh_threshold)")
    assert scores.row()["no_surface"] == "true" and scores.row()["fscore@0.1"] == "nan"


def test_no_threshold_meshes_each_object_at_its_median_density(samples, assets, lpips_model):
    """mesh_threshold None (the quickstart's): a level every field has, where a fixed one may have none."""
    evaluator = Evaluator(FixedPlanes(), lpips_model, input_size=SIZE, ground_truth=GroundTruthMeshes(assets),
                          mesh_resolution=24, mesh_threshold=None)
    scores = evaluator.evaluate_sample(samples[3])
    assert not scores.no_surface and 0 < scores.chamfer < 0.2 and scores.fscore[0.5] == 1.0


def test_an_object_without_its_asset_is_refused(tmp_path, samples):
    trimesh.creation.box().export(tmp_path / "box.ply")
    meshes = GroundTruthMeshes(tmp_path)
    assert meshes.path("box") == tmp_path / "box.ply" == meshes.path("box", "box.ply")
    outside = tmp_path.parent / f"{tmp_path.name}_outside.ply"
    trimesh.creation.box().export(outside)
    assert meshes.path("box", f"../{outside.name}") == tmp_path / "box.ply"  # a recorded path stays inside
    with pytest.raises(FileNotFoundError, match=r"no asset for object 'sphere' in .*--assets must be the folder"):
        meshes.path("sphere", "sphere.ply")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no assets"):
        GroundTruthMeshes(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GroundTruthMeshes(tmp_path / "absent")


def test_evaluate_command_scores_geometry_with_assets(tmp_path, shards, assets, capsys):
    model = tiny_lrm(seed=1)
    folder = model.save_pretrained(tmp_path / "tiny")
    views = evaluation_views(next(iter(held_out_samples(shards))), seeded_input_view(0, "asset_000000", 32), 56)
    with torch.no_grad():  # a level the random field crosses, as the no-surface warning would suggest
        planes = model(views["input_image"][None], views["source_camera"][None])
        level = suggest_threshold(density_grid(model, planes, 24), 0.5)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint+", str(folder), "--shards", shards, "--out", str(out), "--clip", "none",
                 "--lpips_random_backbone", "true", "--max_objects", "1", "--input_size", "56", "--render_size", "16",
                 "--device", "cpu", "--assets", str(assets), "--mesh_resolution", "24",
                 "--mesh_threshold", str(level)]) == 0
    with open(out / "tiny" / "objects.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["object_id"] == "asset_000000" and row["no_surface"] == "false" and row["views"] == "31"
    geometry = [float(row[m]) for m in ("chamfer", "fscore@0.1", "fscore@0.2", "fscore@0.5", "mesh_seconds")]
    assert all(np.isfinite(geometry)) and 0 < geometry[0] < 1 and all(0 <= f <= 1 for f in geometry[1:4])
    summary = (out / "summary.md").read_text()
    assert "| tiny | 1/1 | 0 |" in summary and "Chamfer ↓" in summary
    assert {"chamfer.png", "fscore_0.1.png", "fscore_0.5.png"} <= {p.name for p in (out / "plots").iterdir()}
    assert "no --assets" not in capsys.readouterr().err


def test_evaluate_takes_the_pipelines_arguments_and_skips_geometry_on_request(tmp_path, shards, capsys):
    folder = tiny_lrm().save_pretrained(tmp_path / "tiny")
    kwargs = dict(clip="none", lpips_weights=None, lpips_random_backbone=True, max_objects=1, input_size=56,
                  render_size=16, views_per_batch=16, device="cpu", seed=0)  # what the pipeline's stage passes
    results = evaluate([str(folder)], shards, tmp_path / "with", **kwargs)
    assert math.isnan(results["tiny"][0].chamfer) and "no --assets" in capsys.readouterr().err
    results = evaluate([str(folder)], shards, tmp_path / "without", geometry=False, **kwargs)
    assert "no --assets" not in capsys.readouterr().err
    assert "Chamfer" not in (tmp_path / "without" / "summary.md").read_text()
    assert "Chamfer" in (tmp_path / "with" / "summary.md").read_text()


def test_checkpoint_names_stay_inside_the_output_folder(tmp_path, monkeypatch):
    from vfusion3d_lightning.evaluation import checkpoint_names

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    names = checkpoint_names(["..", ".", "run/..", "a/b/last.ckpt", "a/c/last.ckpt", ".hidden"])
    assert names == [tmp_path.parent.name, tmp_path.name, tmp_path.name + "-2", "last", "last-2", "hidden"]
    assert all(name and "/" not in name and not name.startswith(".") for name in names)
