"""Tokenizer loading and the chat format.

A conversation ``[{"from": "human"|"gpt", "value": str}, ...]`` is rendered by the tokenizer's own chat
template when it has one (a real LLM's: Llama 3, Qwen2, ...), else as ChatML (the bundled tokenizer)::

    <|im_start|>user\n{human}<|im_end|>\n<|im_start|>assistant\n{gpt}<|im_end|>\n ...

and only the assistant replies and their end-of-turn token are trained on (labels elsewhere are -100). The
``<image>`` / ``<video>`` placeholders are single special tokens; the model replaces each with that
sample's visual tokens. Every tokenizer, the bundled one or a real LLM's local directory, is loaded with
``load_tokenizer``, which adds any of these special tokens it lacks.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from storm_lightning.errors import ConfigError, MissingPathError, UserError

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
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as exn:  # a cut or foreign file: JSONDecodeError, OSError, ValueError, ...
        detail = " ".join(str(exn).split())[:200]
        raise UserError(f"{key}: '{path}' is not a readable tokenizer: {type(exn).__name__}: {detail}") from None
    # the media placeholders always; ChatML's tokens only for a tokenizer without a chat template of its own
    wanted = [IMAGE_TOKEN, VIDEO_TOKEN] if tok.chat_template is not None else SPECIAL_TOKENS
    missing = [t for t in wanted if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})
    if tok.pad_token is None:  # padding is masked out: any token will do, the end-of-text one if there is one
        tok.pad_token = tok.eos_token if tok.eos_token is not None else PAD
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary (every token and its id, added ones included: what a checkpoint's
    embedding rows mean) and of the chat template (the format its prompts were trained in: a base and an
    instruct tokenizer share a vocabulary and differ there). Same fingerprint, same ids and prompts."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    spec = json.dumps([vocab, tokenizer.chat_template], ensure_ascii=False, default=str)
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()[:16]


def check_system_prompt(system_prompt: str | None, key: str = "data.system_prompt") -> None:
    """A system prompt is text: a media placeholder in it would take the place of a sample's medium."""
    if system_prompt and (IMAGE_TOKEN in system_prompt or VIDEO_TOKEN in system_prompt):
        raise ConfigError(f"{key}: contains a media placeholder ({IMAGE_TOKEN} or {VIDEO_TOKEN}): each sample's "
                          "medium goes where its own turn puts it; write the prompt without one")


def max_chars_for(tokenizer, max_length: int) -> int:
    """Characters of one turn worth tokenizing when at most ``max_length`` tokens are kept: no token
    is longer than the longest in the vocabulary, so text beyond ``max_length`` times that length lies
    past the cut anyway. Capping first keeps a 200 MB turn from being tokenized whole."""
    return max_length * _longest_token(tokenizer) + 1024


@functools.lru_cache(maxsize=8)  # a tokenizer is hashed by identity; its vocabulary is read once
def _longest_token(tokenizer) -> int:
    return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))


# a chat template is code from the tokenizer's folder: jinja's sandbox bounds what it may touch, not how
# long it runs (nested loops), so every rendering of one conversation gets this many seconds
TEMPLATE_SECONDS = 10.0


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise ValueError in the block after ``seconds`` (SIGALRM: the main thread of a process only, which
    is where samples are encoded: data workers, storm-shards' workers, storm-chat; elsewhere unbounded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise ValueError(f"the tokenizer's chat template ran for more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _rendered(text: str, messages: list[dict]) -> str:
    """A template's rendering, refused when it is far longer than what it renders (its headers are a
    few tokens a turn): tokenizing 12 MB made of a few words took 13 s and 3 GB, past the time limit,
    in the tokenizer's native code."""
    if len(text) > 2 * sum(len(m["content"]) for m in messages) + 100_000:
        raise ValueError(f"the tokenizer's chat template rendered {len(text)} characters from "
                         f"{sum(len(m['content']) for m in messages)}")
    return text


def _within(messages: list[dict], max_chars: int) -> list[dict]:
    """The first messages, up to the one that passes ``max_chars`` characters: no token is longer than
    the vocabulary's longest, so what follows lies past ``max_length`` tokens. (A template renders
    every prefix with an assistant turn: 2,000 exchanges took 34 s where the cut needs a few.)"""
    total = 0
    for i, m in enumerate(messages):
        total += len(m["content"])
        if total > max_chars:
            return messages[: i + 1]
    return messages


def media_token_ids(tokenizer) -> tuple[int, int]:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)


def _messages(conversations: list[dict], system_prompt: str | None) -> list[dict]:
    messages = []
    for turn in conversations:
        role = ROLES.get(turn.get("from", ""))
        if role is None or not isinstance(turn.get("value"), str):
            raise ValueError(f"bad turn {turn!r}")
        messages.append({"role": role, "content": turn["value"]})
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def encode_conversation(tokenizer, conversations: list[dict], max_length: int,
                        system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels (the assistant replies only, each with its end-of-turn token) of a
    conversation, truncated to ``max_length``. The tokenizer's own chat template when it has one,
    else ChatML. ``system_prompt`` opens a conversation that has no system turn.

    Raises ValueError for a conversation without an assistant turn or with an unknown role; the data
    pipeline turns that into a skipped sample.
    """
    messages = _messages(conversations, system_prompt)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn")
    messages = _within(messages, max_chars_for(tokenizer, max_length))
    if tokenizer.chat_template is not None:
        with _time_limit(TEMPLATE_SECONDS):
            ids, labels = _encode_with_template(tokenizer, messages)
        return ids[:max_length], labels[:max_length]
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, train: bool) -> None:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE_INDEX] * len(piece))

    for m in messages:
        add(f"{IM_START}{m['role']}\n", False)
        if m["role"] == "assistant":
            add(f"{m['content']}{IM_END}", True)
            add("\n", False)
        else:
            add(f"{m['content']}{IM_END}\n", False)
    return ids[:max_length], labels[:max_length]


def _encode_with_template(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The template renders the whole conversation once; each assistant reply is the text between the
    rendering of the turns before it with the generation prompt (its header) and the rendering up to
    and including it. Labels are the tokens inside those spans. (``return_assistant_tokens_mask``
    needs ``{% generation %}`` markers that most templates, Llama 3's and Qwen2's included, lack.)"""
    def render(turns: list[dict], prompt: bool = False) -> str:
        return _rendered(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt), turns)

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], prompt=True), render(messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError("the tokenizer's chat template does not render a conversation as the sum of its turns")
        spans.append((len(before), len(upto)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [token if any(a <= start and end <= b for a, b in spans) else IGNORE_INDEX
              for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return list(encoded["input_ids"]), labels


def encode_prompt(tokenizer, conversations: list[dict], system_prompt: str | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant header: what generation starts from."""
    messages = _messages(conversations, system_prompt)
    if tokenizer.chat_template is not None:
        with _time_limit(TEMPLATE_SECONDS):
            text = _rendered(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                             messages)
    else:
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages) + f"{IM_START}assistant\n"
    return tokenizer.encode(text, add_special_tokens=False)


def check_chat_format(tokenizer, key: str) -> None:
    """Fail at build time, naming the config key, when a tokenizer's chat template cannot give labels."""
    from storm_lightning.errors import ConfigError

    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
             {"from": "human", "value": "And?"}, {"from": "gpt", "value": "Bye."}]
    try:
        ids, labels = encode_conversation(tokenizer, turns, 10_000)
    except Exception as exn:  # jinja errors, a template that is not prefix-consistent
        raise ConfigError(f"{key}: its chat template cannot be used for training ({type(exn).__name__}: {exn})") from None
    trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True)
    if "Hello." not in trained or "Bye." not in trained or "Hi" in trained:
        raise ConfigError(f"{key}: its chat template's assistant replies could not be told apart (labels {trained!r})")


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
