"""Untrusted data must not run code: quality-SVM skops files (folders and QualityModule checkpoints) are loaded
only when every object they name is one a genuine file holds, and shard specs never run shell commands
(`pipe:`) unless the user opts in with VFUSION3D_ALLOW_PIPE=1."""

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vfusion3d_lightning.models.curation.quality import (
    CHECKPOINT_KEY,
    FORMAT,
    SKOPS_NODES,
    WEIGHTS_NAME,
    QualitySVM,
    skops_nodes,
)

# ---------------------------------------------------------------- quality SVM files


@pytest.fixture(scope="module")
def fitted_svm():
    rng = np.random.default_rng(0)
    return QualitySVM(c_values=(0.3, 1.0), folds=2).fit(rng.normal(size=(12, 4)), np.array([0, 1] * 6), "tag")


def test_a_genuine_quality_svm_file_holds_exactly_the_allowed_types(fitted_svm, tmp_path):
    # a scikit-learn or skops upgrade that changes what a fitted SVM is made of shows up here: update SKOPS_NODES
    fitted_svm.info["held_out"] = {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "count": 4}
    folder = fitted_svm.save_pretrained(tmp_path / "svm")
    assert skops_nodes((folder / WEIGHTS_NAME).read_bytes()) == SKOPS_NODES
    features = np.random.default_rng(1).normal(size=(5, 4))
    np.testing.assert_allclose(QualitySVM.from_pretrained(folder).score(features), fitted_svm.score(features))


def _gadget_pipeline(fitted_svm: QualitySVM, marker: Path, kind: str):
    """A pipeline the prefix check (`sklearn.` / `numpy.`) let through: FunctionTransformers over numpy
    functions, then the genuine calibrated SVM, so `predict_proba` (what `filter --svm` calls) runs them."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    if kind == "numpy functions":  # features -> str(marker) -> np.save(marker): writes the marker file
        steps = [("path", FunctionTransformer(np.full_like, kw_args={"fill_value": str(marker), "dtype": "O"})),
                 ("first", FunctionTransformer(np.min)),
                 ("write", FunctionTransformer(np.save, kw_args={"arr": np.zeros(1)}))]
    else:  # a numpy ufunc: skops trusts those (and FunctionTransformer) by default, so no type was even untrusted
        steps = [("exp", FunctionTransformer(np.exp))]
    return Pipeline(steps + [("svm", fitted_svm.pipeline.steps[-1][1])])


def _gadget_bytes(fitted_svm: QualitySVM, marker: Path, kind: str) -> bytes:
    import skops.io

    gadget = QualitySVM(folds=2)
    gadget.pipeline, gadget.info = _gadget_pipeline(fitted_svm, marker, kind), dict(fitted_svm.info)
    data = gadget._to_bytes()
    # the payload is live: loaded as the prefix check did (trusting every sklearn./numpy. type), scoring runs it
    untrusted = skops.io.get_untrusted_types(data=data)
    assert all(name.startswith(("sklearn.", "numpy.")) for name in untrusted)
    loaded = skops.io.loads(data, trusted=untrusted)["pipeline"]
    if kind == "numpy functions":
        with pytest.raises(TypeError, match="NoneType"):  # np.save returns None, which the SVM refuses, too late
            loaded.predict_proba(np.zeros((1, 4)))
        assert marker.exists()
        marker.unlink()
    else:
        loaded.predict_proba(np.zeros((1, 4)))  # exp(features) reaches the SVM: code of the file's choosing ran
    return data


GADGETS = {"numpy functions": r"numpy\.full_like.*numpy\.save.*it names functions",
           "numpy ufunc": r"numpy\.exp.*it names functions"}


@pytest.mark.parametrize("kind", list(GADGETS))
def test_a_function_gadget_skops_folder_is_refused_never_run(fitted_svm, tmp_path, kind):
    marker = tmp_path / "pwned.npy"
    folder = tmp_path / "svm"
    fitted_svm.save_pretrained(folder)
    (folder / WEIGHTS_NAME).write_bytes(_gadget_bytes(fitted_svm, marker, kind))
    with pytest.raises(ValueError, match=r"holds types a quality SVM is not made of: .*"
                                         r"FunctionTransformer.*refusing to load it") as caught:
        QualitySVM.from_pretrained(folder).score(np.zeros((1, 4)))
    assert re.search(GADGETS[kind], str(caught.value)) and "people you trust" in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", list(GADGETS))
def test_a_function_gadget_in_a_quality_module_checkpoint_is_refused_never_run(fitted_svm, tmp_path, kind):
    from vfusion3d_lightning.training.quality import QualityModule

    marker = tmp_path / "pwned.npy"
    data = _gadget_bytes(fitted_svm, marker, kind)
    path = tmp_path / "quality.ckpt"
    torch.save({"hyper_parameters": {"c_values": [1.0], "kernel": "rbf", "folds": 2, "threshold": 0.5},
                "state_dict": {}, "pytorch-lightning_version": "2.5.0", CHECKPOINT_KEY: data}, path)
    with pytest.raises(ValueError, match=r"quality\.ckpt holds types a quality SVM is not made of: .*FunctionTransf"):
        QualitySVM.from_pretrained(path).score(np.zeros((1, 4)))
    module = QualityModule(c_values=[1.0], folds=2)
    with pytest.raises(ValueError, match="the checkpoint's quality SVM holds types a quality SVM is not made of"):
        module.on_load_checkpoint({CHECKPOINT_KEY: data})
    assert module.svm.pipeline is None and not marker.exists()
    with pytest.raises(ValueError, match="'quality_svm' is a str, not the skops bytes QualityModule writes"):
        module.on_load_checkpoint({CHECKPOINT_KEY: "model.skops"})


def test_a_known_type_in_another_kind_of_node_is_refused(fitted_svm, tmp_path):
    """The check is on (node kind, type) pairs: a FunctionNode naming an allowed class is refused too."""
    import io
    import json
    import zipfile

    source = io.BytesIO(fitted_svm._to_bytes())
    target = io.BytesIO()
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            content = old.read(name)
            if name == "schema.json":
                schema = json.loads(content)
                schema["content"]["extra"] = {"__class__": "Pipeline", "__module__": "sklearn.pipeline",
                                              "__loader__": "FunctionNode"}
                content = json.dumps(schema).encode()
            new.writestr(name, content)
    with pytest.raises(ValueError, match=r"\['sklearn\.pipeline\.Pipeline as FunctionNode'\]"):
        QualitySVM._from_bytes(target.getvalue(), "x.skops")


def test_a_file_that_is_not_a_quality_svm_is_refused(tmp_path):
    import skops.io

    data = skops.io.dumps({"info": {"format": FORMAT}, "settings": {"c_values": [1.0]}, "pipeline": [1]})
    with pytest.raises(ValueError, match=r"x\.skops is not a quality SVM written by QualitySVM\.save_pretrained"):
        QualitySVM._from_bytes(data, "x.skops")


# ---------------------------------------------------------------- pipe: shard URLs


@pytest.fixture
def one_shard(tmp_path):
    """shards/shard-000000.tar: two 4-view samples with cameras, obj0000 and obj0001."""
    from vfusion3d_lightning.cameras import orbit_azimuths, orbit_poses
    from vfusion3d_lightning.data.schema import MultiViewSample, ShardWriter

    k = np.array([[6.0, 0, 4], [0, 6.0, 4], [0, 0, 1]], dtype=np.float32)
    with ShardWriter(tmp_path / "shards", maxcount=2) as writer:
        for i in range(2):
            writer.write_sample(MultiViewSample(
                key=f"obj{i:04d}", object_id=f"object-obj{i:04d}", source="3d",
                images=np.full((4, 8, 8, 4), 200, np.uint8), cam2world=orbit_poses(4, 0.3, 1.5, 0.0).numpy(),
                intrinsics=np.repeat(k[None], 4, axis=0), elevations=np.full(4, 0.3, np.float32),
                azimuths=orbit_azimuths(4, 0.0).numpy()))
    return tmp_path / "shards" / "shard-000000.tar"


def _consumers(spec: str):
    """Every reader of shard specs, each called as far as it opens anything."""
    from vfusion3d_lightning.data.curation import CurationDataModule
    from vfusion3d_lightning.data.datamodules import MultiViewDataModule, VideoDataModule, expand_shards
    from vfusion3d_lightning.data.feature_cache import read_features, shard_paths
    from vfusion3d_lightning.evaluation import held_out_samples

    return {
        "expand_shards": lambda: expand_shards(spec),
        "MultiViewDataModule": lambda: list(MultiViewDataModule(spec, batch_size=1, num_workers=0,
                                                                samples_per_epoch=1).train_dataloader()),
        "VideoDataModule": lambda: list(VideoDataModule(spec, batch_size=1, num_workers=0, num_frames=4,
                                                        samples_per_epoch=1).train_dataloader()),
        "held_out_samples": lambda: list(held_out_samples(spec)),
        "shard_paths": lambda: shard_paths(spec),
        "read_features": lambda: read_features(spec, "tag"),
        "CurationDataModule": lambda: CurationDataModule(spec, "tag", "elevation").setup("fit"),
    }


@pytest.mark.parametrize("consumer", list(_consumers("")))
def test_a_pipe_shard_spec_is_refused_before_anything_runs(consumer, tmp_path, monkeypatch):
    from vfusion3d_lightning.data.datamodules import UnsafeShardURLError

    monkeypatch.delenv("VFUSION3D_ALLOW_PIPE", raising=False)
    marker = tmp_path / "pwned"
    spec = f"pipe:touch {marker}"
    with pytest.raises(UnsafeShardURLError, match=r"shard spec 'pipe:touch .*pwned' names .*a shell command.*"
                                                  r"VFUSION3D_ALLOW_PIPE=1"):
        _consumers(spec)[consumer]()
    assert not marker.exists()


def test_the_command_line_refuses_a_pipe_spec_in_one_line(tmp_path, monkeypatch, capsys, fitted_svm):
    from vfusion3d_lightning.cli import console_main

    monkeypatch.delenv("VFUSION3D_ALLOW_PIPE", raising=False)
    marker = tmp_path / "pwned"
    fitted_svm.save_pretrained(tmp_path / "svm")
    monkeypatch.setattr("sys.argv", ["vfusion3d-lightning", "filter", "--shards", f"pipe:touch {marker}", "--svm",
                                     str(tmp_path / "svm"), "--out", str(tmp_path / "out")])
    assert console_main() == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "a `pipe:` URL" in error and "VFUSION3D_ALLOW_PIPE=1" in error
    assert not marker.exists()


def test_a_stream_built_by_hand_refuses_pipe_urls(tmp_path, monkeypatch):
    from vfusion3d_lightning.data.datamodules import LRMViews, ShardStream, UnsafeShardURLError

    monkeypatch.delenv("VFUSION3D_ALLOW_PIPE", raising=False)
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafeShardURLError):
        ShardStream([f"pipe:touch {marker}"], LRMViews(2, True, 8, 8), samples_per_rank=1)
    assert not marker.exists()


def test_a_local_file_named_like_a_pipe_url_is_read_as_a_file(one_shard, tmp_path, monkeypatch):
    """A folder or glob of someone else's shards may hold `pipe:touch pwned.tar`: it is a file, never run."""
    from vfusion3d_lightning.data.datamodules import expand_shards
    from vfusion3d_lightning.data.schema import read_samples

    monkeypatch.delenv("VFUSION3D_ALLOW_PIPE", raising=False)
    folder = tmp_path / "given"
    folder.mkdir()
    shutil.copy(one_shard, folder / "pipe:touch pwned.tar")
    monkeypatch.chdir(folder)
    for spec in (".", "*.tar", "pipe:touch pwned.tar"):
        urls = expand_shards(spec)
        assert urls == [str(folder / "pipe:touch pwned.tar")], spec
        assert len(list(read_samples(urls))) == 2
    assert sorted(os.listdir(folder)) == ["pipe:touch pwned.tar"]  # no pwned.tar


def test_pipe_urls_are_read_when_the_user_opts_in(one_shard, tmp_path, monkeypatch):
    from vfusion3d_lightning.data.datamodules import VideoDataModule, expand_shards

    monkeypatch.setenv("VFUSION3D_ALLOW_PIPE", "1")
    spec = f"pipe:cat '{one_shard}'"
    assert expand_shards(spec) == [spec]
    batches = list(VideoDataModule(spec, batch_size=1, num_workers=0, num_frames=4, frame_size=8,
                                   samples_per_epoch=2).train_dataloader())
    assert sorted(b["object_id"][0] for b in batches) == ["object-obj0000", "object-obj0001"]
