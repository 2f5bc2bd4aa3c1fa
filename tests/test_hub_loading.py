"""Hugging Face Hub loading and saving, offline: every model's `from_pretrained` takes a Hub repo id through
`hub.hub_snapshot_files` (huggingface_hub's own download and cache code), read here from caches the tests build
in huggingface_hub's layout (`models--org--name/{blobs,snapshots/<commit>,refs/<branch>}`) with
HF_HUB_OFFLINE=1; `push_to_hub` uploads exactly what `save_pretrained` writes; registry files are hashed once."""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import diffusers
import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import save as safetensors_bytes

from vfusion3d_lightning import hub
from vfusion3d_lightning.models.lrm import LRM, LRMConfig

sys.path.insert(0, str(Path(__file__).parent / "models"))  # the released-names builder of the converter tests
from test_lrm_convert import released_tiny_state  # noqa: E402
from test_persistence import MODELS, lrm_output, tiny_lrm, tiny_video  # noqa: E402

REPO = "facebook/vfusion3d"
# the release's config.json keys (its LRMGenerator's sizes) at the tiny network's sizes; the tiny encoder's
# depth, heads and input size are our keys, as a smaller network's config.json would hold them
RELEASE_CONFIG = {
    "architectures": ["LRMGenerator"], "model_type": "vfusion3d", "camera_embed_dim": 32,
    "encoder_feat_dim": 48, "encoder_freeze": False, "encoder_model_name": "facebook/dinov2-small",
    "rendering_samples_per_ray": 32, "transformer_dim": 32, "transformer_heads": 2, "transformer_layers": 2,
    "triplane_dim": 8, "triplane_high_res": 16, "triplane_low_res": 8, "decoder_hidden_dim": 16,
    "encoder_depth": 2, "encoder_heads": 2, "encoder_img_size": 56,
}


def hub_cache(root: Path, repo: str, files: dict[str, bytes], ref: str = "main", commit: str | None = None) -> str:
    """Put `files` into a Hugging Face cache at `root` as huggingface_hub lays one out: each file's bytes in
    blobs/<sha256>, linked from snapshots/<commit>/<name>, and refs/<ref> holding the commit. Returns the commit."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = commit or hashlib.sha1(b"".join(files.values()) + ref.encode()).hexdigest()
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return commit


def release_files(state: dict, config: dict = RELEASE_CONFIG, prefix: str = "") -> dict[str, bytes]:
    return {"model.safetensors": safetensors_bytes({prefix + k: v.contiguous() for k, v in state.items()}),
            "config.json": json.dumps(config).encode()}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def released_pth(state: dict, path: Path) -> Path:
    torch.save({"model_state_dict": state, "epoch": 29}, path)  # as the GitHub release saved it
    return path


# ---------------------------------------------------------------- the LRM from a repo id


@pytest.mark.parametrize("prefix", ["", "model.", "lrm_generator."])
def test_the_hub_release_loads_as_the_released_pth_does(prefix, tmp_path, offline, monkeypatch):
    state = released_tiny_state()
    hub_cache(tmp_path / "cache", REPO, release_files(state, prefix=prefix))
    from_hub = LRM.from_pretrained(REPO, cache_dir=tmp_path / "cache").eval()
    assert from_hub.config == LRMConfig.from_name("tiny")  # read from the release's config.json keys
    from_pth = LRM.from_pretrained(released_pth(state, tmp_path / "vfusion3d.pth"),
                                   config=LRMConfig.from_name("tiny")).eval()
    assert torch.equal(lrm_output(from_hub), lrm_output(from_pth))
    # the cache named by $HF_HUB_CACHE, read when loading
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert torch.equal(lrm_output(LRM.from_pretrained(REPO).eval()), lrm_output(from_pth))


def test_revision_picks_another_snapshot(tmp_path, offline):
    cache = tmp_path / "cache"
    hub_cache(cache, REPO, release_files(released_tiny_state(1)))
    second = hub_cache(cache, REPO, release_files(released_tiny_state(2)), ref="v2")
    expected = lrm_output(LRM.from_pretrained(released_pth(released_tiny_state(2), tmp_path / "2.pth"),
                                              config=LRMConfig.from_name("tiny")).eval())
    main = lrm_output(LRM.from_pretrained(REPO, cache_dir=cache).eval())
    assert not torch.equal(main, expected)
    for revision in ("v2", second):  # a branch, or a commit hash
        assert torch.equal(lrm_output(LRM.from_pretrained(REPO, cache_dir=cache, revision=revision).eval()), expected)
    with pytest.raises(FileNotFoundError, match=r"repo 'facebook/vfusion3d' at revision 'v3'"):
        LRM.from_pretrained(REPO, cache_dir=cache, revision="v3")


def test_a_repo_missing_from_the_cache_is_one_line_naming_repo_file_and_fetch(tmp_path, offline):
    with pytest.raises(FileNotFoundError) as err:
        LRM.from_pretrained(REPO, cache_dir=tmp_path / "empty")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("LRM weights: model.safetensors of Hugging Face Hub repo 'facebook/vfusion3d' "
                              "($HF_HUB_OFFLINE is set and the cache has no copy) not found: fetch it with "
                              "`hf download facebook/vfusion3d model.safetensors config.json --cache-dir ")
    assert "set HF_HUB_CACHE to a cache that holds it" in message
    # the weights there but not the config: the config is named
    hub_cache(tmp_path / "half", REPO, {"model.safetensors": release_files(released_tiny_state())["model.safetensors"]})
    with pytest.raises(FileNotFoundError, match=r"LRM weights: config\.json of Hugging Face Hub repo"):
        LRM.from_pretrained(REPO, cache_dir=tmp_path / "half")


@pytest.mark.parametrize(("layers", "kind"), [(3, "missing"), (1, "unexpected")])
def test_a_config_that_does_not_fit_the_weights_lists_the_names(layers, kind, tmp_path, offline):
    config = {**RELEASE_CONFIG, "transformer_layers": layers}
    hub_cache(tmp_path / "cache", REPO, release_files(released_tiny_state(), config))
    with pytest.raises(ValueError, match=rf"(?s)do not fit this model:.*{kind} \(\d+\): \['transformer\.blocks\."):
        LRM.from_pretrained(REPO, cache_dir=tmp_path / "cache")


def test_an_existing_path_wins_over_a_repo_id_and_a_plain_word_is_a_registry_name(tmp_path, offline, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_lrm().save_pretrained(tmp_path / "facebook" / "vfusion3d")
    assert not hub.is_hub_repo_id(REPO)  # it exists here
    assert torch.equal(lrm_output(LRM.from_pretrained(REPO)), lrm_output(tiny_lrm()))
    monkeypatch.chdir(tmp_path / "facebook")
    assert hub.is_hub_repo_id(REPO) and hub.is_hub_repo_id("timm/vit_base_patch16_224.dino")
    assert not any(map(hub.is_hub_repo_id, ["vfusion3d", "a/b/c", "runs/last.ckpt", "out/model.safetensors"]))
    (tmp_path / "facebook" / "runs").mkdir()
    assert not hub.is_hub_repo_id("runs/lrm")  # beside an existing runs/: a mistyped path, no network wait
    with pytest.raises(FileNotFoundError, match=r"no LRM weights at runs/last\.ckpt: give a save_pretrained"):
        LRM.from_pretrained("runs/last.ckpt")  # a mistyped path is not looked up on the Hub
    with pytest.raises(KeyError, match="no weights named 'no-such-weights'"):
        LRM.from_pretrained("no-such-weights")
    with pytest.raises(ValueError, match="revision='v2' applies to Hugging Face Hub repo ids"):
        LRM.from_pretrained("dinov2-base", revision="v2")
    with pytest.raises(ValueError, match="not an existing path"):
        LRM.from_pretrained("vfusion3d", revision="v2")  # the folder here


def test_the_shell_form_loads_from_the_cache_and_otherwise_ends_in_one_line(tmp_path):
    hub_cache(tmp_path / "cache", REPO, release_files(released_tiny_state()))
    code = "from vfusion3d_lightning import LRM; LRM.from_pretrained('facebook/vfusion3d'); print('loaded')"
    root = Path(__file__).resolve().parents[1]

    def run(cache: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
               "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)

    ok = run(tmp_path / "cache")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "loaded"
    failed = run(tmp_path / "nothing")
    assert failed.returncode != 0
    last = failed.stderr.strip().splitlines()[-1]  # Python prints the traceback above the error's one line
    assert last.startswith("FileNotFoundError: LRM weights: model.safetensors of Hugging Face Hub repo "
                           "'facebook/vfusion3d'")
    assert f"`hf download facebook/vfusion3d model.safetensors config.json` on a machine with network access and " \
           f"save it as the Hugging Face cache {tmp_path / 'nothing'}" in last


# ---------------------------------------------------------------- sha256 once


def test_a_registry_file_is_hashed_once_and_again_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.CHECKPOINT_DIR_ENV, str(tmp_path))
    path = released_pth(released_tiny_state(), tmp_path / "tiny-release.pth")
    entry = hub.WeightsEntry("tiny-release", "a tiny release", "https://example.org/tiny", "tiny-release.pth",
                             hub.sha256_of(path), "vfusion3d_released", "tiny")
    monkeypatch.setattr(hub, "load_registry", lambda: {"tiny-release": entry})
    hashed = []
    real = hub.sha256_of
    monkeypatch.setattr(hub, "sha256_of", lambda p, *a: hashed.append(Path(p)) or real(p, *a))
    first = lrm_output(LRM.from_pretrained("tiny-release"))
    assert hashed == [path]
    record = json.loads(path.with_name(path.name + hub.VERIFIED_SUFFIX).read_text())
    assert record["sha256"] == entry.sha256 and record["size"] == path.stat().st_size
    assert torch.equal(lrm_output(LRM.from_pretrained("tiny-release")), first)
    assert hashed == [path]  # the second load read the record, not the file
    released_pth(released_tiny_state(2), path)  # replaced by other weights
    with pytest.raises(ValueError, match="has sha256 .* but the registry expects"):
        LRM.from_pretrained("tiny-release")
    assert hashed == [path, path]


def test_a_touched_file_of_the_same_bytes_is_hashed_again(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"weights")
    hashed = []
    real = hub.sha256_of
    monkeypatch.setattr(hub, "sha256_of", lambda p, *a: hashed.append(p) or real(p, *a))
    digest = hub.file_sha256(path)
    assert hub.file_sha256(path) == digest == hashlib.sha256(b"weights").hexdigest() and len(hashed) == 1
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert hub.file_sha256(path) == digest and len(hashed) == 2


# ---------------------------------------------------------------- saving for the Hub


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_lrm_card_has_hub_metadata_and_says_what_is_not_recorded(tmp_path):
    card = (tiny_lrm().save_pretrained(tmp_path / "a") / "README.md").read_text()
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "image-to-3d" and meta["library_name"] == "vfusion3d-lightning"
    assert meta["license"] == "unknown" and "vfusion3d" in meta["tags"]
    for section in ("## Training data\n\nnot recorded", "## Recipe\n\nnot recorded", "## Metrics\n\nnot recorded"):
        assert section in card
    data = {"license": "cc-by-nc-4.0", "training_data": "2.7M curated synthetic multi-view videos",
            "recipe": "configs/lrm/paper.yaml", "metrics": {"CLIP similarity": 0.82}, "tags": ["text-to-3d"],
            "datasets": ["objaverse"]}
    card = (tiny_lrm().save_pretrained(tmp_path / "b", card_data=data) / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "cc-by-nc-4.0" and "text-to-3d" in meta["tags"] and meta["datasets"] == ["objaverse"]
    assert "## Training data\n\n2.7M curated" in card and "| CLIP similarity | 0.82 |" in card
    with pytest.raises(ValueError, match=r"card_data has unknown fields \['lisence'\]"):
        tiny_lrm().save_pretrained(tmp_path / "c", card_data={"lisence": "mit"})


def skops_members(data: bytes) -> list[bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return sorted(re.sub(rb"\d{9,}", b"ID", archive.read(n)) for n in archive.namelist())


def same_files(pushed: dict[str, bytes], written: dict[str, bytes]) -> None:
    assert sorted(pushed) == sorted(written)
    for name, data in written.items():
        if name.endswith(".skops"):  # a zip of the save's times, its members named by object ids: compare them
            assert skops_members(pushed[name]) == skops_members(data)
        else:
            assert pushed[name] == data, name


@pytest.mark.parametrize("name", list(MODELS))
def test_push_to_hub_uploads_what_save_pretrained_writes_and_the_repo_loads_back(name, tmp_path, offline,
                                                                                  monkeypatch):
    """HfApi's create_repo and upload_folder are replaced by recorders: the upload itself is huggingface_hub's
    own code, and no Hub can be reached from the tests. The recorded files then form a Hub cache that
    `from_pretrained(repo_id)` reads."""
    cls, build, output, _ = MODELS[name]
    model = build()
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, revision=None, **kwargs):
        calls.append(("upload_folder", repo_id, folder_files(Path(folder_path)), commit_message, revision))
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    data = {"training_data": "tests", "metrics": {"loss": 1.5}}
    assert model.push_to_hub(f"me/{name}", private=True, card_data=data) == "commit-info"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1:] == (f"me/{name}", {"private": True, "exist_ok": True})
    _, repo, pushed, message, revision = calls[1]
    assert repo == f"me/{name}" and message == f"Upload {cls.__name__} with vfusion3d-lightning" and revision is None
    same_files(pushed, folder_files(model.save_pretrained(tmp_path / "saved", card_data=data)))
    assert "| loss | 1.5 |" in pushed["README.md"].decode()

    hub_cache(tmp_path / "cache", f"me/{name}", pushed)
    loaded = cls.from_pretrained(f"me/{name}", cache_dir=tmp_path / "cache")
    exact = {"rtol": 1e-5, "atol": 1e-5} if name == "video" else {"rtol": 0, "atol": 0}
    torch.testing.assert_close(output(loaded), output(model), **exact)
    with pytest.raises(FileNotFoundError,
                       match=rf"Hugging Face Hub repo 'me/{name}-other' .*`hf download me/{name}-other "):
        cls.from_pretrained(f"me/{name}-other", cache_dir=tmp_path / "cache")


def test_push_to_hub_creates_no_repo_when_saving_fails(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: calls.append(a))
    with pytest.raises(ValueError, match="unknown fields"):
        tiny_lrm().push_to_hub("me/lrm", card_data={"bad": 1})
    assert calls == []


def test_the_video_export_loads_with_diffusers_own_classes(tmp_path):
    model = tiny_video()
    folder = model.save_pretrained(tmp_path / "video")
    index = json.loads((folder / "model_index.json").read_text())
    for part in ("unet", "vae"):
        library, class_name = index[part]
        assert library == "diffusers"
        loaded = getattr(diffusers, class_name).from_pretrained(folder / part)
        ours = getattr(model, part).state_dict()
        assert type(loaded) is type(getattr(model, part))
        assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())
    assert index["unet"] == ["diffusers", "UNetSpatioTemporalConditionModel"]
    assert front_matter((folder / "README.md").read_text())["pipeline_tag"] == "image-to-video"


def test_online_the_options_reach_huggingface_hub_as_given(tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE the files are huggingface_hub's to fetch (recorded here: no network in tests), with
    the caller's revision, cache and token."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    commit = hub_cache(tmp_path / "cache", REPO, release_files(released_tiny_state()))
    snapshot = tmp_path / "cache" / "models--facebook--vfusion3d" / "snapshots" / commit
    calls = []

    def download(repo_id, filename, **options):
        calls.append((repo_id, filename, options))
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    LRM.from_pretrained(REPO, revision="v1", cache_dir=tmp_path / "cache", token="hf_x")
    assert [c[:2] for c in calls] == [(REPO, "model.safetensors"), (REPO, "config.json")]
    assert all(c[2]["revision"] == "v1" and c[2]["token"] == "hf_x" and c[2]["cache_dir"] == tmp_path / "cache"
               and c[2]["local_files_only"] is False for c in calls)
