"""A word-level tokenizer built with the `tokenizers` library, for the project's own small models."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"]
PUNCTUATION = [*".,:;?!'\"()-/", "\n"]
BASE_WORDS = [
    "a",
    "an",
    "the",
    "is",
    "are",
    "was",
    "were",
    "be",
    "of",
    "in",
    "on",
    "at",
    "to",
    "from",
    "with",
    "and",
    "or",
    "not",
    "no",
    "yes",
    "this",
    "that",
    "these",
    "those",
    "it",
    "its",
    "what",
    "which",
    "who",
    "where",
    "when",
    "how",
    "many",
    "much",
    "color",
    "colour",
    "shape",
    "size",
    "count",
    "number",
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "center",
    "centre",
    "above",
    "below",
    "behind",
    "front",
    "next",
    "near",
    "far",
    "first",
    "second",
    "third",
    "last",
    "image",
    "images",
    "picture",
    "video",
    "frame",
    "frames",
    "object",
    "objects",
    "thing",
    "things",
    "there",
    "here",
    "do",
    "does",
    "did",
    "show",
    "shows",
    "shown",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "grey",
    "cyan",
    "magenta",
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "rectangle",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "zero",
    "up",
    "down",
    "moving",
    "moves",
    "moved",
    "move",
    "appear",
    "appears",
    "appeared",
    "disappear",
    "disappears",
    "disappeared",
    "same",
    "different",
    "match",
    "matches",
    "text",
    "read",
    "says",
    "say",
    "word",
    "letter",
    "letters",
    "answer",
    "question",
    "describe",
    "user",
    "assistant",
    "system",
    "please",
    "single",
    "phrase",
    "using",
]


def word_vocabulary(extra: Iterable[str] = ()) -> list[str]:
    """Specials, punctuation, digits, letters and a small English word list, without duplicates."""
    seen: dict[str, None] = {}
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    for token in [
        *SPECIAL_TOKENS,
        *PUNCTUATION,
        *map(str, range(10)),
        *letters,
        *BASE_WORDS,
        "USER",
        "ASSISTANT",
        *extra,
    ]:
        seen.setdefault(token, None)
    return list(seen)


def build_word_tokenizer(
    words: Iterable[str], chat_template: str, markers: Iterable[str] = ()
) -> PreTrainedTokenizerFast:
    """``markers``: words of the vocabulary kept whole as special tokens (a chat template's ``<|im_start|>``)."""
    vocab = {word: i for i, word in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Whitespace()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=chat_template,
        padding_side="left",
    )
    markers = list(markers)
    if markers:
        missing = [m for m in markers if m not in vocab]
        if missing:
            raise ValueError(f"markers missing from the vocabulary: {missing}")
        tokenizer.add_special_tokens({"additional_special_tokens": markers})
    return tokenizer
