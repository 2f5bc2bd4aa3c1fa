"""Tiny randomly initialised models saved in each library's own layout (`save_pretrained` folders), for tests and
the quickstart: nothing is downloaded, and each folder loads through the same `from_pretrained` path as the real
model it stands in for. Every builder is deterministic given its seed and idempotent: a folder that already holds
a complete build is returned as it is, and a build is written atomically (a killed build leaves no half folder
that would pass for a complete one).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vfusion3d_lightning.io import atomic_write_folder

# ---------------------------------------------------------------------------------------------- images and CLIP

# the file each layout's loader reads first, moved into place last: its presence marks a complete build
_PIPELINE_INDEX = "model_index.json"
_CLIP_CONFIG = "config.json"
_TEXT_LENGTH = 256  # tokens of the tiny text-to-image text encoder


def _build_once(folder: str | os.PathLike, marker: str, write: Callable[[Path], None]) -> Path:
    """`folder` if it holds `marker` (a complete build), else `write(tmp)` into it atomically, `marker` last."""
    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    return atomic_write_folder(folder, write, last=(marker,))


def build_tiny_text_to_image(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A diffusers `StableDiffusionPipeline` with random weights: a 2-level UNet on 16x16 latents, a 3-level VAE
    (64x64 images by default) and a 2-layer CLIP text encoder over a character-level tokenizer (256 characters),
    with a DDIM scheduler and no safety checker. A 64 px image takes about 10 ms a step on one CPU thread.

    Args:
        folder: where to save it (`DiffusionPipeline.from_pretrained(folder)` loads it).
        seed: seed of the random weights.
    """
    def write(tmp: Path) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from vfusion3d_lightning.models.video.architectures import _TINY_TEXT, char_tokenizer

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=_TINY_TEXT["hidden_size"],
            attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                            norm_num_groups=32, sample_size=64)
        # one token per character: room for a prompt and the object-centric suffix, untruncated
        text_encoder = CLIPTextModel(CLIPTextConfig(**dict(_TINY_TEXT, max_position_embeddings=_TEXT_LENGTH)))
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=char_tokenizer(_TEXT_LENGTH),
                                           unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipeline.save_pretrained(tmp, safe_serialization=True)

    return _build_once(folder, _PIPELINE_INDEX, write)


def build_tiny_clip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A transformers `CLIPModel` + `CLIPProcessor` with random weights (1-layer text and vision towers, 32 px
    images, a character-level tokenizer), as the CLIP scorer of `vfusion3d_lightning.evaluation` loads it.

    Args:
        folder: where to save it (`CLIPModel.from_pretrained(folder)` and `CLIPProcessor.from_pretrained(folder)`).
        seed: seed of the random weights.
    """
    def write(tmp: Path) -> None:
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

        from vfusion3d_lightning.models.video.architectures import char_tokenizer

        tokenizer = char_tokenizer()
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        config = CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                             pad_token_id=eos),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
            projection_dim=8)
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(tmp)
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        CLIPProcessor(image_processor, tokenizer).save_pretrained(tmp)

    return _build_once(folder, _CLIP_CONFIG, write)


# ---------------------------------------------------------------------------------------------- captioning
# A tiny LLM (the prompt filter, the caption summariser) and a tiny BLIP-2 (the view captioner).

# the tiny captioner's vocabulary: object words, so its random captions read like (meaningless) captions
CAPTION_WORDS = ("a an the of with and on small large red blue green yellow white black wooden metal glass stone "
                 "plastic round square tall chair table lamp vase cup bottle box toy car robot house tree statue "
                 "mug teapot shoe hat ball sphere cube cylinder cone model object 3d").split()


def _word_tokenizer(corpus: Sequence[str], special: Sequence[str], **roles: str):
    """A word-level PreTrainedTokenizerFast over `corpus`: lower-cased, split on whitespace only, so a word keeps
    its punctuation ("answer:" is one token)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=roles["unk_token"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=list(special)))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles)


def _words(texts: Sequence[str]) -> list[str]:
    return sorted({word for text in texts for word in text.lower().split()})


def build_tiny_llm(folder: str | os.PathLike, seed: int = 0, words: Sequence[str] = ()) -> Path:
    """A 2-layer Llama with a word-level tokenizer, saved as `AutoModelForCausalLM` / `AutoTokenizer` load it:
    the LLM of the prompt filter (data/prompts.py) and of the caption summariser (data/captions.py).

    Its weights are random, so what it says means nothing; but the output rows of "yes" and "no" are set so that
    greedy decoding after the filter's few-shot prompt answers yes or no (which one depends on the caption, both
    occur): a quickstart filter keeps some captions and drops others, rather than dropping all as unparsed.
    A summary it ends at once (empty), so the caption stage falls back to a view caption and says so
    ("fallback": true); objects keep captions of their own instead of all getting the one string a random
    network writes after "Caption:". The vocabulary is the two prompts' words, CAPTION_WORDS, `words` and
    yes/no; any other word reads as the unknown token. Deterministic given `seed`; an existing folder is
    returned as it is; written atomically.
    """
    def write(tmp: Path) -> None:
        model, tokenizer = _tiny_llm(seed, words)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _build_once(folder, "config.json", write)


def _tiny_llm(seed: int, words: Sequence[str]):
    """build_tiny_llm's (model, tokenizer), in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vfusion3d_lightning.data.captions import build_summary_prompt
    from vfusion3d_lightning.data.prompts import build_prompt

    vocabulary = _words([build_prompt(""), build_summary_prompt([]), *CAPTION_WORDS, *words, "yes no"])
    tokenizer = _word_tokenizer([" ".join(vocabulary)], ["[UNK]", "</s>"], unk_token="[UNK]", eos_token="</s>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # wider than the vocabulary, so that some directions are off every token embedding (see _set_answers)
        hidden_size = max(256, 64 * math.ceil(1.5 * len(tokenizer) / 64))
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=1024,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config).eval()
        # token embeddings far larger than what the layers add (their inputs are RMS-normalised): the last hidden
        # state then says which token it is, which _set_answers keys on, and a little of the context
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(30)

        def caption() -> str:  # to fit on: a random string of the words the tiny captioner writes
            length = int(torch.randint(2, 9, ()))
            return " ".join(CAPTION_WORDS[i] for i in torch.randint(len(CAPTION_WORDS), (length,)))

        questions = [build_prompt(caption()) for _ in range(32)]
        others = [f"{build_summary_prompt([caption() for _ in range(4)])} {caption()}" for _ in range(8)]
        _set_answers(model, tokenizer, questions, others)
    return model, tokenizer


@torch.no_grad()
def _set_answers(model, tokenizer, questions: Sequence[str], others: Sequence[str], margin: float = 4.0) -> None:
    """Set lm_head rows so that greedy decoding answers the prompt filter's questions with yes or no and ends a
    summary at once.

    The hidden state of this network is mostly its token's embedding (see build_tiny_llm), so a direction
    fitted by least squares to be +1 where the token is "answer:" (or "caption:") and -1 elsewhere in
    `questions` and `others` tells those tokens apart. "yes" and "no" get the "answer:" direction, scaled to
    beat every other word there, plus and minus a direction along which the questions' ends vary (off every
    token embedding, so only the context moves it; centred on their median, so both answers occur). The end
    of sequence gets the "caption:" direction: the summary comes out empty and caption_shards falls back to
    a view caption, rather than every object getting the one string a random network writes after "Caption:".
    """
    answer, caption = tokenizer.convert_tokens_to_ids(["answer:", "caption:"])
    rows = [tokenizer(text)["input_ids"] for text in [*questions, *others]]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.eos_token_id] * (width - len(row)) for row in rows])  # right-padded
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.double()  # (N, T, D)
    states, tokens = hidden[mask.bool()], ids[mask.bool()]  # (P, D), (P,)
    ends = hidden[torch.arange(len(questions)), mask[:len(questions)].sum(1) - 1]  # (Q, D)
    is_answer, is_caption = tokens == answer, tokens == caption
    direction, at_answer = _fit(states, is_answer, [torch.where(is_answer, 1.0, -1.0), is_answer.double()])
    (to_caption,) = _fit(states, is_caption, [torch.where(is_caption, 1.0, -1.0)])
    embeddings = model.model.embed_tokens.weight.double()
    basis = torch.linalg.svd(embeddings, full_matrices=True).Vh[len(embeddings):]  # (D - V, D) off the tokens
    median = ends.median(0).values
    spread = basis.T @ torch.linalg.svd((ends - median) @ basis.T, full_matrices=False).Vh[0]  # (D,)
    spread = spread - (median @ spread) * at_answer  # 0 at the median question end
    split = ((ends - median) @ spread).abs().max()
    yes, no, eos = tokenizer.convert_tokens_to_ids(["yes", "no", tokenizer.eos_token])

    def scale(where: torch.Tensor, to: torch.Tensor) -> torch.Tensor:  # to beat every other word there
        rest = model.lm_head.weight.double() @ where.T  # (V, N)
        rest[[yes, no, eos]] = 0
        return margin * (rest.abs().max() + 1) / (where @ to).min().clamp(min=1e-3)

    on = scale(ends, direction)
    model.lm_head.weight[yes] = (on * direction + 0.5 * on / split * spread).float()
    model.lm_head.weight[no] = (on * direction - 0.5 * on / split * spread).float()
    model.lm_head.weight[eos] = (scale(states[is_caption], to_caption) * to_caption).float()


def _fit(states: torch.Tensor, positive: torch.Tensor, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """states (P, D), positive (P,) bool, targets: each (P,) -> (len(targets), D) least-squares directions,
    the positive and the other positions weighted equally."""
    weights = torch.where(positive, (~positive).sum() / positive.sum(), 1.0).double().sqrt()[:, None]
    target = torch.stack(list(targets), 1).double()  # (P, K)
    return torch.linalg.lstsq(states * weights, target * weights).solution.T


def build_tiny_captioner(folder: str | os.PathLike, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny BLIP-2 (2-layer ViT, 2-layer Q-Former with 8 queries, 2-layer OPT) with a Blip2Processor (a
    BlipImageProcessor at `image_size` pixels and a word-level tokenizer of CAPTION_WORDS with OPT's special
    tokens and BLIP-2's "<image>"), saved as `AutoProcessor` / `AutoModelForImageTextToText` (or the Blip2
    classes) load it: the view captioner of data/captions.py. Its weights are random, so its captions are
    strings of CAPTION_WORDS that mean nothing; but its output rows are set so that different images (colours,
    mostly) get different captions. Deterministic given `seed`; an existing folder is returned as it
    is; written atomically."""
    def write(tmp: Path) -> None:
        model, processor = _tiny_captioner(seed, image_size)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return _build_once(folder, "config.json", write)


def _tiny_captioner(seed: int, image_size: int):
    """build_tiny_captioner's (model, processor), in memory."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    num_query_tokens = 8
    tokenizer = _word_tokenizer([" ".join(CAPTION_WORDS)], ["<pad>", "</s>", "<unk>", "<image>"],
                                unk_token="<unk>", bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                extra_special_tokens={"image_token": "<image>"})
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("pad", "<pad>"), ("eos", "</s>"), ("image", "<image>"))}
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=image_size, patch_size=8),
        qformer_config=Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, encoder_hidden_size=32, vocab_size=len(tokenizer)),
        text_config=OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                              bos_token_id=ids["eos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                              tie_word_embeddings=False),
        num_query_tokens=num_query_tokens, image_token_index=ids["image"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config).eval()
        _words_follow_the_image(model, processor, [tokenizer.convert_tokens_to_ids(w) for w in CAPTION_WORDS])
    # short captions of distinct words (a random model otherwise repeats one word to the length limit)
    model.generation_config.update(max_new_tokens=6, num_beams=1, no_repeat_ngram_size=1)
    return model, processor


@torch.no_grad()
def _words_follow_the_image(model, processor, words: Sequence[int], directions: int = 4, gain: float = 3.0) -> None:
    """Add to the output rows of `words` random multiples of the directions along which the language model's
    hidden state (where the caption starts) varies most over random images, `gain` times the spread of the
    random rows' scores: a random network's first word otherwise hardly depends on the image."""
    generator = torch.Generator().manual_seed(0)
    size = processor.image_processor.size["height"]
    images = torch.ones(64, size, size, 3)  # white, with a box of a random colour at a random place
    for image in images:
        x, y = torch.randint(0, size // 2, (2,), generator=generator)
        width = int(torch.randint(size // 4, size, (), generator=generator))
        image[y:y + width, x:x + width] = torch.rand(3, generator=generator)
    pixels = processor(images=list((images * 255).byte().numpy()), return_tensors="pt")["pixel_values"]
    start = [model.config.image_token_index] * model.config.num_query_tokens + [model.config.text_config.bos_token_id]
    captured = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _, args, __: captured.append(args[0][:, -1]))
    try:
        model(pixel_values=pixels, input_ids=torch.tensor([start] * len(images)))
    finally:
        hook.remove()
    hidden = captured[0].double()  # (N, D)
    centred = hidden - hidden.mean(0)
    _, values, basis = torch.linalg.svd(centred, full_matrices=False)
    basis = basis[:directions] / (values[:directions, None] / len(hidden) ** 0.5)  # unit spread along each
    head, words = model.get_output_embeddings().weight, list(words)
    spread = (head[words].double() @ hidden.T).std(0).mean()  # of the words' scores at an image
    codes = torch.randn(len(words), directions, generator=generator, dtype=torch.float64)
    head[words] += (gain * spread * codes @ basis).float()
