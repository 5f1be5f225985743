"""Captions for the toy latents (fae_fast.data.toy): class k is a coloured shape, named in several wordings,
embedded once by a small text tower of SigLIP 2's class with random weights (seeded: no weights to
download), so that the text-to-image path can be trained and judged on CPU in minutes. A caption steers
when the samples it draws land nearest its own class's mean."""
import functools

import torch

from fae_fast.text import FrozenTextEncoder, require_transformers

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square")
WORDINGS = ("a {colour} {shape}", "the {shape} is {colour}", "{shape} coloured {colour}")


def class_words(k: int) -> dict:
    return {"colour": COLOURS[(k // len(SHAPES)) % len(COLOURS)], "shape": SHAPES[k % len(SHAPES)]}


def toy_captions(num_classes: int) -> list[list[str]]:
    """Every class's wordings: [[caption, ...] per class]."""
    if num_classes > len(COLOURS) * len(SHAPES):
        raise ValueError(f"the toy captions name {len(COLOURS) * len(SHAPES)} classes, not {num_classes}; use "
                         f"model.num_classes <= {len(COLOURS) * len(SHAPES)} with data.source=toy_captions")
    return [[w.format(**class_words(k)) for w in WORDINGS] for k in range(num_classes)]


def toy_text_encoder(text_dim: int, text_length: int, seed: int = 0) -> FrozenTextEncoder:
    """A 2-layer Siglip2TextModel of width text_dim with random weights from `seed`, and a word-level
    tokenizer of the toy captions' words."""
    require_transformers()  # one clear error when the [text] extra is missing
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Siglip2TextConfig, Siglip2TextModel

    words = ["<pad>", "<unk>", "<eos>"] + sorted({w for c in toy_captions(len(COLOURS) * len(SHAPES))
                                                   for caption in c for w in caption.split()})
    vocabulary = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocabulary.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocabulary, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")
    config = Siglip2TextConfig(vocab_size=len(words), hidden_size=text_dim, intermediate_size=2 * text_dim,
                               num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=text_length,
                               projection_size=text_dim, pad_token_id=0, bos_token_id=None, eos_token_id=2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tower = Siglip2TextModel(config)
    return FrozenTextEncoder(tokenizer, tower, max_length=text_length)


@functools.lru_cache(maxsize=4)
def toy_caption_embeddings(num_classes: int, text_dim: int, text_length: int, seed: int = 0) -> torch.Tensor:
    """(num_classes, wordings, text_length, text_dim) float32: every toy caption embedded."""
    captions = toy_captions(num_classes)
    flat = toy_text_encoder(text_dim, text_length, seed)([c for wordings in captions for c in wordings])
    return flat.view(num_classes, len(WORDINGS), text_length, text_dim).float()


def caption_conditions(model_cfg, labels: torch.Tensor, wordings: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Caption embeddings (B, text_length, text_dim) for class `labels` (B,) in wordings `wordings` (B,)."""
    table = toy_caption_embeddings(model_cfg.num_classes, model_cfg.text_dim, model_cfg.text_length, seed)
    return table[labels.cpu(), wordings.cpu() % len(WORDINGS)].to(labels.device)
