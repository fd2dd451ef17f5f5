"""What a valid sample record is, defined once: training, evaluation, ``storm-shards convert`` and
``storm-shards check`` all call ``validate_record``, so a record that one of them accepts the others do.

A record is the JSON entry of a shard sample (``docs/data.md``)::

    {"conversations": [{"from": "human", "value": "<video>\\nWhat moves?"}, {"from": "gpt", "value": "..."}],
     "options": ["up", "down"], "answer": 1, "category": "direction",        # optional: multiple choice
     "duration": "long",                                                      # optional: a duration group
     "start": 12.0, "end": 40.5, "fps": 30.0, "frame_indices": [...], "timestamps": [...]}  # optional: video

A record that fails raises ``BadRecord(kind, detail)``; the data pipeline skips and counts it, convert
lists it in its report. Nothing about a record is checked later, where it could stop a run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from storm_lightning.tokenizer import IMAGE_TOKEN, OPTION_LETTERS, ROLES, VIDEO_TOKEN

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
MAX_RECORD_BYTES = 16 * 2**20  # a JSON entry larger than this is refused unparsed (a 200 MB turn cost a run)


class BadRecord(ValueError):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind, self.detail = kind, detail


@dataclass
class Record:
    """A validated record. ``conversations`` turns have a known role and a string value (each capped at
    ``max_chars`` characters); ``answer`` is an index into ``options``; ``start``/``end`` are seconds."""

    conversations: list[dict]
    options: list[str] | None = None
    answer: int | None = None
    category: str | None = None
    duration: str | None = None
    start: float | None = None
    end: float | None = None
    placeholders: int = 0  # <image>/<video> placeholders in the user turns (0 or 1)


def multiple_choice_prompt(question: str, options: list[str]) -> str:
    """The question, its options one a line as ``A. ...``, and the instruction to answer with the letter."""
    return "\n".join([question] + [f"{OPTION_LETTERS[i]}. {o}" for i, o in enumerate(options)] + [MC_SUFFIX])


def parse_record(data: bytes) -> dict:
    """The JSON object of a shard's ``.json`` entry, or BadRecord."""
    import json

    if len(data) > MAX_RECORD_BYTES:
        raise BadRecord("record_too_large", f"{len(data)} bytes, over {MAX_RECORD_BYTES}")
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exn:
        raise BadRecord("bad_json", str(exn)) from None
    if not isinstance(meta, dict):
        raise BadRecord("not_an_object", f"a JSON {type(meta).__name__}")
    return meta


def answer_index(answer, options: list[str]) -> int:
    """An answer given as an index or as an option letter ("B", "B.", "(B)") -> its index in ``options``."""
    if isinstance(answer, bool):  # True is an int in Python; never an answer
        raise BadRecord("bad_answer", repr(answer))
    if isinstance(answer, str):
        letter = answer.strip().strip("().:").strip()
        if len(letter) != 1 or letter.upper() not in OPTION_LETTERS:
            raise BadRecord("bad_answer", f"{answer!r} is neither an index nor an option letter")
        answer = OPTION_LETTERS.index(letter.upper())
    if not isinstance(answer, int) or not 0 <= answer < len(options):
        raise BadRecord("bad_answer", f"{answer!r} is not an index into {len(options)} options")
    return answer


def _seconds(meta: dict, key: str) -> float | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise BadRecord("bad_clip_bounds", f"{key}={value!r} is not a number of seconds >= 0")
    return float(value)


# the option letter a reply gives: "B", "b", "(b)", "[B]", "**B**", "B.", "(B) ...", "(B)left", "b) left",
# "B: ...", "B:left", "B, because ...", "B - ...", "B" then a new line, "Answer: B", "The answer is (B).",
# "My answer is B.", "Final answer: B", "It is B.", "I choose B", "Option B", "answer is b", "答案：B",
# "left (B)" (not "A cat.", "The answer is a dog.", "Answer: A dog.", "It is a dog.", "D.C.", "A.I. is ...":
# an article, a word). Markdown emphasis is dropped first.
_PREFIX = (r"\s*(?i:(?:the|my|final|correct)\s+)*(?i:answer|option|choice)\s*(?i:is\s*)?[:：\-]?\s*"
           r"|\s*(?i:i\s+(?:choose|pick|select|go\s+with)\s+)(?i:option\s+)?"
           r"|\s*(?i:it\s+is|it's)\s+(?i:option\s+)?"
           r"|\s*(?:答案|选项|答)\s*(?:是)?\s*[:：]?\s*")
_REPLY_LETTER = (re.compile(r"\s*[(\[]?([A-Za-z])[)\]]?\W*$"),
                 re.compile(r"\s*[(\[]([A-Za-z])[)\]]"),
                 re.compile(r"\s*([A-Z])(?:\.(?=\s|$)|[):\],]|\s+-|[ \t]*\n)"),
                 re.compile(r"\s*([a-z])\)"),
                 re.compile(r"(?:" + _PREFIX + r")(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?=\W*$|[.):\],]\s|\s*\n)|([a-z])(?=\W*$))"),
                 re.compile(r".*\(([A-Z])\)\W*$", re.S))
_EMPHASIS = re.compile(r"[*_`]+")


def _check_choice(turns: list[dict], options: list[str], answer: int) -> None:
    """A reply that gives an option letter gives the answer's: training would teach the reply,
    evaluation score the answer."""
    reply = _EMPHASIS.sub("", next(t["value"] for t in reversed(turns) if ROLES[t["from"]] == "assistant"))
    said = next((next(g for g in m.groups() if g).upper() for pattern in _REPLY_LETTER
                 if (m := pattern.match(reply))), None)
    if said is not None and said in OPTION_LETTERS[:len(options)] and said != OPTION_LETTERS[answer]:
        raise BadRecord("answer_mismatch", f"answer {OPTION_LETTERS[answer]}, the reply says {reply.strip()[:40]!r}")


def validate_record(meta: dict, has_media: bool, max_chars: int | None = None) -> Record:
    """Check a record (see the module docstring) against whether its sample has a media entry."""
    conversations = meta.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("bad_conversations", "missing, empty or not a list")
    turns, placeholders, has_answer = [], 0, False
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecord("bad_conversations", f"turn {i} is not {{'from': role, 'value': text}}")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise BadRecord("unknown_role", f"turn {i}: {turn.get('from')!r}")
        value = turn["value"] if max_chars is None else turn["value"][:max_chars]
        n = value.count(IMAGE_TOKEN) + value.count(VIDEO_TOKEN)
        if n and role != "user":
            raise BadRecord("bad_placeholder", f"a media placeholder in a {role} turn")
        placeholders += n
        has_answer |= role == "assistant"
        turns.append({"from": turn["from"], "value": value})
    if not has_answer:
        raise BadRecord("no_assistant_turn")
    if placeholders > 1:
        raise BadRecord("bad_placeholder", f"{placeholders} media placeholders: one medium per record")
    if placeholders and not has_media:
        raise BadRecord("bad_placeholder", "a media placeholder but no media entry")

    options, answer = meta.get("options"), meta.get("answer")
    if options is not None:
        if (not isinstance(options, list) or not 1 <= len(options) <= len(OPTION_LETTERS)
                or not all(isinstance(o, str) for o in options)):
            raise BadRecord("bad_options", f"expected a list of 1 to {len(OPTION_LETTERS)} strings, got {options!r:.200}")
        if answer is None:
            raise BadRecord("bad_answer", "options without an answer")
        answer = answer_index(answer, options)
        _check_choice(turns, options, answer)
    elif answer is not None:
        raise BadRecord("bad_answer", "an answer without options")
    category, duration = meta.get("category"), meta.get("duration")
    if category is not None and not isinstance(category, str):
        raise BadRecord("bad_category", repr(category))
    if duration is not None and not isinstance(duration, str):
        raise BadRecord("bad_duration", f"{duration!r}: a duration group is a string (\"long\", \"600\")")
    start, end = _seconds(meta, "start"), _seconds(meta, "end")
    if start is not None and end is not None and end <= start:
        raise BadRecord("bad_clip_bounds", f"end={end} is not after start={start}")
    fps = meta.get("fps")  # a frame folder's frame rate
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 1e-3 <= fps <= 1e4):
        raise BadRecord("bad_fps", f"fps={fps!r}: a frame rate in [0.001, 10000]")
    return Record(turns, options, answer, category, duration, start, end, placeholders)
