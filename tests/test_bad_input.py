"""The bad-input suite: each bad input, through the entry points a user hits, gives a clear
error (its type, and a message naming the input and saying what to do) or a counted skip, and the outputs and
checkpoints already beside it stay byte-identical (hashed before and after).

Inventory: case -> entry point: code that handles it -> test(s). "here" is this file.

1. Corrupt or truncated shards
   - training stream (data/datamodules.py ShardStream._raw_samples, on_error "skip"): skipped, logged, counted
     per epoch -> here test_a_cut_shard_is_a_counted_skip_in_training_and_named_when_counting; a cut view inside
     a whole tar: tests/data/test_datamodules.py::test_bad_samples_are_skipped_and_counted_or_raised
   - counting samples from tar headers (datamodules.count_samples -> schema.keys_in_shards): ShardError naming
     the shard -> here, same test
   - `evaluate` (commands/evaluate.py -> count_samples; evaluation.held_out_samples -> schema.read_samples):
     ShardError before any model loads -> here test_a_cut_shard_stops_evaluate_before_any_model_loads
   - `filter`, `label` (data/curate_shards.py _run): ShardError, the shards done are kept -> here
     test_curation_names_a_bad_input_shard_and_keeps_what_it_wrote[cut-*]
   - `label-ui` (commands/label_ui._index_shards): ShardError -> here
     test_a_cut_shard_stops_the_labelling_page_naming_it
   - feature caching (training/features.py ShardFrames): SampleError naming the shard ->
     tests/training/test_curation.py::test_unreadable_shards_are_named
   - `render`, `generate` resuming into a folder with a corrupt complete shard (schema.resume_shard_folder):
     ShardError, the file is left as it is -> here
     test_a_corrupt_shard_in_a_render_output_folder_is_named_not_deleted (generate shares the code)
   - writers never publish a cut shard: schema.ShardWriter (.tar.partial) -> tests/data/test_schema.py::
     test_a_full_disk_mid_shard_publishes_no_cut_shard, tests/data/test_generate_shards.py::
     test_an_interrupted_run_resumes_writing_each_prompt_exactly_once; schema.write_shard -> case 9
2. Missing keys
   - a sample without its .json, a view file or a metadata field (schema.decode_sample): SampleError ->
     tests/data/test_schema.py::test_bad_samples_say_precisely_what_is_wrong; in training a counted skip -> here
     test_bad_samples_are_skipped_counted_and_named_in_training[lrm, video]
   - `filter` on a sample without .json (curate_shards.filter_shards): SampleError;
     `label` (decode_sample): SampleError, saying which shard to mend -> here
     test_curation_names_a_bad_input_shard_and_keeps_what_it_wrote[no_json-*]
   - a sample without cached features: `filter` names it and the command to encode again; `label` counts it
     without elevation (label_report.json) -> here
     test_a_sample_without_cached_features_is_named_by_filter_and_counted_by_label
   - a sample without cameras: skipped in LRM training -> tests/data/test_datamodules.py (as above)
   - state dicts missing keys (hub.load_state_into, ElevationMLP, LPIPS's VGG) -> case 7
3. Wrong image sizes
   - views unlike the metadata's width and height (decode_sample): SampleError -> tests/data/test_schema.py
     (as above); in training a counted skip -> here test_bad_samples_are_skipped_counted_and_named_in_training
   - feature caching of a shard mixing video sizes (training/features.py ShardFrames): SampleError naming both
     samples -> here
     test_frames_of_different_sizes_in_one_shard_are_named_by_feature_caching
   - frames off the video model's latent grid (VideoDiffusionModel.check_frames) -> tests/models/
     test_video_model.py::test_samples_depend_on_their_own_seed_only, tests/training/test_video_module.py::
     test_bad_settings_are_named
   - curation features of another width (QualitySVM.score, ElevationModule) -> tests/training/test_curation.py::
     test_quality_svm_refuses_foreign_files, test_elevation_mlp_beats_the_mean_on_held_out_objects
   - rendered and ground-truth views of different shapes (evaluation.image_scores) -> tests/test_metrics.py::
     test_image_scores_of_identical_and_shifted_images
   - input images (preprocess.load_image): every PNG mode read as its values (16-bit, float, palette, LA, CMYK);
     images under 16 px a side refused, and images over the pixel cap refused from the header before decoding
     (decompression bombs) -> tests/test_images.py; shard views larger than their metadata or the cap: the same,
     from the header -> tests/test_images.py
   - metadata fields of the wrong type (a list as the JSON, `"quality": "high"`, a dict prompt): SampleError
     naming the field, so training's skip sees it -> tests/data/test_schema.py
4. NaN or inf cameras
   - shard cameras (schema._check_sample): SampleError -> tests/data/test_schema.py (as above); in training a
     counted skip -> here test_bad_samples_are_skipped_counted_and_named_in_training; `evaluate` stops naming
     the sample and its shard -> here
     test_nan_cameras_stop_evaluate_naming_the_sample
   - the LRM's source camera (LRM.forward) -> tests/models/test_lrm_model.py::
     test_missing_inputs_give_clear_errors; render cameras (renderer.camera_rays) -> here
     test_nan_cameras_are_refused_by_the_renderers; camera helpers (cameras.py) -> tests/test_cameras.py::
     test_nan_pose_is_refused; MeshRenderer.render refuses non-finite poses (data/render.py), untested
   - `label` derives cameras from elevations estimated from cached features: NaN features are refused where
     they are read (data/feature_cache.read_features, also for filter and the curation DataModule) -> here
     test_nan_features_would_give_nan_cameras_and_are_named_by_label
5. Empty meshes
   - `render` (data/render.load_asset: no faces, NaN vertices, a single point; render_shards.render_folder):
     counted in render_report.json, earlier shards untouched -> here
     test_meshes_without_faces_are_counted_in_the_render_report; unit: tests/data/test_render.py::
     test_load_asset_rejects_bad_files; a broken OBJ counted: tests/data/test_render_shards.py::
     test_assets_render_to_shards_that_feed_both_datamodules
   - `infer` with no surface at the threshold (mesh.extract_mesh): a warning naming the image, with the
     density range and a suggested threshold; input and turntable kept, exit 0 -> here
     test_an_empty_mesh_names_the_image_and_the_threshold_to_pick; unit: tests/test_mesh.py::
     test_empty_field_raises_with_threshold_and_range
6. Unreadable images
   - `infer` (preprocess.load_image): ValueError naming the file, now saying what to do -> here
     test_an_unreadable_image_stops_infer_naming_it; unit: tests/test_preprocess.py::
     test_missing_rembg_or_inputs_give_clear_errors (also the empty mask, which infer now names the image of)
   - `generate` (training/generation.PlannedShards): counted in generate_report.json -> here
     test_an_unreadable_condition_image_is_counted_in_the_generate_report
   - undecodable views in shards (decode_sample): SampleError, a counted skip in training ->
     tests/data/test_schema.py, tests/data/test_datamodules.py (as above)
7. A checkpoint of the wrong model -> here test_a_checkpoint_of_the_wrong_model_is_named, one case each:
   - `infer --checkpoint` an elevation MLP folder (LRMConfig.load)
   - `evaluate --checkpoint` another module's .ckpt (LRM.from_pretrained: hub.read_lightning_checkpoint)
   - `evaluate --lpips_weights` not VGG16 (losses.build_lpips)
   - `generate --model` an LRMModule .ckpt (VideoDiffusionModel.from_pretrained)
   - `filter --svm` a weights file (QualitySVM.from_pretrained)
   - `label --elevation` an LRM folder (ElevationMLP.from_pretrained); a folder pairing one MLP's config with
     another's weights
   - LRMModule(pretrained=) a video .ckpt (hub.read_lightning_checkpoint) and
     LRM.load_encoder_weights(an MLP's weights) (hub.load_state_into)
   - elsewhere: unreadable weights -> tests/models/test_lrm_model.py::test_missing_inputs_give_clear_errors,
     tests/test_inference.py::test_missing_or_wrong_checkpoints_are_clear; released names ->
     tests/models/test_lrm_convert.py::test_released_names_with_a_wrapper_prefix_and_wrong_names; a registry
     file with another digest -> tests/models/test_lrm_model.py::test_registry_names_resolve_to_files_with_clear_
     errors; a foreign skops file -> tests/training/test_curation.py::test_quality_svm_refuses_foreign_files; a
     foreign MLP config -> tests/training/test_curation.py::test_elevation_mlp_folder_round_trip_and_errors; a video
     checkpoint of another configuration -> tests/training/test_video_module.py::
     test_checkpoints_over_a_pretrained_base_hold_only_trained_weights
8. A tampered pickle (a payload whose unpickling creates a marker file; each test first shows the payload runs
   under an unsafe load, then that the loader refuses it and the marker never appears) -> here
   test_a_tampered_pickle_is_refused_never_run, one case each:
   - torch files through registry.load_state_file (torch.load weights_only=True): `infer --checkpoint x.pt`,
     `evaluate --checkpoint x.ckpt` (LRM.from_pretrained), LRMModule pretrained=x.ckpt,
     LRM.load_encoder_weights;
     LRM.from_pretrained(a file without suffix) -> tests/models/test_lrm_model.py::
     test_a_tampered_pickle_is_refused_not_executed
   - `evaluate --lpips_weights x.pth` (build_lpips) and `generate --model x.ckpt`
     (VideoDiffusionModel.from_pretrained, hub.read_lightning_checkpoint) now through
     load_state_file
   - `fit --ckpt_path x.ckpt` (Lightning's resume, torch's default weights_only=True: torch >= 2.6 is now
     required by pyproject.toml)
   - `filter --svm` a pickle (QualitySVM.from_pretrained) or a skops file naming a
     foreign type
     (skops' untrusted types)
   - an elevation MLP folder whose model.safetensors is a pickle (safetensors only)
   - not covered: diffusers and transformers folders (`generate --model` a folder, CLIP, the prompt LLM) load
     by those libraries' own rules
9. A full disk while writing outputs, simulated by full_disk() below (RLIMIT_FSIZE 0: every write of any
   writer fails, as on a full disk) or by a write that dies half-way with ENOSPC
   - every single-file output goes through io.atomic_write -> tests/test_io.py::
     test_a_failed_write_leaves_the_existing_file_whole; `infer` rerun over its earlier outputs -> here
     test_a_full_disk_leaves_earlier_infer_outputs_whole
   - shards: schema.ShardWriter (render) -> tests/data/test_schema.py (as in 1); `generate`, `filter`, `label`
     (schema.write_shard) -> here
     test_a_full_disk_during_curation_keeps_earlier_shards_and_report[filter, label]
   - model folders: the save_pretrained of LRM (LRMModule.export), ElevationMLP, QualitySVM and
     VideoDiffusionModel write every file before replacing any (io.atomic_write_folder) -> here
     test_a_full_disk_while_saving_models_leaves_the_old_ones_whole
   - Lightning's checkpoints (last.ckpt) are written by Lightning's _atomic_save (an fsspec transaction):
     checked by hand, not tested here
10. Files made to attack, and unlucky runs
   - a skops file whose FunctionTransformer gadget would run a command (models/curation/quality.py: exact
     allow-list of the types `save` writes) -> tests/test_security.py
   - `pipe:` shard URLs (datamodules.check_shard_urls) -> tests/data/test_datamodules.py
   - label-ui: cross-origin and text/plain writes, foreign Host, odd field types, big bodies, a cut labels.jsonl
     -> tests/test_label_ui.py
   - two runs into one output folder (io.folder_lock) -> tests/test_locks.py
   - an asset that kills or hangs its rendering process (render_shards: isolated, recorded, skipped on rerun;
     bounded results in flight) -> tests/data/test_render_faults.py
   - what the real command prints for each user error (one line, exit 2) -> tests/test_command_errors.py
   - the pipeline SIGKILLed at 5 seeded moments and resumed: outputs equal an uninterrupted run's, no partial
     file left -> tests/test_pipeline.py; a fit resumed mid-epoch trains on the same batches ->
     tests/data/test_exact_resume.py
"""

import contextlib
import errno
import hashlib
import io
import json
import logging
import pickle
import re
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors import SafetensorError

from vfusion3d_lightning.cameras import Intrinsics, orbit_azimuths, orbit_poses
from vfusion3d_lightning.cli import main
from vfusion3d_lightning.data.datamodules import MultiViewDataModule, VideoDataModule
from vfusion3d_lightning.data.feature_cache import cache_path, write_features
from vfusion3d_lightning.data.schema import (
    MultiViewSample,
    SampleError,
    ShardWriter,
    complete_shards,
    encode_sample,
    read_samples,
)
from vfusion3d_lightning.models.curation.elevation import ElevationMLP
from vfusion3d_lightning.models.curation.quality import FORMAT as SVM_FORMAT
from vfusion3d_lightning.models.curation.quality import QualitySVM
from vfusion3d_lightning.models.lrm import LRM, LRMConfig

ROOT = Path(__file__).resolve().parents[1]
TAG = "tiny-random"  # feature tag of the random curation features below
DIM = 8  # their width


# ---------------------------------------------------------------- helpers


def digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (files or folders): equal before and after means byte-identical,
    and no file appeared or vanished (a left-over temporary file counts)."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def make_sample(key: str, views: int = 4, size: int = 16, cameras: bool = True,
                source: str = "3d") -> MultiViewSample:
    images = np.zeros((views, size, size, 4), np.uint8)
    images[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (200, 60, 30, 255)
    k = Intrinsics(size, size, size / 2, size / 2, size, size).matrix().numpy()
    return MultiViewSample(key=key, object_id=key, source=source, images=images,
                           cam2world=orbit_poses(views, 0.3, 1.5).numpy() if cameras else None,
                           intrinsics=np.repeat(k[None], views, 0) if cameras else None,
                           elevations=np.full(views, 0.3, np.float32), azimuths=orbit_azimuths(views).numpy(),
                           prompt="a thing")


def write_raw(path: Path, raws: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as writer:
        for raw in raws:
            writer.write(raw)
    return path


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def cut(path: Path, fraction: float = 1 / 3) -> Path:
    """Truncate a file as a kill or a full disk leaves it."""
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])
    return path


@contextlib.contextmanager
def full_disk():
    """A simulated full disk: no file of this process or its children can grow (RLIMIT_FSIZE 0), so every
    write fails with EFBIG where a full disk fails with ENOSPC, whoever writes (Python, safetensors' Rust,
    PIL, zipfile). Existing files, renames and deletions are unaffected, as on a full disk. Use with capsys:
    pytest's own capture file would fail too."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


class Payload:
    """Unpickling this creates `marker`: proof that code in a file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SkopsPayload:
    """skops rebuilds objects through __setstate__: building this one creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __getstate__(self):
        return {"marker": self.marker}

    def __setstate__(self, state):
        open(state["marker"], "w").close()


def tampered_checkpoint(path: Path, marker: Path) -> Path:
    """A Lightning-shaped checkpoint with a payload among its hyper-parameters; an unsafe load runs it."""
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {"model.x": torch.zeros(1)},
                "hyper_parameters": {"model": "tiny-svd", "trainable": "temporal", "condition_dropout": 0.1,
                                     "network": Payload(marker)}}, path)
    torch.load(io.BytesIO(path.read_bytes()), weights_only=False)  # the payload is live
    assert marker.exists()
    marker.unlink()
    return path


# ---------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def lrm_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return LRM(LRMConfig.from_name("tiny")).save_pretrained(tmp_path_factory.mktemp("lrm") / "tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 12:28] = (200, 40, 40, 255)
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two good 4-view shards with cameras."""
    folder = tmp_path_factory.mktemp("shards")
    with ShardWriter(folder, maxcount=2) as writer:
        for i in range(4):
            writer.write_sample(make_sample(f"obj{i}"))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A quality SVM and an elevation MLP on DIM-wide random features of tag TAG, as filter and label read."""
    folder = tmp_path_factory.mktemp("curation_models")
    rng = np.random.default_rng(0)
    svm = QualitySVM(c_values=(1.0,), folds=2).fit(rng.normal(size=(8, DIM)), np.array([0, 1] * 4), TAG)
    svm.save_pretrained(folder / "quality_svm")
    torch.manual_seed(0)
    ElevationMLP(DIM, hidden_dim=4, feature_tag=TAG).save_pretrained(folder / "elevation_mlp")
    return {"svm": folder / "quality_svm", "elevation": folder / "elevation_mlp"}


def video_shard(folder: Path, keys: list[str], features: bool = True) -> Path:
    """The next shard of generated videos (16 frames) in `folder`, with cached random features."""
    with ShardWriter(folder) as writer:
        for key in keys:
            writer.write_sample(make_sample(key, views=16, cameras=False, source="synthetic"))
    shard = writer.written[0]
    if features:
        generator = torch.Generator().manual_seed(len(keys))
        write_features(shard, TAG, keys, list(range(16)), torch.randn(len(keys), DIM, generator=generator),
                       torch.randn(len(keys), DIM, generator=generator))
    return shard


def curation_args(command: str, videos: Path, out: Path, models: dict[str, Path]) -> list[str]:
    model = ["--svm", str(models["svm"]), "--threshold", "0"] if command == "filter" else [
        "--elevation", str(models["elevation"])]
    return [command, "--shards", str(videos), "--out", str(out), *model]


# ---------------------------------------------------------------- 1. corrupt and truncated shards


def copy_with_a_cut_shard(shards, tmp_path: Path) -> Path:
    """The complete shards copied to tmp_path/shards, the second one cut short."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in complete_shards(shards):
        (folder / shard.name).write_bytes(shard.read_bytes())
    cut(folder / "shard-000001.tar")
    return folder


def test_a_cut_shard_is_a_counted_skip_in_training_and_named_when_counting(shards, tmp_path, caplog):
    folder = copy_with_a_cut_shard(shards, tmp_path)
    before = digest(folder)
    pattern = str(folder / "shard-*.tar")
    data = dict(batch_size=1, num_workers=0, num_supervision_views=2, input_size=16, supervision_size=8,
                shuffle_buffer=1)
    with caplog.at_level(logging.WARNING):
        ids = [b["object_id"][0] for b in MultiViewDataModule(pattern, samples_per_epoch=4, **data)
               .train_dataloader()]
    assert len(ids) == 4 and {"obj0", "obj1"} <= set(ids)  # the whole shard's samples, read again
    assert "skipping unreadable shard data" in caplog.text and "shard-000001.tar" in caplog.text
    assert "skipped" in caplog.text and "bad sample(s) this epoch" in caplog.text
    # without samples_per_epoch the loader counts samples from the tar headers: the cut shard is named
    with pytest.raises(SampleError, match=r"shard-000001\.tar cannot be read .*write it again or move it out"):
        MultiViewDataModule(pattern, **data).train_dataloader()
    assert digest(folder) == before


def test_a_cut_shard_stops_evaluate_before_any_model_loads(shards, lrm_dir, tmp_path):
    folder = copy_with_a_cut_shard(shards, tmp_path)
    out = tmp_path / "eval"
    (out / "tiny").mkdir(parents=True)
    (out / "summary.md").write_text("an earlier evaluation\n")
    (out / "tiny" / "objects.csv").write_text("object_id,psnr\nobj0,20\n")
    before = digest(out, folder)
    with pytest.raises(SampleError, match=r"shard-000001\.tar cannot be read .*write it again"):
        main(["evaluate", "--checkpoint+", str(lrm_dir), "--shards", str(folder / "shard-*.tar"), "--out", str(out),
              "--clip", "none", "--lpips_random_backbone", "true", "--device", "cpu"])
    # the reader evaluate iterates names it too (Python API)
    with pytest.raises(SampleError, match=r"shard-000001\.tar cannot be read"):
        list(read_samples(complete_shards(folder)))
    assert digest(out, folder) == before


@pytest.mark.parametrize("command", ["filter", "label"])
@pytest.mark.parametrize("defect", ["cut", "no_json"])
def test_curation_names_a_bad_input_shard_and_keeps_what_it_wrote(command, defect, models, tmp_path, capsys):
    videos, out = tmp_path / "videos", tmp_path / "out"
    video_shard(videos, ["v0", "v1"])
    assert main(curation_args(command, videos, out, models)) == 0  # an earlier run: shard 0 done
    if defect == "cut":
        cut(video_shard(videos, ["v2", "v3"]))
        message = r"shard-000001\.tar"
    else:  # a sample without its metadata file, whose features were cached
        shard = video_shard(videos, ["v2", "v3"])
        raws = [dict(r) for r in wds.tarfile_samples(iter([{"url": str(shard)}]))]
        del raws[1]["json"]
        write_raw(shard, [{k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")} for r in raws])
        message = r"sample 'v3' in .*shard-000001\.tar: missing its \.json.*write shard .*shard-000001\.tar again"
    before = digest(out, videos)
    with pytest.raises(SampleError, match=message) as error:
        main(curation_args(command, videos, out, models))
    assert "move it out of the folder, then rerun" in str(error.value)
    assert digest(out, videos) == before  # shard 0's output and the report untouched, no .partial left


def test_a_sample_without_cached_features_is_named_by_filter_and_counted_by_label(models, tmp_path, capsys):
    videos = tmp_path / "videos"
    shard = video_shard(videos, ["v0", "v1"], features=False)
    write_features(shard, TAG, ["v0"], list(range(16)), torch.zeros(1, DIM), torch.zeros(1, DIM))  # v1 missing
    before = digest(videos)
    with pytest.raises(ValueError, match=r"sample 'v1' of .*shard-000000\.tar has no cached features; encode the "
                                         r"shard again \(vfusion3d-lightning predict"):
        main(curation_args("filter", videos, tmp_path / "kept", models))
    assert not list((tmp_path / "kept").glob("shard-*"))
    assert main(curation_args("label", videos, tmp_path / "labelled", models)) == 0
    report = json.loads((tmp_path / "labelled" / "label_report.json").read_text())
    assert report["totals"]["videos"] == 2 and report["totals"]["elevation"] == 1  # v1 kept without cameras
    assert digest(videos) == before


def test_a_corrupt_shard_in_a_render_output_folder_is_named_not_deleted(tmp_path):
    (tmp_path / "assets").mkdir()
    out = tmp_path / "renders"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"not a tar " * 100)  # a complete shard's name, garbage inside
    before = digest(out)
    with pytest.raises(SampleError, match=r"(?s)shard-000000\.tar cannot be read .*write it again or move it out"):
        main(["render", "--assets", str(tmp_path / "assets"), "--out", str(out), "--workers", "1"])
    assert digest(out) == before


def test_a_cut_shard_stops_the_labelling_page_naming_it(tmp_path):
    videos = tmp_path / "videos"
    video_shard(videos, ["v0", "v1"], features=False)
    cut(video_shard(videos, ["v2", "v3"], features=False))
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"key": "v0", "label": "good"}\n')
    before = digest(videos, labels)
    with pytest.raises(SampleError, match=r"shard-000001\.tar cannot be read .*write it again or move it out"):
        main(["label-ui", "--shards", str(videos), "--labels", str(labels), "--port", "0"])
    assert digest(videos, labels) == before


# ---------------------------------------------------------------- 2-4. missing keys, wrong sizes, NaN cameras


def bad_training_samples() -> list[dict]:
    """One sample per defect, as a shard might hold them, then three good ones."""
    raws = []

    def sample(key, edit):
        raw = encode_sample(make_sample(key))
        meta = json.loads(raw["json"])
        edit(raw, meta)
        if "json" in raw:
            raw["json"] = json.dumps(meta).encode()
        raws.append(raw)

    sample("nojson", lambda raw, meta: raw.pop("json"))
    sample("noview", lambda raw, meta: raw.pop("003.png"))
    sample("nofield", lambda raw, meta: meta.pop("num_views"))
    sample("smallviews", lambda raw, meta: raw.update({f"{i:03d}.png": png(np.zeros((12, 12, 4), np.uint8))
                                                        for i in range(4)}))
    sample("nancamera", lambda raw, meta: [pose[0].__setitem__(3, float("nan")) for pose in meta["cam2world"]])
    sample("infintrinsics", lambda raw, meta: [k[0].__setitem__(0, float("inf")) for k in meta["intrinsics"]])
    for i in range(3):
        raws.append(encode_sample(make_sample(f"good{i}")))
    return raws


BAD_SAMPLES = {"nojson": "missing its .json", "noview": r"missing view files \['003.png'\]",
               "nofield": r"metadata lacks \['num_views'\]", "smallviews": "is 12x12 pixels, metadata says 16x16",
               "nancamera": "cam2world holds NaN or inf", "infintrinsics": "intrinsics holds NaN or inf"}


@pytest.mark.parametrize("datamodule", ["lrm", "video"])
def test_bad_samples_are_skipped_counted_and_named_in_training(datamodule, tmp_path, caplog):
    shard = write_raw(tmp_path / "shard-000000.tar", bad_training_samples())
    before = digest(shard)
    common = dict(batch_size=1, num_workers=0, samples_per_epoch=3, shuffle_buffer=1)
    dm = (MultiViewDataModule(str(shard), num_supervision_views=2, input_size=16, supervision_size=8, **common)
          if datamodule == "lrm" else VideoDataModule(str(shard), num_frames=4, frame_size=8, **common))
    with caplog.at_level(logging.WARNING):
        ids = [b["object_id"][0] for b in dm.train_dataloader()]
    assert ids == ["good0", "good1", "good2"]
    for key, reason in BAD_SAMPLES.items():
        assert any(f"'{key}'" in r.getMessage() and re.search(reason, r.getMessage())
                   for r in caplog.records), key
    assert f"skipped {len(BAD_SAMPLES)} bad sample(s) this epoch" in caplog.text
    assert digest(shard) == before


def test_frames_of_different_sizes_in_one_shard_are_named_by_feature_caching(tmp_path):
    from vfusion3d_lightning.data.feature_cache import feature_tag
    from vfusion3d_lightning.training import FeatureExtractor
    from vfusion3d_lightning.training.features import compute_features

    videos = tmp_path / "videos"
    with ShardWriter(videos) as writer:
        writer.write_sample(make_sample("a", views=16, size=16, cameras=False, source="synthetic"))
    torch.manual_seed(0)
    extractor = FeatureExtractor(model_name="vit_small_patch16_224", random_init=True, image_size=32,
                                 overrides=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2))
    compute_features(videos, extractor, accelerator="cpu", devices=1, num_workers=0, progress=False)
    with ShardWriter(videos) as writer:  # a second shard mixing 16 and 24 pixel videos
        writer.write_sample(make_sample("b", views=16, size=16, cameras=False, source="synthetic"))
        writer.write_sample(make_sample("c", views=16, size=24, cameras=False, source="synthetic"))
    before = digest(videos)
    with pytest.raises(SampleError, match=r"sample 'c' in .*shard-000001\.tar has 24x24 frames, sample 'b' "
                                          r"16x16; write each shard's videos at one size"):
        compute_features(videos, extractor, accelerator="cpu", devices=1, num_workers=0, progress=False)
    assert digest(videos) == before
    assert not cache_path(videos / "shard-000001.tar", feature_tag("vit_small_patch16_224", "cls", True)).exists()


def test_nan_cameras_stop_evaluate_naming_the_sample(lrm_dir, tmp_path):
    raw = encode_sample(make_sample("broken"))
    meta = json.loads(raw["json"])
    meta["cam2world"][2][1][3] = float("inf")
    shard = write_raw(tmp_path / "shard-000000.tar", [encode_sample(make_sample("fine")),
                                                      {**raw, "json": json.dumps(meta).encode()}])
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.md").write_text("an earlier evaluation\n")
    before = digest(out, shard)
    with pytest.raises(SampleError, match=r"sample 'broken' in .*shard-000000\.tar: cam2world holds NaN or inf "
                                          r"\(views \[2\]\).*mend that sample or leave its shard out"):
        main(["evaluate", "--checkpoint+", str(lrm_dir), "--shards", str(shard), "--out", str(out), "--clip",
              "none", "--lpips_random_backbone", "true", "--device", "cpu", "--input_size", "56"])
    assert digest(out, shard) == before


def test_nan_features_would_give_nan_cameras_and_are_named_by_label(models, tmp_path, capsys):
    videos, out = tmp_path / "videos", tmp_path / "out"
    video_shard(videos, ["v0"])
    assert main(curation_args("label", videos, out, models)) == 0
    shard = video_shard(videos, ["v1", "v2"], features=False)
    quality = torch.zeros(2, DIM)
    elevation = torch.zeros(2, DIM)
    elevation[1, 3] = float("nan")
    write_features(shard, TAG, ["v1", "v2"], list(range(16)), quality, elevation)
    before = digest(out, videos)
    with pytest.raises(ValueError, match=r"shard-000001\.features-tiny-random\.safetensors holds NaN or inf "
                                         r"features for samples \['v2'\]; encode .*shard-000001\.tar again: "
                                         r"vfusion3d-lightning predict .*recompute true"):
        main(curation_args("label", videos, out, models))
    assert digest(out, videos) == before


def test_nan_cameras_are_refused_by_the_renderers():
    from vfusion3d_lightning.cameras import canonical_source_camera, turntable_cameras

    model = LRM(LRMConfig.from_name("tiny")).eval()  # the source camera: tests/models/test_lrm_model.py
    planes = model(torch.rand(1, 3, 56, 56), canonical_source_camera(1))
    cameras = turntable_cameras(2)[None].clone()
    cameras[0, 1, 5] = float("nan")
    with pytest.raises(ValueError, match="render cameras hold NaN or inf"):
        model.render(planes, cameras, size=8)


# ---------------------------------------------------------------- 5. empty meshes


def test_meshes_without_faces_are_counted_in_the_render_report(tmp_path, capsys):
    assets, out = tmp_path / "assets", tmp_path / "renders"
    assets.mkdir()
    (assets / "empty.ply").write_bytes(b"")
    (assets / "points.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    (assets / "degenerate.obj").write_text("v 0 0 0\nv 0 0 0\nv 0 0 0\nf 1 2 3\n")
    with ShardWriter(out) as writer:  # an earlier run's shard
        writer.write_sample(make_sample("earlier"))
    before = digest(out)
    assert main(["render", "--assets", str(assets), "--out", str(out), "--resolution", "16", "--workers", "1"]) == 0
    assert "rendered 0, already present 0, failed 3" in capsys.readouterr().out
    report = json.loads((out / "render_report.json").read_text())
    failed = {Path(f["asset"]).name: f["reason"] for f in report["failed"]}
    assert set(failed) == {"empty.ply", "points.obj", "degenerate.obj"}
    assert "no faces" in failed["points.obj"] and "zero-size" in failed["degenerate.obj"]
    assert all(name in reason for name, reason in failed.items())  # each reason names its file
    after = digest(out)
    del after[str(out / "render_report.json")]
    assert after == before  # no shard written or touched


def infer_args(images: Path, lrm_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["infer", "--input", str(images), "--checkpoint", str(lrm_dir), "--out", str(out), "--frames", "2",
            "--render_size", "8", "--frames_per_batch", "2", "--input_size", "56", "--video_format", "gif",
            "--mesh_resolution", "8", "--mesh_method", "dense", "--device", "cpu", *extra]


def earlier_outputs(out: Path, name: str = "cutout") -> Path:
    (out / name).mkdir(parents=True)
    for file in ("input.png", "turntable.gif", "mesh.glb"):
        (out / name / file).write_bytes(f"an earlier run's {file}".encode())
    return out


def test_an_empty_mesh_names_the_image_and_the_threshold_to_pick(images, lrm_dir, tmp_path, capsys):
    out = earlier_outputs(tmp_path / "out")
    before = digest(out)
    # the input and turntable are written before the mesh is tried: they are kept, the command succeeds
    assert main(infer_args(images, lrm_dir, out, "--mesh_threshold", "1e9")) == 0
    assert re.search(r"warning: .*cutout\.png: no mesh written: no surface at density threshold 1000000000\.0.*"
                     r"pick a threshold inside that range, e\.g\. \S+ \(its 95th percentile\)",
                     capsys.readouterr().err)
    after = digest(out)
    assert sorted(Path(p).name for p in after) == ["input.png", "turntable.gif"]  # the earlier mesh.glb is gone
    assert all(after[p] != before[p] for p in after)  # both rewritten for this input


# ---------------------------------------------------------------- 6. unreadable images


def test_an_unreadable_image_in_a_folder_is_named_and_the_others_are_made(images, lrm_dir, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")
    (inputs / "cutout.png").write_bytes((images / "cutout.png").read_bytes())
    out = earlier_outputs(tmp_path / "out", name="broken")
    before = digest(out / "broken")
    with pytest.raises(ValueError, match=r"1 of 2 images in .*inputs failed \(broken\.png"):
        main(infer_args(inputs, lrm_dir, out, "--mesh_format", "none"))
    assert re.search(r"skipped cannot read .*broken\.png as an image .*replace it by a PNG, JPEG",
                     capsys.readouterr().err)
    assert sorted(p.name for p in (out / "cutout").iterdir()) == ["input.png", "turntable.gif"]
    assert digest(out / "broken") == before  # the failed image's earlier outputs stay as they were
    # one image alone: its error, naming it
    with pytest.raises(ValueError, match=r"cannot read .*broken\.png as an image .*replace it by a PNG, JPEG"):
        main(infer_args(inputs / "broken.png", lrm_dir, out, "--mesh_format", "none"))


def test_an_unreadable_condition_image_is_counted_in_the_generate_report(tmp_path, capsys):
    inputs, out = tmp_path / "inputs", tmp_path / "videos"
    inputs.mkdir()
    (inputs / "broken.png").write_bytes(b"not an image")
    with ShardWriter(out) as writer:  # an earlier run's video
        writer.write_sample(make_sample("earlier", views=16, size=32, cameras=False, source="synthetic"))
    before = digest(out)
    assert main(["generate", "--model", "tiny-svd", "--inputs", str(inputs), "--out", str(out), "--size", "32",
                 "--steps", "1", "--trainer.accelerator", "cpu", "--num_workers", "0"]) == 0
    assert "generated 0, already present 0, failed 1" in capsys.readouterr().out
    (failed,) = json.loads((out / "generate_report.json").read_text())["failed"]
    assert failed["key"] == "broken" and "cannot read" in failed["reason"] and "broken.png" in failed["reason"]
    after = digest(out)
    del after[str(out / "generate_report.json")], after[str(out / "generate_plan.json")]
    assert after == before


# ---------------------------------------------------------------- 7. a checkpoint of the wrong model


@pytest.fixture(scope="module")
def wrong_files(tmp_path_factory, lrm_dir, models) -> dict[str, Path]:
    """Checkpoints and folders of our models, each to be handed to a loader of another."""
    folder = tmp_path_factory.mktemp("wrong")
    lightning = {"pytorch-lightning_version": "2.6.0", "epoch": 0, "global_step": 1}
    torch.save({**lightning, "state_dict": {"model.layers.0.weight": torch.zeros(4, DIM)},
                "hyper_parameters": {"feature_dim": DIM, "hidden_dim": 4}}, folder / "elevation.ckpt")
    torch.save({**lightning, "state_dict": {"model.camera_embedder.fc1.weight": torch.zeros(32, 16)},
                "hyper_parameters": {"network": LRMConfig.from_name("tiny").to_dict(), "lr": 4e-4}},
               folder / "lrm.ckpt")
    torch.save({**lightning, "state_dict": {"model.unet.conv_in.weight": torch.zeros(4, 8, 3, 3)},
                "hyper_parameters": {"model": "tiny-svd", "trainable": "temporal", "condition_dropout": 0.1}},
               folder / "video.ckpt")
    mixed = folder / "mixed_mlp"  # an elevation MLP's config beside another MLP's weights
    ElevationMLP(2 * DIM, hidden_dim=4).save_pretrained(mixed)
    (mixed / "config.json").write_bytes((models["elevation"] / "config.json").read_bytes())
    return {"elevation_ckpt": folder / "elevation.ckpt", "lrm_ckpt": folder / "lrm.ckpt",
            "video_ckpt": folder / "video.ckpt", "mixed_mlp": mixed, "lrm": lrm_dir,
            "lrm_weights": lrm_dir / "model.safetensors", "mlp": models["elevation"],
            "mlp_weights": models["elevation"] / "model.safetensors"}


def load_lrm_module(path):
    from vfusion3d_lightning.training import LRMModule

    return LRMModule(network=LRMConfig.from_name("tiny"), pretrained=str(path), lpips_random_backbone=True)


def evaluate_args(shards: Path, lrm: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--checkpoint+", str(lrm), "--shards", str(shards / "shard-*.tar"), "--out", str(out),
            "--clip", "none", "--device", "cpu", *extra]


WRONG_MODEL_CASES = {
    # entry point: (wrong file, call, error matched)
    "infer --checkpoint <elevation MLP folder>": (
        "mlp", lambda f, a: main(infer_args(a["images"], f, a["out"])),
        r"mlp/config\.json is not an LRM config \(vfusion3d-elevation-mlp/1\): give the folder LRM\.save_pretrained"),
    "evaluate --checkpoint <ElevationModule .ckpt>": (
        "elevation_ckpt", lambda f, a: main(evaluate_args(a["shards"], f, a["out"], "--lpips_random_backbone", "true")),
        r"elevation\.ckpt is not a checkpoint of LRMModule \(its hyper-parameters are \['feature_dim', "
        r"'hidden_dim'\]\); give one that `vfusion3d-lightning fit"),
    "evaluate --lpips-weights <LRM weights>": (
        "lrm_weights", lambda f, a: main(evaluate_args(a["shards"], a["lrm"], a["out"], "--lpips_weights", str(f))),
        r"model\.safetensors is not torchvision's VGG16 state dict \(vgg16-397923af\.pth from https://"),
    "generate --model <LRMModule .ckpt>": (
        "lrm_ckpt", lambda f, a: main(["generate", "--model", str(f), "--inputs", str(a["images"]), "--out",
                                       str(a["out"]), "--trainer.accelerator", "cpu"]),
        r"lrm\.ckpt is not a checkpoint of VideoDiffusionModule \(its hyper-parameters are \['lr', 'network'\]\); "
        r"give one that `vfusion3d-lightning fit"),
    "filter --svm <LRM weights>": (
        "lrm_weights",
        lambda f, a: main(["filter", "--shards", str(a["shards"]), "--svm", str(f), "--out", str(a["out"])]),
        r"model\.safetensors is not a quality SVM written by QualitySVM\.save_pretrained.*train one with "
        r"vfusion3d-lightning"),
    "label --elevation <LRM folder>": (
        "lrm",
        lambda f, a: main(["label", "--shards", str(a["shards"]), "--out", str(a["out"]), "--elevation", str(f)]),
        r"tiny/config\.json is not an elevation MLP config"),
    "label --elevation <config and weights of two MLPs>": (
        "mixed_mlp",
        lambda f, a: main(["label", "--shards", str(a["shards"]), "--out", str(a["out"]), "--elevation", str(f)]),
        r"(?s)mixed_mlp/model\.safetensors does not fit the elevation MLP that .*mixed_mlp/config\.json describes"),
    "LRMModule(pretrained=<VideoDiffusionModule .ckpt>)": (
        "video_ckpt", lambda f, a: load_lrm_module(f),
        r"video\.ckpt is not a checkpoint of LRMModule \(its hyper-parameters are \['condition_dropout', "
        r"'model', 'trainable'\]\); give one that `vfusion3d-lightning fit --config configs/lrm/tiny\.yaml`"),
    "LRM.load_encoder_weights(<elevation MLP weights>)": (
        "mlp_weights", lambda f, a: LRM(LRMConfig.from_name("tiny")).load_encoder_weights(f),
        r"(?s)weights from .*elevation_mlp/model\.safetensors do not fit this model"),
}


@pytest.mark.parametrize("case", list(WRONG_MODEL_CASES))
def test_a_checkpoint_of_the_wrong_model_is_named(case, wrong_files, images, shards, lrm_dir, tmp_path, capsys):
    name, call, message = WRONG_MODEL_CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier run's output")
    before = digest(out, wrong_files[name])
    with pytest.raises(ValueError, match=message):
        call(wrong_files[name], {"images": images, "shards": shards, "lrm": lrm_dir, "out": out})
    assert digest(out, wrong_files[name]) == before


# ---------------------------------------------------------------- 8. a tampered pickle


def tampered_skops(path: Path, marker: Path) -> Path:
    """A skops file shaped like a quality SVM whose pipeline is an object that runs code when built."""
    import skops.io

    state = {"pipeline": SkopsPayload(marker), "info": {"format": SVM_FORMAT, "feature_tag": TAG},
             "settings": {"c_values": [1.0], "kernel": "rbf", "folds": 2, "seed": 0}}
    skops.io.dump(state, path)
    skops.io.load(path, trusted=skops.io.get_untrusted_types(file=path))  # the payload is live
    assert marker.exists()
    marker.unlink()
    return path


def pickled_payload(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(Payload(marker)))
    pickle.loads(path.read_bytes())  # the payload is live
    assert marker.exists()
    marker.unlink()
    return path


REFUSED = r"refusing to load .*: it holds objects other than tensors"
TAMPERED_CASES = {
    # entry point: (file name, how it is made, call, error type, error matched)
    "infer --checkpoint x.pt": (
        "x.pt", tampered_checkpoint, lambda f, a: main(infer_args(a["images"], f, a["out"])), ValueError, REFUSED),
    "evaluate --checkpoint x.ckpt": (
        "x.ckpt", tampered_checkpoint,
        lambda f, a: main(evaluate_args(a["shards"], f, a["out"], "--lpips_random_backbone", "true")),
        ValueError, REFUSED),
    "evaluate --lpips-weights x.pth": (
        "x.pth", tampered_checkpoint,
        lambda f, a: main(evaluate_args(a["shards"], a["lrm"], a["out"], "--lpips_weights", str(f))), ValueError,
        REFUSED),
    "generate --model x.ckpt": (
        "x.ckpt", tampered_checkpoint,
        lambda f, a: main(["generate", "--model", str(f), "--inputs", str(a["images"]), "--out", str(a["out"]),
                           "--trainer.accelerator", "cpu"]), ValueError, REFUSED),
    # Lightning's own resume: torch >= 2.6 loads with weights_only=True by default (pyproject.toml)
    "fit --ckpt_path x.ckpt": (
        "x.ckpt", tampered_checkpoint,
        lambda f, a: main(["fit", "--config", str(ROOT / "configs" / "lrm" / "tiny.yaml"),
                           "--data.init_args.train_shards", str(a["shards"] / "shard-*.tar"),
                           "--data.init_args.val_shards", str(a["shards"] / "shard-*.tar"),
                           "--trainer.default_root_dir", str(a["out"]), "--trainer.enable_progress_bar", "false",
                           "--ckpt_path", str(f)]),
        ValueError, r"--ckpt_path .*x\.ckpt: " + REFUSED),
    "fit --model.init_args.pretrained x.ckpt (LRMModule)": (
        "x.ckpt", tampered_checkpoint, lambda f, a: load_lrm_module(f), ValueError, REFUSED),
    "LRM.load_encoder_weights(x.pth)": (
        "x.pth", tampered_checkpoint, lambda f, a: LRM(LRMConfig.from_name("tiny")).load_encoder_weights(f),
        ValueError,
        REFUSED),
    "filter --svm x.pkl": (
        "x.pkl", pickled_payload,
        lambda f, a: main(["filter", "--shards", str(a["shards"]), "--svm", str(f), "--out", str(a["out"])]),
        ValueError,
        r"x\.pkl is not a quality SVM written by QualitySVM\.save_pretrained .*pickles are refused"),
    "filter --svm x.skops": (
        "x.skops", tampered_skops,
        lambda f, a: main(["filter", "--shards", str(a["shards"]), "--svm", str(f), "--out", str(a["out"])]),
        ValueError,
        r"x\.skops holds types a quality SVM is not made of: \['[\w.]*SkopsPayload'\]; refusing"),
    "label --elevation <folder whose model.safetensors is a pickle>": (
        "mlp/model.safetensors", tampered_checkpoint,
        lambda f, a: main(["label", "--shards", str(a["shards"]), "--out", str(a["out"]),
                           "--elevation", str(f.parent)]),
        ValueError, r"mlp/model\.safetensors is not a readable safetensors file"),
}


@pytest.mark.parametrize("case", list(TAMPERED_CASES))
def test_a_tampered_pickle_is_refused_never_run(case, models, images, shards, lrm_dir, tmp_path, capsys):
    # LRM.from_pretrained(<a file without suffix>) is tests/models/test_lrm_model.py::
    # test_a_tampered_pickle_is_refused_not_executed
    name, make, call, error, message = TAMPERED_CASES[case]
    path, marker, out = tmp_path / "given" / name, tmp_path / "pwned", tmp_path / "out"
    path.parent.mkdir(parents=True)
    if name.startswith("mlp/"):
        (path.parent / "config.json").write_bytes((models["elevation"] / "config.json").read_bytes())
    make(path, marker)
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier run's output")
    before = digest(out, path.parent)
    with pytest.raises(error, match=message):
        call(path, {"images": images, "shards": shards, "lrm": lrm_dir, "out": out})
    assert not marker.exists()
    assert digest(out, path.parent) == before


# ---------------------------------------------------------------- 9. a full disk while writing outputs


def test_a_full_disk_leaves_earlier_infer_outputs_whole(images, lrm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(infer_args(images, lrm_dir, out, "--mesh_format", "none")) == 0
    before = digest(out)
    assert {Path(p).name for p in before} == {"input.png", "turntable.gif"}
    with full_disk(), pytest.raises(OSError, match="File too large"):
        main(infer_args(images, lrm_dir, out, "--mesh_format", "none"))
    assert digest(out) == before  # no half-written file, no temporary file left


@pytest.mark.parametrize("command", ["filter", "label"])
def test_a_full_disk_during_curation_keeps_earlier_shards_and_report(command, models, tmp_path, capsys):
    videos, out = tmp_path / "videos", tmp_path / "out"
    video_shard(videos, ["v0", "v1"])
    assert main(curation_args(command, videos, out, models)) == 0
    video_shard(videos, ["v2", "v3"])  # new input: its output shard cannot be written
    before = digest(out)
    with full_disk(), pytest.raises(OSError, match="File too large"):
        main(curation_args(command, videos, out, models))
    assert digest(out) == before  # no .partial shard, report unchanged: a rerun does shard 1 again
    assert main(curation_args(command, videos, out, models)) == 0
    assert (out / "shard-000001.tar").is_file()


def test_a_full_disk_while_saving_models_leaves_the_old_ones_whole(lrm_dir, models, tmp_path, monkeypatch,
                                                                   capsys):
    from vfusion3d_lightning.models.video import VideoDiffusionModel

    folder = tmp_path / "lrm"
    folder.mkdir()
    for file in lrm_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    mlp, svm, video = tmp_path / "elevation_mlp", tmp_path / "quality_svm", tmp_path / "video"
    ElevationMLP.from_pretrained(models["elevation"]).save_pretrained(mlp)
    QualitySVM.from_pretrained(models["svm"]).save_pretrained(svm)
    torch.manual_seed(0)
    VideoDiffusionModel.build("tiny-svd").save_pretrained(video)
    before = digest(folder, mlp, svm, video)
    tiny = LRMConfig.from_name("tiny")
    other = LRM(LRMConfig(**{**tiny.to_dict(), "triplane_dim": 4}))  # LRMModule.export saves alike
    other_video = VideoDiffusionModel.build("tiny-svd")
    saves = (lambda: other.save_pretrained(folder), lambda: ElevationMLP(DIM, 4).save_pretrained(mlp),
             lambda: QualitySVM.from_pretrained(models["svm"]).save_pretrained(svm),
             lambda: other_video.save_pretrained(video))
    with full_disk():
        for save in saves:
            with pytest.raises((OSError, SafetensorError), match="File too large"):  # safetensors has its own
                save()
    assert digest(folder, mlp, svm, video) == before  # no temporary folder left either
    # the disk fills at a config, after the weights: the old weights and config stay a pair
    real_write_text = Path.write_text

    def half_then_full(self, data, *args, **kwargs):
        if self.name in ("config.json", "model_index.json"):
            real_write_text(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", half_then_full)
    for save in saves:
        with pytest.raises(OSError, match="No space left"):
            save()
    monkeypatch.undo()
    assert digest(folder, mlp, svm, video) == before
    LRM.from_pretrained(folder)
    ElevationMLP.from_pretrained(mlp)
    QualitySVM.from_pretrained(svm)
    VideoDiffusionModel.from_pretrained(video)
