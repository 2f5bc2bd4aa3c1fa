"""Prompt curation: reading, cleaning, the few-shot prompt, answer parsing, and the resumable LLM stage run on a
tiny Llama saved to disk and loaded through transformers' from_pretrained."""


import json

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from vfusion3d_lightning.cli import main
from vfusion3d_lightning.data import prompts
from vfusion3d_lightning.data.prompts import (
    EXAMPLES,
    SingleObjectClassifier,
    build_prompt,
    clean_captions,
    comparison_key,
    curate_prompts,
    normalise,
    parse_answer,
    read_captions,
    resolve_model,
)
from vfusion3d_lightning.models.tiny_random import build_tiny_llm

# what the tiny model is built to answer for each caption (its first generated word); "maybe" = unparsed
ANSWERS = {
    "a blue teapot": "yes",
    "three cats on a sofa": "no",
    "a wooden toy train with red wheels": "yes",
    "a beach at sunset": "no",
    "a brass trumpet": "maybe",
    "people walking down a busy street in the rain": "no",
    "a green glass bottle": "yes",
    "a stone statue of a lion": "yes",
}
CAPTIONS = list(ANSWERS)
SINGLE = [c for c, a in ANSWERS.items() if a == "yes"]


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """`build_tiny_llm`'s 2-layer Llama and word-level tokenizer, its lm_head refitted to answer as ANSWERS says.

    The rows of "yes", "no" and "maybe" are fitted (least squares) to give +1 to the intended word and -1 to the
    others at the end of each caption's prompt; every other row is 0, so the intended word is the greedy pick.
    A padding bug moves the hidden state and changes the answers.
    """
    folder = build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"), words=CAPTIONS + ["maybe"])
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    fast = PreTrainedTokenizerFast.from_pretrained(folder)
    assert fast.pad_token is None  # so the classifier must set pad = eos itself, as for Llama
    words = ["yes", "no", "maybe"]
    with torch.no_grad():
        hidden = torch.cat([model.model(**fast(build_prompt(c), return_tensors="pt")).last_hidden_state[:, -1]
                            for c in CAPTIONS]).double()  # (8, D)
        target = torch.tensor([[1.0 if ANSWERS[c] == w else -1.0 for w in words] for c in CAPTIONS],
                              dtype=torch.float64)  # (8, 3)
        rows = torch.linalg.lstsq(hidden, target).solution.T  # (3, D)
        model.lm_head.weight.zero_()
        for word, row in zip(words, rows):
            model.lm_head.weight[fast.convert_tokens_to_ids(word)] = row.float()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier(tiny_llm):
    return SingleObjectClassifier.from_pretrained(tiny_llm)


def count_generate(monkeypatch, classifier, fail_after: int | None = None) -> list[int]:
    """Wrap the model's generate: record the batch size of each call; raise on call `fail_after` + 1."""
    model = classifier.model
    calls, generate = [], type(model).generate.__get__(model)  # the class's, not an earlier wrapper

    def wrapped(*args, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise RuntimeError("simulated kill")
        calls.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(classifier.model, "generate", wrapped)
    return calls


def decision_lines(out):
    return [json.loads(line) for line in (out / prompts.DECISIONS_FILE).read_text().splitlines()]


# ------------------------------------------------------------------------------------------- cleaning


def test_normalise_and_comparison_key():
    assert normalise("  a red\t wooden\n chair  ") == "a red wooden chair"
    assert comparison_key(" A Red wooden chair!?. ") == "a red wooden chair"
    assert comparison_key("a mug, blue") != comparison_key("a mug blue")  # only trailing punctuation goes


def test_clean_captions_drops_and_keeps_the_first_occurrence():
    captions = ["  A Red   wooden\tchair ", "a red wooden chair.", "a RED wooden chair!!", "", "   ", "...",
                "chair", "one two three four five six seven", "two dogs playing in a park",
                "Two dogs playing in a park?", "a mug, blue", "a mug blue"]
    kept, counts = clean_captions(captions, min_words=2, max_words=6)
    assert kept == ["A Red wooden chair", "two dogs playing in a park", "a mug, blue", "a mug blue"]
    assert counts == {"read": 12, "empty": 3, "too_short": 1, "too_long": 1, "duplicate": 3, "unique": 4}


def test_word_limits_are_inclusive():
    kept, counts = clean_captions(["a b", "a b c", "a b c d"], min_words=2, max_words=3)
    assert kept == ["a b", "a b c"] and counts["too_long"] == 1 and counts["too_short"] == 0


# ------------------------------------------------------------------------------------------- reading


def test_read_captions_txt_jsonl_csv(tmp_path):
    (tmp_path / "c.txt").write_text("a blue teapot\n\na brass trumpet\n")
    (tmp_path / "c.jsonl").write_text('{"caption": "a blue teapot", "url": "x"}\n\n{"caption": null}\n'
                                      '{"caption": "a brass trumpet"}\n')
    (tmp_path / "t.jsonl").write_text('{"text": "a blue teapot"}\n')
    (tmp_path / "c.csv").write_text('url,caption\nx,a blue teapot\ny,"a brass trumpet, shiny"\n',
                                    encoding="utf-8-sig")  # with a byte-order mark, as Excel writes
    (tmp_path / "t.csv").write_text("text\na blue teapot\n")
    assert read_captions(tmp_path / "c.txt") == ["a blue teapot", "", "a brass trumpet"]
    assert read_captions(tmp_path / "c.jsonl") == ["a blue teapot", "", "a brass trumpet"]
    assert read_captions(tmp_path / "t.jsonl", field="text") == ["a blue teapot"]
    assert read_captions(tmp_path / "c.csv") == ["a blue teapot", "a brass trumpet, shiny"]
    assert read_captions(tmp_path / "t.csv", field="text") == ["a blue teapot"]


def test_read_captions_errors_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"caption": "a"}\n{"text": "a blue teapot"}\n')
    (tmp_path / "t.csv").write_text("text\na blue teapot\n")
    (tmp_path / "c.json").write_text("[]")
    (tmp_path / "n.jsonl").write_text('{"caption": 3}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:2: no 'caption' field .*'text'.*--field"):
        read_captions(tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match=r"t\.csv: no 'caption' column .*'text'.*--field"):
        read_captions(tmp_path / "t.csv")
    with pytest.raises(ValueError, match=r"c\.json: unknown caption file type '\.json'.*\.txt.*\.jsonl.*\.csv"):
        read_captions(tmp_path / "c.json")
    with pytest.raises(ValueError, match=r"n\.jsonl:1: the caption is a int"):
        read_captions(tmp_path / "n.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        read_captions(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------- prompt, answers


def test_build_prompt_has_the_examples_then_the_caption_then_answer():
    text = build_prompt("a brass trumpet")
    assert {single for _, single in EXAMPLES} == {True, False}
    for caption, single in EXAMPLES:
        assert f"Caption: {caption}\nAnswer: {'yes' if single else 'no'}\n" in text
    assert text.endswith("Caption: a brass trumpet\nAnswer:")
    assert text.index("a brass trumpet") > max(text.index(c) for c, _ in EXAMPLES)
    assert build_prompt("x", [("a cup", True)]).count("Caption:") == 2


@pytest.mark.parametrize("text, expected", [
    ("Yes.", True), (" no", False), ("YES, it is", True), ("\n yes\n", True), (' "No"', False),
    ("garbage", None), ("", None), ("not sure", None), ("None", None), ("maybe yes", None), ("yesterday", None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) is expected


# ------------------------------------------------------------------------------------------- the LLM


def test_tiny_llm_answers_as_built_and_batching_does_not_change_answers(classifier):
    one = [answer for caption in CAPTIONS for answer in classifier([caption])]
    three = [answer for start in range(0, len(CAPTIONS), 3) for answer in classifier(CAPTIONS[start:start + 3])]
    assert one == three
    assert [a.split()[0] for a in one] == [ANSWERS[c] for c in CAPTIONS]
    assert classifier.tokenizer.padding_side == "left"
    assert classifier.tokenizer.pad_token == classifier.tokenizer.eos_token


def write_inputs(tmp_path):
    """CAPTIONS over a .txt and a .jsonl file, with duplicates within and across files and one empty line."""
    (tmp_path / "a.txt").write_text("\n".join(CAPTIONS[:5] + ["A Blue Teapot.", ""]) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"caption": c}) + "\n"
                                              for c in CAPTIONS[5:] + ["three cats on a sofa!"]))
    return [tmp_path / "a.txt", tmp_path / "b.jsonl"]


def test_curate_prompts_writes_decisions_prompts_and_report(tmp_path, classifier, monkeypatch):
    files, out = write_inputs(tmp_path), tmp_path / "out"
    loads = []
    report = curate_prompts(files, out, lambda: loads.append(1) or classifier, batch_size=3)
    records = decision_lines(out)
    assert [r["caption"] for r in records] == CAPTIONS  # one line per unique caption, in input order
    assert [r["single_object"] for r in records] == [{"yes": True, "no": False}.get(ANSWERS[c]) for c in CAPTIONS]
    assert all(r["answer"].split()[0] == ANSWERS[r["caption"]] for r in records)
    assert (out / "prompts.txt").read_text() == "".join(c + "\n" for c in SINGLE)
    assert report == json.loads((out / "prompts_report.json").read_text())
    assert report["captions"] == {"read": 11, "empty": 1, "too_short": 0, "too_long": 0, "duplicate": 2,
                                  "unique": 8}
    assert (report["single_object"], report["not_single_object"], report["unparsed"]) == (4, 3, 1)
    assert (report["prompts"], report["decided_this_run"], len(loads)) == (4, 8, 1)

    calls = count_generate(monkeypatch, classifier)
    again = curate_prompts(files, out, lambda: loads.append(1) or classifier, batch_size=3)
    assert (calls, len(loads), again["decided_this_run"]) == ([], 1, 0)  # all decided: the LLM is not even loaded
    assert len(decision_lines(out)) == 8 and again["prompts"] == 4


def test_resume_after_a_kill_asks_only_about_undecided_captions(tmp_path, classifier, monkeypatch):
    files = write_inputs(tmp_path)
    reference = curate_prompts(files, tmp_path / "reference", lambda: classifier, batch_size=3)

    out = tmp_path / "out"
    calls = count_generate(monkeypatch, classifier, fail_after=2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        curate_prompts(files, out, lambda: classifier, batch_size=3)
    assert calls == [3, 3] and len(decision_lines(out)) == 6
    assert not (out / "prompts.txt").exists()
    # a kill in the middle of the next write leaves a partial line; the rerun drops it and redoes its batch
    with (out / prompts.DECISIONS_FILE).open("a") as handle:
        handle.write('{"caption": "a green gl')

    calls = count_generate(monkeypatch, classifier)
    resumed = curate_prompts(files, out, lambda: classifier, batch_size=3)
    assert calls == [2] and resumed["decided_this_run"] == 2
    assert [r["caption"] for r in decision_lines(out)] == CAPTIONS
    assert (out / "prompts.txt").read_text() == (tmp_path / "reference" / "prompts.txt").read_text()
    assert {k: v for k, v in resumed.items() if k != "decided_this_run"} == \
        {k: v for k, v in reference.items() if k != "decided_this_run"}


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path, classifier, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    record = {"caption": CAPTIONS[0], "single_object": True, "answer": "yes"}
    (out / prompts.DECISIONS_FILE).write_text(json.dumps(record))  # killed just before the newline
    calls = count_generate(monkeypatch, classifier)
    curate_prompts(write_inputs(tmp_path), out, lambda: classifier, batch_size=8)
    assert calls == [7]
    assert [r["caption"] for r in decision_lines(out)] == CAPTIONS


def test_a_corrupt_line_before_the_end_is_an_error(tmp_path, classifier):
    out = tmp_path / "out"
    out.mkdir()
    (out / prompts.DECISIONS_FILE).write_text('not json\n{"caption": "a blue teapot"}\n')
    with pytest.raises(ValueError, match=r"decisions\.jsonl:1: not JSON"):
        curate_prompts(write_inputs(tmp_path), out, lambda: classifier)


# ------------------------------------------------------------------------------------------- model lookup, CLI


def test_a_missing_model_says_what_to_download_and_how_to_pass_it(tmp_path):
    for source in [tmp_path / "no-such-folder", "vfusion3d-tests/not-a-cached-model"]:
        with pytest.raises(FileNotFoundError) as err:
            resolve_model(source)
        message = str(err.value)
        assert str(source) in message and "meta-llama/Llama-2-13b-chat-hf" in message
        assert "hf download" in message and "--model" in message and "--allow_download true" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no config.json"):
        SingleObjectClassifier.from_pretrained(tmp_path / "empty")
    assert resolve_model("vfusion3d-tests/not-a-cached-model", local_files_only=False) == \
        "vfusion3d-tests/not-a-cached-model"


def test_prompts_command(tmp_path, tiny_llm, capsys):
    files, out = write_inputs(tmp_path), tmp_path / "out"
    assert main(["prompts", "--captions", f"[{', '.join(map(str, files))}]", "--model", str(tiny_llm), "--out",
                 str(out), "--batch_size", "3", "--dtype", "float32", "--device", "cpu", "--max_new_tokens", "1"]) == 0
    assert (out / "prompts.txt").read_text() == "".join(c + "\n" for c in SINGLE)
    assert [r["answer"] for r in decision_lines(out)] == [ANSWERS[c] for c in CAPTIONS]  # one new token each
    assert "4 prompts" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="meta-llama/Llama-2-13b-chat-hf"):
        main(["prompts", "--captions", f"[{files[0]}]", "--model", str(tmp_path / "nope"), "--out", str(out)])
