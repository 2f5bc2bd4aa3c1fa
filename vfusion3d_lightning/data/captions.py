"""Captions of 3D assets as Cap3D makes them: caption several views of each object, then have an LLM summarise
the view captions into one caption; written into the objects' render shards as their `prompt`.

The paper captions its 3D assets with Cap3D, for the text condition of the video model fine-tuned on orbit
renders and for prompts. Cap3D renders 8 views around each object, has BLIP-2 write 5 nucleus-sampled captions
per view, keeps the one CLIP scores best against the view, and has GPT-4 summarise the 8 into one caption.
Here, with local models through transformers:

1. `ViewCaptioner` (BLIP-2, default Cap3D's `Salesforce/blip2-opt-2.7b`): one beam-search caption per view, for
   `views` views spread evenly over the object's orbit, composited on white. One deterministic caption replaces
   the 5 samples + CLIP pick (no CLIP model needed, and a rerun writes the same captions).
2. `CaptionSummarizer`: the prompt filter's causal LM (data/prompts.py `load_causal_lm`) with a Cap3D-like
   instruction and one worked example, greedy; an empty summary falls back to the most frequent view caption.
3. `caption_shards` (training/generation.py, as Trainer.predict: an input shard a step, spread over ranks)
   appends one record an object to the shard's `captions.part-NNNNNN.jsonl`, fsync'd per batch, then global rank
   0 appends the parts to `captions.jsonl` in input order, so a killed run loses at most a batch and a rerun asks
   the models only about objects not on file:

       {"object_id": "chair-3", "view_captions": ["a red chair", ...], "caption": "a red wooden chair",
        "fallback": false}

   then writes, for each input folder F, `<out>/<F.name>/shard-*.tar`: F's samples with `prompt` set to their
   object's caption (everything else byte-identical), `prompts.txt` (the unique captions) and
   `captions_report.json`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from vfusion3d_lightning.data.prompts import FewShotLM, read_records, resolve_model
from vfusion3d_lightning.data.schema import complete_shards, decode_sample, read_raw_samples
from vfusion3d_lightning.io import atomic_write, on_white, to_uint8_images

DEFAULT_CAPTIONER = "Salesforce/blip2-opt-2.7b"  # Cap3D's view captioner (MIT licence)
CAPTIONER_NOTE = "Cap3D's view captioner, MIT licence"
CAPTIONS_FILE, PROMPTS_FILE, REPORT_FILE = "captions.jsonl", "prompts.txt", "captions_report.json"

SUMMARY_INSTRUCTION = ("Given descriptions of the same 3D object seen from several views, distill them into one "
                       "concise caption of the object. Avoid describing the background, the surface and the "
                       "posture.")
SUMMARY_EXAMPLE: tuple[tuple[str, ...], str] = (
    ("a red chair on a white background", "a wooden chair with a red seat", "a red and brown chair",
     "a 3d model of a chair"),
    "a wooden chair with a red seat",
)


# ---------------------------------------------------------------------------------------------- views


def view_indices(num_views: int, views: int) -> list[int]:
    """`views` view numbers spread evenly over an orbit of `num_views` (all of them when there are fewer)."""
    if views >= num_views:
        return list(range(num_views))
    return [i * num_views // views for i in range(views)]


class ViewCaptioner:
    """Batched image captions from a transformers image-to-text model (BLIP-2); call it on RGBA views.

    Generation starts from the model's own generation config (BLIP-2 OPT ends a caption at a newline, its eos
    there), without sampling.

    Args:
        model, processor: e.g. Blip2ForConditionalGeneration and Blip2Processor.
        max_new_tokens: tokens generated per caption; None: the model's generation config's, else 30.
        num_beams: beam search width (1: greedy); None: the model's generation config's, else 3.
        batch_size: images per generate call.
    """

    def __init__(self, model, processor, max_new_tokens: int | None = None, num_beams: int | None = None,
                 batch_size: int = 64):
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size
        self.generation_config = copy.deepcopy(model.generation_config)
        saved = self.generation_config.to_diff_dict()
        self.generation_config.max_new_tokens = max_new_tokens or saved.get("max_new_tokens", 30)
        self.generation_config.num_beams = num_beams or saved.get("num_beams", 3)
        self.generation_config.do_sample = False
        if self.generation_config.pad_token_id is None:
            self.generation_config.pad_token_id = processor.tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, local_files_only: bool = True, **kwargs) -> ViewCaptioner:
        """Load with AutoProcessor / AutoModelForImageTextToText from a folder or a hub id in the local cache."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = resolve_captioner(source, local_files_only)
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, local_files_only=local_files_only)
        return cls(model.to(device), processor, **kwargs)

    @torch.no_grad()
    def __call__(self, views: np.ndarray) -> list[str]:
        """views: (N, H, W, 4) uint8 RGBA -> N captions, each of the view composited on white."""
        rgb = list(to_uint8_images(on_white(np.asarray(views))))  # N (H, W, 3)
        captions = []
        for start in range(0, len(rgb), self.batch_size):
            pixels = self.processor(images=rgb[start:start + self.batch_size], return_tensors="pt")["pixel_values"]
            tokens = self.model.generate(pixel_values=pixels.to(self.model.device, self.model.dtype),
                                         generation_config=self.generation_config)
            # the image and bos tokens the model puts before the caption are special: skipped here
            texts = self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            captions += [clean_caption(text) for text in texts]
        return captions


def resolve_captioner(source: str | os.PathLike, local_files_only: bool = True) -> str:
    """resolve_model for the view captioner: its missing-model error names Cap3D's BLIP-2."""
    return resolve_model(source, local_files_only, what="view captioner", default=DEFAULT_CAPTIONER,
                         default_note=CAPTIONER_NOTE, option="--captioner")


# ---------------------------------------------------------------------------------------------- the summary


def build_summary_prompt(view_captions: Sequence[str], example: tuple[Sequence[str], str] = SUMMARY_EXAMPLE) -> str:
    """The few-shot prompt for one object's view captions; it ends with "Caption:" for the model to continue."""
    shown, summary = example
    return (f"{SUMMARY_INSTRUCTION}\n\nDescriptions: {'; '.join(shown)}\nCaption: {summary}\n\n"
            f"Descriptions: {'; '.join(view_captions)}\nCaption:")


_LEADING_LABEL = re.compile(r"^(caption|summary)\s*:\s*", re.IGNORECASE)


def clean_caption(text: str) -> str:
    """A model's text -> one caption: its first non-empty line, whitespace collapsed, without a "Caption:" label,
    quotes or a trailing full stop."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    line = _LEADING_LABEL.sub("", " ".join(line.split()))
    return line.strip("\"'` ").rstrip(".").strip()


def summarise(view_captions: Sequence[str], raw_summary: str) -> tuple[str, bool]:
    """(caption, fallback): the cleaned summary, or the most frequent view caption (the first among equals)
    when the summary is empty."""
    caption = clean_caption(raw_summary)
    if caption:
        return caption, False
    return Counter(c for c in view_captions if c).most_common(1)[0][0] if any(view_captions) else "", True


class CaptionSummarizer(FewShotLM):
    """One caption from each object's view captions by a causal LM (greedy), loaded as the prompt filter's
    (`from_pretrained`: data/prompts.py `load_causal_lm`); call it on lists of view captions to get the raw
    continuations."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 40,
                 example: tuple[Sequence[str], str] = SUMMARY_EXAMPLE):
        super().__init__(model, tokenizer, max_new_tokens)
        self.example = example

    def __call__(self, objects: Sequence[Sequence[str]]) -> list[str]:
        """objects: N lists of view captions -> N decoded continuations."""
        return self.continue_prompts([build_summary_prompt(views, self.example) for views in objects])


# ---------------------------------------------------------------------------------------------- the stage


def read_captions_file(path: Path) -> dict[str, dict]:
    """object_id -> caption record, from a captions JSONL file (missing: empty)."""
    return {record["object_id"]: record for record in read_records(path, ["object_id", "caption"], "caption")}


def _object_id(raw: dict) -> str:
    try:
        return str(json.loads(raw["json"])["object_id"])
    except (KeyError, ValueError, TypeError):
        return str(decode_sample(raw).object_id)  # raises the SampleError that names what is wrong


def _input_shards(shard_folders: Sequence[Path]) -> dict[Path, list[Path]]:
    folders = [Path(f) for f in shard_folders]
    names = Counter(f.name for f in folders)
    if not folders or any(count > 1 for count in names.values()):
        raise ValueError(f"pass one or more shard folders with different names (the outputs go to <out>/<name>), "
                         f"got {[str(f) for f in folders]}")
    shards = {}
    for folder in folders:
        shards[folder] = complete_shards(folder)
        if not shards[folder]:
            raise FileNotFoundError(f"shard folder {folder} holds no shard-NNNNNN.tar files; render the assets "
                                    f"there first (vfusion3d-lightning render) or pass the folder that holds them")
    return shards


def _uncaptioned(shards: dict[Path, list[Path]], done: set[str]):
    """(shard path, object_id) of each object still to caption, in the first shard that holds it, in input order;
    read shard by shard as the caller asks."""
    seen = set(done)
    for paths in shards.values():
        for path in paths:
            for raw in read_raw_samples(path):
                object_id = _object_id(raw)
                if object_id not in seen:
                    seen.add(object_id)
                    yield path, object_id


def plan_captions(shards: dict[Path, list[Path]], done: set[str]) -> list[dict]:
    """The objects still to caption, dealt by input shard: [{"shard": path, "objects": [object_id, ...]}], each
    object in the first shard that holds it (input order), shards with none left out."""
    plan: dict[str, list[str]] = {}
    for path, object_id in _uncaptioned(shards, done):
        plan.setdefault(str(path), []).append(object_id)
    return [{"shard": path, "objects": objects} for path, objects in plan.items()]


def any_uncaptioned(shards: dict[Path, list[Path]], done: set[str]) -> bool:
    """Whether `plan_captions` would plan anything, reading shards only up to the first object it would."""
    return next(_uncaptioned(shards, done), None) is not None


def shard_views(path: str | Path, objects: Sequence[str], views: int) -> np.ndarray:
    """The chosen views (N, V, H, W, 4) of `objects`, from the first sample of each in the shard at `path`."""
    wanted, found = set(objects), {}
    for raw in read_raw_samples(Path(path)):
        object_id = _object_id(raw)
        if object_id in wanted and object_id not in found:
            found[object_id] = decode_sample(raw, select=lambda n: view_indices(n, views)).images
    return [found[object_id] for object_id in objects]


def caption_objects(object_views: Sequence[np.ndarray], object_ids: Sequence[str],
                    caption_views: Callable[[np.ndarray], list[str]],
                    summarise_views: Callable[[list[list[str]]], list[str]]) -> list[dict]:
    """One batch: every object's views captioned in one captioner call, then summarised -> caption records."""
    flat = caption_views(np.concatenate(list(object_views)))
    per_object, start = [], 0
    for images in object_views:
        per_object.append(flat[start:start + len(images)])
        start += len(images)
    records = []
    for object_id, view_captions, raw in zip(object_ids, per_object, summarise_views(per_object), strict=True):
        caption, fallback = summarise(view_captions, raw)
        records.append({"object_id": object_id, "view_captions": view_captions, "caption": caption,
                        "fallback": fallback})
    return records


def append_records(path: Path, records: Sequence[dict]) -> None:
    """Append caption records to a JSONL file, fsync'd: a kill after this keeps them."""
    with path.open("a", encoding="utf-8") as out:
        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        out.flush()
        os.fsync(out.fileno())


def _write_captioned_shard(source: Path, target: Path, captions: dict[str, str]) -> int:
    """Copy `source` to `target` (atomically) with each sample's prompt set to its object's caption; the other
    metadata fields and every view file as they were. Returns the number of samples."""
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "wb") as handle, wds.TarWriter(handle, encoder=False, mtime=0) as writer:
            for raw in read_raw_samples(source):
                meta = json.loads(raw["json"])
                meta["prompt"] = captions[str(meta["object_id"])]
                writer.write({**{k: v for k, v in raw.items() if not k.startswith("__")}, "__key__": raw["__key__"],
                              "json": json.dumps(meta).encode()})
                count += 1

    atomic_write(target, write)
    return count


def _count_samples(path: Path) -> int:
    with tarfile.open(path) as tar:
        return sum(1 for member in tar if member.isfile() and member.name.endswith(".json"))


def input_shards(shard_folders: Sequence[str | os.PathLike]) -> dict[Path, list[Path]]:
    return _input_shards([Path(f) for f in shard_folders])


def finish_captions(shards: dict[Path, list[Path]], out_dir: Path, captioned: int, views: int,
                    models: dict[str, str] | None, progress: bool) -> dict:
    """After every object is on file in `captions.jsonl`: the captioned copies of the shards, prompts.txt and
    captions_report.json under `out_dir`; returns the report."""
    records = read_captions_file(out_dir / CAPTIONS_FILE)
    captions = {object_id: record["caption"] for object_id, record in records.items()}
    samples = {}
    for folder, paths in shards.items():
        samples[folder.name] = 0
        for path in tqdm(paths, desc=f"shards {folder.name}", unit="shard", disable=not progress):
            target = out_dir / folder.name / path.name
            samples[folder.name] += _count_samples(target) if target.is_file() else \
                _write_captioned_shard(path, target, captions)
    unique = list(dict.fromkeys(captions[object_id] for object_id in sorted(captions)))
    atomic_write(out_dir / PROMPTS_FILE, lambda tmp: tmp.write_text("".join(f"{c}\n" for c in unique), "utf-8"))
    report = {"inputs": [str(f) for f in shards], "objects": len(records), "captioned_this_run": captioned,
              "fallbacks": sum(bool(r.get("fallback")) for r in records.values()), "prompts": len(unique),
              "samples": samples, "views": views, **(models or {})}
    atomic_write(out_dir / REPORT_FILE, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n", "utf-8"))
    return report
