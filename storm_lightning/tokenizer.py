"""Tokenizer loading and the chat format (ChatML, as Qwen2 uses).

A conversation ``[{"from": "human"|"gpt", "value": str}, ...]`` becomes::

    <|im_start|>user\n{human}<|im_end|>\n<|im_start|>assistant\n{gpt}<|im_end|>\n ...

and only the assistant text and its ``<|im_end|>`` are trained on (labels elsewhere are -100). The
``<image>`` / ``<video>`` placeholders are single special tokens; the model replaces each with that
sample's visual tokens. Every tokenizer, the bundled one or a real LLM's local directory, is loaded with
``load_tokenizer``, which adds any of these special tokens it lacks.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from storm_lightning.errors import MissingPathError

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN]
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IGNORE_INDEX = -100
OPTION_LETTERS = "ABCDEFGH"  # multiple-choice answers: the letter of the option, at most eight


def load_tokenizer(path: str, key: str = "data.tokenizer_path"):
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer_config.json").is_file():
        raise MissingPathError(f"{key}: '{path}' is not a tokenizer directory (no tokenizer_config.json)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.pad_token is None:
        tok.pad_token = PAD
    return tok


def max_chars_for(tokenizer, max_length: int) -> int:
    """Characters of one turn worth tokenizing when at most ``max_length`` tokens are kept: no token
    is longer than the longest in the vocabulary, so text beyond ``max_length`` times that length lies
    past the cut anyway. Capping first keeps a 200 MB turn from being tokenized whole."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return max_length * max(1, longest) + 1024


def media_token_ids(tokenizer) -> tuple[int, int]:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)


def encode_conversation(tokenizer, conversations: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (assistant tokens only) of a conversation, truncated to ``max_length``.

    Raises ValueError for a conversation without an assistant turn or with an unknown role; the data
    pipeline turns that into a skipped sample.
    """
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, train: bool) -> None:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE_INDEX] * len(piece))

    has_answer = False
    for turn in conversations:
        role = ROLES.get(turn.get("from", ""))
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"bad turn {turn!r}")
        add(f"{IM_START}{role}\n", False)
        if role == "assistant":
            has_answer = True
            add(f"{turn['value']}{IM_END}", True)
            add("\n", False)
        else:
            add(f"{turn['value']}{IM_END}\n", False)
    if not has_answer:
        raise ValueError("conversation has no assistant turn")
    return ids[:max_length], labels[:max_length]


def encode_prompt(tokenizer, conversations: list[dict]) -> list[int]:
    """Token ids of a conversation followed by the assistant header: what generation starts from."""
    text = "".join(f"{IM_START}{ROLES[t['from']]}\n{t['value']}{IM_END}\n" for t in conversations)
    return tokenizer.encode(f"{text}{IM_START}assistant\n", add_special_tokens=False)


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1024) -> None:
    """Train a small byte-level BPE tokenizer (deterministic for the same texts) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=IM_END,
        additional_special_tokens=[IM_START, IMAGE_TOKEN, VIDEO_TOKEN],
    )
    fast.save_pretrained(out_dir)
