"""Cap3D-style captions of render shards, with a tiny random BLIP-2 and a tiny random Llama saved to disk and
loaded through transformers' from_pretrained; and the tiny random models themselves."""

import json
import sys
import tarfile

import numpy as np
import pytest
import torch

from vfusion3d_lightning.cli import console_main, main
from vfusion3d_lightning.commands.captions import captions
from vfusion3d_lightning.data import captions as caption_data
from vfusion3d_lightning.data.captions import (
    CaptionSummarizer,
    ViewCaptioner,
    any_uncaptioned,
    clean_caption,
    input_shards,
    plan_captions,
    summarise,
    view_indices,
)
from vfusion3d_lightning.data.prompts import SingleObjectClassifier, parse_answer
from vfusion3d_lightning.data.schema import MultiViewSample, ShardWriter, complete_shards, read_raw_samples
from vfusion3d_lightning.models.tiny_random import CAPTION_WORDS, build_tiny_captioner, build_tiny_llm
from vfusion3d_lightning.training.generation import caption_shards, predict_trainer

VIEWS = 4  # captioned per object, of the samples' 8


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    return build_tiny_captioner(root / "captioner"), build_tiny_llm(root / "llm")


@pytest.fixture(scope="session")
def captioner(tiny_models):
    return ViewCaptioner.from_pretrained(tiny_models[0])


@pytest.fixture(scope="session")
def summarizer(tiny_models):
    return CaptionSummarizer.from_pretrained(tiny_models[1])


def make_sample(key: str, object_id: str, seed: int, views: int = 8, size: int = 32) -> MultiViewSample:
    """A square of a random colour on a transparent background, its shade and texture different in each view."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, 3)
    images = np.zeros((views, size, size, 4), np.uint8)
    box = np.clip(colour + rng.integers(-40, 40, (views, 1, 1, 3)) + rng.integers(-8, 8, (views, 20, 20, 3)), 0, 255)
    images[:, 6:26, 6:26, :3] = box
    images[:, 6:26, 6:26, 3] = 255
    return MultiViewSample(key=key, object_id=object_id, source="3d", images=images, prompt="an old prompt",
                           elevations=np.full(views, 0.2, np.float32), extra={"renderer": "test"})


@pytest.fixture(scope="session")
def shard_folders(tmp_path_factory):
    """orbit: objects 0-5 over two shards; held_out: objects 4 and 5 again (other keys and views), 6 and 7."""
    root = tmp_path_factory.mktemp("renders")
    with ShardWriter(root / "orbit", maxcount=3) as writer:
        for i in range(6):
            writer.write_sample(make_sample(f"orbit{i}", f"object-{i}", i))
    with ShardWriter(root / "held_out", maxcount=3) as writer:
        for i in (4, 5, 6, 7):
            writer.write_sample(make_sample(f"held{i}", f"object-{i}", 100 + i, views=6))
    return [root / "orbit", root / "held_out"]


def test_the_plan_deals_each_object_once_and_the_check_reads_only_what_it_needs(shard_folders, monkeypatch):
    shards = input_shards(shard_folders)
    assert plan_captions(shards, {"object-1"}) == [
        {"shard": str(shards[shard_folders[0]][0]), "objects": ["object-0", "object-2"]},
        {"shard": str(shards[shard_folders[0]][1]), "objects": ["object-3", "object-4", "object-5"]},
        {"shard": str(shards[shard_folders[1]][0]), "objects": ["object-6"]},  # 4 and 5 are in orbit already
        {"shard": str(shards[shard_folders[1]][1]), "objects": ["object-7"]},
    ]
    read, reader = [], caption_data.read_raw_samples
    monkeypatch.setattr(caption_data, "read_raw_samples", lambda path: read.append(path) or reader(path))
    assert any_uncaptioned(shards, set()) and len(read) == 1  # the first shard has an object to caption
    read.clear()
    everything = {f"object-{i}" for i in range(8)}
    assert not any_uncaptioned(shards, everything) and len(read) == 4  # all read to be sure
    assert any_uncaptioned(shards, everything - {"object-7"}) and plan_captions(shards, everything) == []


def run(folders, out, captioner, summarizer, batch_size=3, count=None):
    """caption_shards with the loaded models; `count` collects the number of views of each captioner call."""
    def caption(views):
        if count is not None:
            count.append(len(views))
        return captioner(views)

    return caption_shards(folders, out, lambda device: caption, lambda device: summarizer, views=VIEWS,
                          batch_size=batch_size, trainer=predict_trainer("cpu", progress=False), progress=False)


def records(out):
    return [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]


def tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


# ------------------------------------------------------------------------------------------- the tiny models


def test_tiny_llm_answers_yes_or_no_to_the_prompt_filter(tiny_models):
    classifier = SingleObjectClassifier.from_pretrained(tiny_models[1])
    rng = np.random.default_rng(0)
    captions_ = [" ".join(rng.choice(CAPTION_WORDS, rng.integers(2, 9))) for _ in range(36)]
    captions_ += ["a red wooden chair", "two dogs playing in a park", "a blue teapot", "a city skyline at night"]
    answers = [parse_answer(a) for a in classifier(captions_)]
    assert None not in answers  # every answer parses
    assert 5 <= answers.count(True) <= 35  # both occur
    assert build_tiny_llm(tiny_models[1]) == tiny_models[1]  # an existing folder is kept


def test_tiny_captioner_loads_with_the_blip2_classes_and_is_deterministic(tiny_models, tmp_path):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    processor = Blip2Processor.from_pretrained(tiny_models[0])
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_models[0])
    assert processor.num_query_tokens == model.config.num_query_tokens
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    again = build_tiny_captioner(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (tiny_models[0] / "model.safetensors").read_bytes()


def test_view_captioner_captions_each_view_on_white(captioner):
    views = make_sample("k", "o", 0).images
    captions_ = captioner(views)
    assert len(captions_) == 8 and all(captions_)
    assert set(" ".join(captions_).split()) <= set(CAPTION_WORDS)
    assert captioner(views[2:3]) == captions_[2:3]  # a view's caption does not depend on the batch
    transparent = views.copy()
    transparent[..., :3] = 0
    transparent[:, :6, :, 3] = 0  # black where opaque; white where transparent once composited
    white = transparent.copy()
    white[:, :6, :, :3] = 255
    white[:, :6, :, 3] = 255
    assert captioner(transparent) == captioner(white)


def test_view_indices_spread_evenly():
    assert view_indices(8, 4) == [0, 2, 4, 6]
    assert view_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert view_indices(6, 4) == [0, 1, 3, 4]
    assert view_indices(3, 8) == [0, 1, 2]


def test_clean_caption_and_fallback():
    assert clean_caption(' "A red chair."\nCaption: something else') == "A red chair"
    assert clean_caption("\n\n  Caption:  a   mug \n") == "a mug"
    assert summarise(["a cup", "a mug", "a mug"], " a blue mug.\n") == ("a blue mug", False)
    assert summarise(["a cup", "a mug", "a mug", "a cup"], "\n \n") == ("a cup", True)


# ------------------------------------------------------------------------------------------- the stage


def test_caption_shards_captions_each_object_once_and_copies_the_shards(tmp_path, shard_folders, captioner,
                                                                        summarizer):
    out, count = tmp_path / "out", []
    report = run(shard_folders, out, captioner, summarizer, count=count)
    lines = records(out)
    assert [r["object_id"] for r in lines] == [f"object-{i}" for i in range(8)]  # objects 4, 5 once
    assert sum(count) == 8 * VIEWS and all(len(r["view_captions"]) == VIEWS for r in lines)
    for r in lines:  # the tiny LLM writes no summary (see the last tests): the most frequent view caption
        assert r["fallback"] and r["view_captions"].count(r["caption"]) == max(map(r["view_captions"].count,
                                                                                   r["view_captions"]))
    # object 4's view captions are of views 0, 2, 4, 6 of its first sample (orbit's), not held_out's
    assert lines[4]["view_captions"] == captioner(make_sample("x", "x", 4).images[[0, 2, 4, 6]])
    caption = {r["object_id"]: r["caption"] for r in lines}

    for folder in shard_folders:
        inputs = complete_shards(folder)
        outputs = complete_shards(out / folder.name)
        assert [p.name for p in outputs] == [p.name for p in inputs]
        for source, target in zip(inputs, outputs):
            before, after = tar_members(source), tar_members(target)
            assert sorted(before) == sorted(after)
            for name, data in before.items():
                if not name.endswith(".json"):
                    assert after[name] == data  # views byte-identical
                    continue
                old, new = json.loads(data), json.loads(after[name])
                assert new["prompt"] == caption[new["object_id"]] != old["prompt"]
                assert {k: v for k, v in new.items() if k != "prompt"} == {k: v for k, v in old.items()
                                                                           if k != "prompt"}
    held = {json.loads(raw["json"])["object_id"]: json.loads(raw["json"])["prompt"]
            for path in complete_shards(out / "held_out") for raw in read_raw_samples(path)}
    assert held["object-4"] == caption["object-4"]  # the same caption in both folders

    unique = list(dict.fromkeys(caption[k] for k in sorted(caption)))
    assert (out / "prompts.txt").read_text().splitlines() == unique and len(unique) > 1
    assert report == json.loads((out / "captions_report.json").read_text())
    assert (report["objects"], report["captioned_this_run"], report["fallbacks"], report["samples"]) == \
        (8, 8, 8, {"orbit": 6, "held_out": 4})

    count.clear()
    again = run(shard_folders, out, captioner, summarizer, count=count)  # all done: no model call
    assert count == [] and again["captioned_this_run"] == 0 and len(records(out)) == 8


def test_resume_after_a_kill_captions_only_the_rest(tmp_path, shard_folders, captioner, summarizer):
    reference = tmp_path / "reference"
    run(shard_folders[1:], reference, captioner, summarizer, batch_size=1)

    out = tmp_path / "out"

    calls = []

    def killed(views):
        calls.append(1)
        if len(calls) > 1:  # the second batch
            raise RuntimeError("simulated kill")
        return captioner(views)

    with pytest.raises(RuntimeError, match="simulated kill"):
        caption_shards(shard_folders[1:], out, lambda device: killed, lambda device: summarizer, views=VIEWS,
                       batch_size=1, trainer=predict_trainer("cpu", progress=False), progress=False)
    # the first batch is on file, in the first input shard's part
    part = out / "captions.part-000000.jsonl"
    assert len(part.read_text().splitlines()) == 1 and not (out / "held_out").exists()
    with part.open("a") as handle:
        handle.write('{"object_id": "object-5", "view_cap')  # a kill in the middle of the next write

    count = []
    report = run(shard_folders[1:], out, captioner, summarizer, batch_size=1, count=count)
    assert count == [VIEWS] * 3 and report["captioned_this_run"] == 3
    for path in sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file()):
        if path.name != "captions_report.json":
            assert (out / path).read_bytes() == (reference / path).read_bytes(), path


def test_bad_inputs_name_the_folder(tmp_path, shard_folders, captioner, summarizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no shard-NNNNNN.tar files"):
        run([tmp_path / "empty"], tmp_path / "out", captioner, summarizer)
    with pytest.raises(ValueError, match="different names"):
        run([shard_folders[0], shard_folders[0]], tmp_path / "out", captioner, summarizer)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "captions.jsonl").write_text('{"caption": "a cup"}\n')
    with pytest.raises(ValueError, match=r"captions\.jsonl:1: not a caption record \(no 'object_id' and 'caption'\)"):
        run(shard_folders, tmp_path / "out", captioner, summarizer)


# ------------------------------------------------------------------------------------------- the command


def test_captions_command(tmp_path, shard_folders, tiny_models, capsys):
    folders = f"[{', '.join(map(str, shard_folders))}]"
    assert main(["captions", "--shards", folders, "--out", str(tmp_path / "out"), "--captioner",
                 str(tiny_models[0]), "--llm", str(tiny_models[1]), "--views", "2", "--trainer.accelerator", "cpu",
                 "--progress", "false"]) == 0
    assert "8 objects captioned (8 this run" in capsys.readouterr().out
    assert all(len(r["view_captions"]) == 2 for r in records(tmp_path / "out"))
    with pytest.raises(SystemExit) as exit_:
        main(["captions", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--captioner" in text and "--llm" in text and "Cap3D" in text


@pytest.mark.slow
def test_two_processes_write_the_same_captions_as_one(tmp_path, shard_folders, tiny_models):
    """`--trainer.devices 2` on the CPU (DDP over gloo, a thread a process): the input shards are dealt over the
    ranks; the captions file and the captioned shards are those of one process, byte for byte."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    files = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        done = subprocess.run([sys.executable, "-m", "vfusion3d_lightning.cli", "captions", "--shards",
                               f"[{', '.join(map(str, shard_folders))}]", "--out", str(out), "--captioner",
                               str(tiny_models[0]), "--llm", str(tiny_models[1]), "--views", "2", "--batch_size",
                               "2", "--progress", "false", "--trainer.accelerator", "cpu", "--trainer.devices",
                               str(devices)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("8 objects captioned (8 this run") == 1  # rank 0 only
        files[devices] = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                          if p.is_file() and p.name != "captions_report.json"}
    assert "captions.jsonl" in files[1] and "held_out/shard-000001.tar" in files[1]
    assert not any("part-" in name for name in files[2])
    assert files[1] == files[2]


def test_a_missing_captioner_is_one_line_naming_what_to_fetch(tmp_path, shard_folders, tiny_models, monkeypatch,
                                                               capsys):
    with pytest.raises(FileNotFoundError, match="Salesforce/blip2-opt-2.7b"):
        captions(shard_folders, tmp_path / "out", str(tmp_path / "nope"), str(tiny_models[1]))
    monkeypatch.setattr(sys, "argv", ["vfusion3d-lightning", "captions", "--shards", f"[{shard_folders[0]}]",
                                      "--out", str(tmp_path / "out"), "--captioner", str(tmp_path / "nope"),
                                      "--llm", str(tiny_models[1])])
    assert console_main() == 1  # the command line's entry point
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and message.startswith("vfusion3d-lightning: error: view captioner")
    assert "hf download Salesforce/blip2-opt-2.7b --local-dir checkpoints/blip2-opt-2.7b" in message
    assert "--captioner checkpoints/blip2-opt-2.7b" in message
    assert not (tmp_path / "out").exists()


def test_the_tiny_llm_ends_summaries_at_once_so_captions_fall_back_to_a_view_caption(summarizer):
    view_captions = [["a red chair", "a chair", "a chair"], ["a blue cup", "a cup", "a mug"]]
    assert summarizer(view_captions) == ["", ""]
    assert [summarise(v, "") for v in view_captions] == [("a chair", True), ("a blue cup", True)]


def test_a_summary_is_the_llms_first_line(tiny_models, tmp_path, shard_folders, captioner):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models[1])
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = 0  # now it writes words after "Caption:"
    summarizer = CaptionSummarizer(model, AutoTokenizer.from_pretrained(tiny_models[1]), max_new_tokens=6)
    raw = summarizer([["a red chair", "a chair"], ["a blue cup", "a cup", "a mug"]])
    assert all(len(text.split()) == 6 for text in raw)
    report = run(shard_folders[1:], tmp_path / "out", captioner, summarizer, batch_size=4)  # one batch
    lines = records(tmp_path / "out")
    assert report["fallbacks"] == 0 and not any(r["fallback"] for r in lines)
    assert [r["caption"] for r in lines] == [clean_caption(t) for t in summarizer([r["view_captions"] for r in lines])]
