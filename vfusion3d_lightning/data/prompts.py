"""Object-centric prompts: web captions -> cleaned, de-duplicated -> kept where an LLM says "one object".

The paper gathers captions from the web and keeps those that describe a single object, asking Llama2-13B with
in-context examples. Here, stage by stage:

1. `read_captions`: a .txt file (one caption a line), a .jsonl file (a field, default "caption") or a .csv
   file (a column, default "caption").
2. `clean_captions`: whitespace collapsed; empty, too short and too long captions dropped; duplicates dropped
   case-insensitively and ignoring trailing punctuation, keeping the first occurrence's text.
3. `SingleObjectClassifier`: a transformers causal LM answers yes/no after a few-shot prompt (`build_prompt`);
   `parse_answer` reads the answer, None ("unparsed") when it is neither.
4. `curate_prompts`: appends one decision a caption to `decisions.jsonl`, flushed and fsync'd per batch, so a
   killed run loses at most one batch and a rerun asks the model only about undecided captions:

       {"caption": "a red wooden chair", "single_object": true, "answer": " Yes"}

   then writes `prompts.txt` (the kept captions, one a line) and `prompts_report.json` (counts) atomically.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Self

import torch
from tqdm import tqdm

from vfusion3d_lightning.data.labels import repair_jsonl_tail
from vfusion3d_lightning.io import atomic_write, read_jsonl

DEFAULT_MODEL = "meta-llama/Llama-2-13b-chat-hf"  # the paper's filter (Llama2-13B); gated on the hub
DECISIONS_FILE, PROMPTS_FILE, REPORT_FILE = "decisions.jsonl", "prompts.txt", "prompts_report.json"
DROP_REASONS = ("empty", "too_short", "too_long", "duplicate")

INSTRUCTION = ("Does the image caption describe a single object (one thing on its own, not a scene, a place, "
               "people doing something, or several things)? Answer yes or no.")
# balanced yes/no, with the near misses (places, groups, scenes) the filter exists to catch
EXAMPLES: tuple[tuple[str, bool], ...] = (
    ("a red wooden chair", True),
    ("two dogs playing in a park", False),
    ("a ceramic mug with a floral pattern", True),
    ("a city skyline at night", False),
    ("a vintage leather backpack", True),
    ("a family having dinner at a table", False),
    ("a toy robot made of tin", True),
    ("a laptop, a phone and a notebook on a desk", False),
)

_ANSWER = re.compile(r"\s*\W*\s*(yes|no)\b", re.IGNORECASE)
_TRAILING_PUNCTUATION = re.compile(r"[\s.,;:!?…'\"]+$")


# ---------------------------------------------------------------------------------------------- procedural

_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "pink")
_MATERIALS = ("wooden", "ceramic", "metal", "plastic", "glass", "leather", "knitted", "stone", "rubber", "paper")
_OBJECTS = ("chair", "teapot", "lamp", "vase", "robot", "backpack", "mug", "sneaker", "guitar", "clock", "toy car",
            "helmet", "kettle", "stool", "bucket", "trophy", "lantern", "rocking horse", "bottle", "basket")
_SCENES = ("two {a}s on a shelf in a shop", "a kitchen with a {a} and a table", "people sitting around a {a}",
           "a street at night with a {a}", "a {a} and a {b} on a desk", "a living room with a sofa and a {a}",
           "children playing with a {a} in a garden", "a market stall full of {a}s")


def procedural_captions(count: int, seed: int = 0) -> list[str]:
    """`count` seeded web-like captions for demos and tests: about two in three describe one object ("a red
    wooden chair"), the rest scenes, groups and places that the single-object filter exists to drop."""
    import numpy as np

    rng = np.random.default_rng([seed, 26])
    captions = []
    for _ in range(count):
        a, b = (str(o) for o in rng.choice(_OBJECTS, 2, replace=False))
        if rng.random() < 2 / 3:
            captions.append(f"a {rng.choice(_COLOURS)} {rng.choice(_MATERIALS)} {a}")
        else:
            captions.append(str(rng.choice(_SCENES)).format(a=a, b=b))
    return captions


def procedural_caption_words() -> list[str]:
    """Every word `procedural_captions` can use, in a fixed order (a tiny random LLM's vocabulary)."""
    plurals = [f"{name}s" for name in _OBJECTS]
    text = " ".join((*_COLOURS, *_MATERIALS, *_OBJECTS, *plurals, *_SCENES))
    return list(dict.fromkeys(text.replace("{a}s", "").replace("{a}", "").replace("{b}", "").split()))


# ---------------------------------------------------------------------------------------------- reading


def read_captions(path: str | os.PathLike, field: str = "caption") -> list[str]:
    """Raw captions of one file, in file order: .txt (a line each), .jsonl (`field` of each record) or .csv
    (column `field`). Blank .txt lines are kept (as empty captions) so that `clean_captions` counts them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8-sig").splitlines()
    if suffix == ".jsonl":
        return _read_jsonl(path, field)
    if suffix == ".csv":
        return _read_csv(path, field)
    raise ValueError(f"{path}: unknown caption file type {path.suffix!r}; use .txt (one caption a line), .jsonl "
                     f"(one JSON object a line, the caption in a field: --field) or .csv (a header row, the "
                     f"caption in a column: --field)")


def _read_jsonl(path: Path, field: str) -> list[str]:
    captions = []
    for number, record in read_jsonl(path):
        if not isinstance(record, dict) or field not in record:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{number}: no {field!r} field (found {fields}); pass --field NAME for the "
                             f"field that holds the caption")
        captions.append(_caption_value(record[field], f"{path}:{number}"))
    return captions


def _read_csv(path: Path, field: str) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel writes a byte-order mark
        reader = csv.DictReader(handle)
        if field not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no {field!r} column (header: {reader.fieldnames}); pass --field NAME for "
                             f"the column that holds the caption")
        return [_caption_value(row[field], f"{path}:{number}") for number, row in enumerate(reader, 2)]


def _caption_value(value, where: str) -> str:
    if value is None:  # a null field or a short csv row: an empty caption, counted as such
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: the caption is a {type(value).__name__} ({value!r}), expected a string")
    return value


# ---------------------------------------------------------------------------------------------- cleaning


def normalise(caption: str) -> str:
    """Strip and collapse every run of whitespace (newlines and tabs too) to one space."""
    return " ".join(caption.split())


def comparison_key(caption: str) -> str:
    """What duplicates share: the normalised caption, lower-cased, without trailing punctuation."""
    return _TRAILING_PUNCTUATION.sub("", normalise(caption)).casefold()


def clean_captions(captions: Iterable[str], min_words: int = 2, max_words: int = 40) -> tuple[list[str], dict]:
    """Normalised captions to classify, and the drop counts.

    Returns (kept, counts): kept in first-occurrence order, each the normalised text of its first occurrence
    (case and punctuation as written); counts = {"read", "empty", "too_short", "too_long", "duplicate", "unique"}.
    A caption of only punctuation counts as empty; word counts are on whitespace.
    """
    counts = dict.fromkeys(("read", *DROP_REASONS, "unique"), 0)
    seen: set[str] = set()
    kept = []
    for raw in captions:
        counts["read"] += 1
        text, key = normalise(raw), comparison_key(raw)
        words = len(text.split())
        reason = ("empty" if not key else "too_short" if words < min_words else "too_long" if words > max_words
                  else "duplicate" if key in seen else None)
        if reason:
            counts[reason] += 1
            continue
        seen.add(key)
        kept.append(text)
    counts["unique"] = len(kept)
    return kept, counts


# ---------------------------------------------------------------------------------------------- the LLM


def build_prompt(caption: str, examples: Sequence[tuple[str, bool]] = EXAMPLES) -> str:
    """The few-shot prompt for one caption; it ends with "Answer:" for the model to continue."""
    shots = "".join(f"Caption: {text}\nAnswer: {'yes' if single else 'no'}\n\n" for text, single in examples)
    return f"{INSTRUCTION}\n\n{shots}Caption: {caption}\nAnswer:"


def parse_answer(text: str) -> bool | None:
    """The model's continuation -> True (yes), False (no), None when it starts with neither word."""
    match = _ANSWER.match(text)
    return None if match is None else match.group(1).lower() == "yes"


GATED_NOTE = "gated: accept its licence on huggingface.co, then `hf auth login`"


def resolve_model(source: str | os.PathLike, local_files_only: bool = True, what: str = "LLM",
                  default: str = DEFAULT_MODEL, default_note: str = f"the paper's, {GATED_NOTE}",
                  option: str = "--model") -> str:
    """`source` as from_pretrained takes it: a folder with config.json, or a hub id in the local HF cache
    (any hub id when `local_files_only` is False). FileNotFoundError says what to download and where.

    Args:
        what, default, default_note, option: for the error: what the model is, the hub id to fetch, a note on
            it (whose choice, its licence) and the argument that takes the folder.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; pass the folder that `hf download` or "
                                    f"save_pretrained wrote (config.json, tokenizer files, weights)")
        return str(path)
    if local_files_only and not _in_hub_cache(str(source)):
        from vfusion3d_lightning.hub import missing_weights_error

        target = f"checkpoints/{default.rsplit('/', 1)[-1]}"
        raise missing_weights_error(
            f"{what} {str(source)!r} (neither a folder nor a hub id in the local Hugging Face cache)",
            f"{default} ({default_note}) with `hf download {default} --local-dir {target}`", target,
            f"then pass {option} {target}, or pass --allow_download true to fetch {str(source)!r} from the hub")
    return str(source)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # HFValidationError: not a valid hub id, so certainly not cached
        return False


def load_causal_lm(source: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, local_files_only: bool = True):
    """(model, tokenizer) with AutoModelForCausalLM / AutoTokenizer from a folder or hub id (see resolve_model),
    the tokenizer set up for batched generation: padding on the left, so each row's last prompt token sits at
    the end where generation starts; a tokenizer without a pad token (Llama's) pads with eos, which the
    attention mask hides."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(source, local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_files_only)
    return model.to(device).eval(), prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer):
    """Left padding, and a pad token (eos where the tokenizer has none), for batched generation."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def generate_continuations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """prompts: N strings -> N decoded continuations (greedy, at most max_new_tokens tokens)."""
    from transformers import GenerationConfig

    batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    # a fresh config: a chat model's own sets temperature/top_p, which greedy decoding would warn about
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    tokens = model.generate(**batch, generation_config=config)  # (N, prompt length + new tokens)
    new = tokens[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


class FewShotLM:
    """A causal LM that continues prompts greedily, in batches; subclasses build the prompts."""

    def __init__(self, model, tokenizer, max_new_tokens: int):
        self.model, self.tokenizer = model.eval(), prepare_tokenizer(tokenizer)
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, local_files_only: bool = True, **kwargs) -> Self:
        """Load model and tokenizer with `load_causal_lm` from a folder or hub id; kwargs go to __init__."""
        return cls(*load_causal_lm(source, device, dtype, local_files_only), **kwargs)

    def continue_prompts(self, prompts: Sequence[str]) -> list[str]:
        return generate_continuations(self.model, self.tokenizer, prompts, self.max_new_tokens)


class SingleObjectClassifier(FewShotLM):
    """Batched yes/no answers from a causal LM; call it on captions to get the raw continuations."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 4,
                 examples: Sequence[tuple[str, bool]] = EXAMPLES):
        super().__init__(model, tokenizer, max_new_tokens)
        self.examples = examples

    def __call__(self, captions: Sequence[str]) -> list[str]:
        """captions: N strings -> N decoded continuations (greedy, at most max_new_tokens tokens)."""
        return self.continue_prompts([build_prompt(c, self.examples) for c in captions])


# ---------------------------------------------------------------------------------------------- the stage


def read_records(path: Path, fields: Sequence[str], what: str) -> Iterator[dict]:
    """The records of an append-only JSONL log (none if the file is missing), each checked to hold `fields`:
    a ValueError naming the line and calling it no `what` record otherwise."""
    if not path.is_file():
        return
    for number, record in read_jsonl(path, "remove the line or start a new --out"):
        if not isinstance(record, dict) or not set(fields) <= set(record):
            raise ValueError(f"{path}:{number}: not a {what} record (no {' and '.join(map(repr, fields))}); was "
                             f"the file written by another tool? Start a new --out")
        yield record


def read_decisions(path: Path) -> dict[str, dict]:
    """comparison_key(caption) -> decision record, from a decisions JSONL file (missing: empty)."""
    return {comparison_key(record["caption"]): record for record in read_records(path, ["caption"], "decision")}


def classify_pending(captions: Sequence[str], decisions_path: Path,
                     load_classifier: Callable[[], Callable[[list[str]], list[str]]],
                     batch_size: int = 8) -> tuple[dict[str, dict], int]:
    """Decide every caption not yet in `decisions_path`, appending a line each, fsync'd per batch.

    `load_classifier()` -> captions -> raw answers; called only when something is pending (a finished rerun
    never loads the LLM). Returns (comparison_key -> record for all decisions on file, number decided now).
    """
    repair_jsonl_tail(decisions_path)
    decisions = read_decisions(decisions_path)
    pending = [c for c in captions if comparison_key(c) not in decisions]
    if not pending:
        return decisions, 0
    classify = load_classifier()
    decisions_path.parent.mkdir(parents=True, exist_ok=True)
    with decisions_path.open("a", encoding="utf-8") as out, \
            tqdm(total=len(pending), desc="single-object", unit="caption") as progress:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            records = [{"caption": c, "single_object": parse_answer(a), "answer": a}
                       for c, a in zip(batch, classify(batch), strict=True)]
            out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            out.flush()
            os.fsync(out.fileno())  # a kill now loses at most the batch in flight
            decisions.update((comparison_key(r["caption"]), r) for r in records)
            progress.update(len(batch))
    return decisions, len(pending)


def curate_prompts(caption_files: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                   load_classifier: Callable[[], Callable[[list[str]], list[str]]], field: str = "caption",
                   batch_size: int = 8, min_words: int = 2, max_words: int = 40, model_name: str = "") -> dict:
    """Read, clean, classify (resumable) and write prompts.txt + prompts_report.json in `out_dir`; the report.

    Captions from all files are cleaned together, so a duplicate across files is dropped too.
    """
    if batch_size < 1 or min_words < 0 or max_words < min_words:
        raise ValueError(f"need batch_size >= 1 and 0 <= min_words <= max_words, got batch_size={batch_size}, "
                         f"min_words={min_words}, max_words={max_words}")
    out_dir = Path(out_dir)
    raw = [caption for path in caption_files for caption in read_captions(path, field)]
    captions, counts = clean_captions(raw, min_words, max_words)
    decisions, decided_now = classify_pending(captions, out_dir / DECISIONS_FILE, load_classifier, batch_size)
    outcomes = [decisions[comparison_key(c)]["single_object"] for c in captions]
    kept = [c for c, single in zip(captions, outcomes) if single is True]
    atomic_write(out_dir / PROMPTS_FILE, lambda tmp: tmp.write_text("".join(f"{c}\n" for c in kept), "utf-8"))
    report = {"inputs": [str(p) for p in caption_files], "model": model_name, "captions": counts,
              "single_object": outcomes.count(True), "not_single_object": outcomes.count(False),
              "unparsed": outcomes.count(None), "decided_this_run": decided_now, "prompts": len(kept)}
    atomic_write(out_dir / REPORT_FILE, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n", "utf-8"))
    return report


# ---------------------------------------------------------------------------------------------- command line
