"""The video benchmarks' own annotation formats -> shard records (``storm-shards convert --format``).

Each becomes a multiple-choice record: the question and its lettered options in the user turn (the
prompt ``records.multiple_choice_prompt`` writes), the answer's letter as the assistant turn, and
``options``/``answer``/``category``/``duration`` so that ``storm-fit test`` reports accuracy overall, per
category and per duration group, and writes every prediction.

=================  ===========================================================================================
``videomme``       Video-MME: ``videoID`` (the video is ``<videoID>.mp4``, or ``video`` when given),
                   ``question``, ``options`` ``["A. ...", ...]``, ``answer`` a letter, ``duration``
                   (short / medium / long), ``domain``, ``task_type`` (the category)
``mvbench``        MVBench: ``video``, ``question``, ``candidates``, ``answer`` the right candidate's text,
                   optional ``start``/``end`` seconds; the category is the task (``--category``, by default the
                   annotation file's name: MVBench ships one file per task)
``mlvu``           MLVU: ``video_name`` (or ``video``), ``question`` with its options inside (``(A) ...``
                   lines), ``answer`` a letter, ``task_type`` (or ``question_type``); or ``candidates`` with
                   ``answer`` the right candidate's text (its dev set). Its ``duration`` is the video's length
                   in seconds (467.98), not a group: not used (MLVU reports by task)
``longvideobench`` LongVideoBench: ``video_path``, ``question``, ``option0`` .. ``option4`` (``"N/A"`` when
                   absent), ``correct_choice`` an index, ``duration_group``, ``question_category``
=================  ===========================================================================================
"""

from __future__ import annotations

import re

from storm_lightning.data.records import BadRecord, answer_index, multiple_choice_prompt
from storm_lightning.tokenizer import OPTION_LETTERS

# "A. text", "(A) text", "A) text", "A: text" (any letter: a ninth option must be seen to be refused)
_LETTERED = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.*\S)\s*$")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRecord("bad_question", f"{key} missing or not text")
    return value.strip()


def _mc(question: str, options: list[str], answer: int, video: str, category, duration=None, start=None, end=None,
        rid=None):
    from storm_lightning.data.convert import Medium, Normalised

    if not 1 <= len(options) <= len(OPTION_LETTERS):
        raise BadRecord("bad_options", f"{len(options)} options: at most {len(OPTION_LETTERS)} ({OPTION_LETTERS})")
    for key, value in (("category", category), ("duration", duration)):  # a name, or a group such as 600
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            raise BadRecord(f"bad_{key}", f"{value!r:.100}: a {key} is text (or a whole number of seconds)")
    meta = {"conversations": [{"from": "human", "value": f"<video>\n{multiple_choice_prompt(question, options)}"},
                              {"from": "gpt", "value": OPTION_LETTERS[answer]}],
            "options": options, "answer": answer}
    if category is not None:
        meta["category"] = str(category)
    if duration is not None:
        meta["duration"] = str(duration)
    for key, value in (("start", start), ("end", end)):
        if value is not None:
            meta[key] = value
    return Normalised(meta, Medium("video", video), rid)


def _strip_letters(options: list) -> list[str]:
    """``["A. red", "B. blue"]`` -> ``["red", "blue"]`` (options given with their letters)."""
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise BadRecord("bad_options", repr(options)[:200])
    if len(options) > len(OPTION_LETTERS):
        raise BadRecord("bad_options", f"{len(options)} options: at most {len(OPTION_LETTERS)} ({OPTION_LETTERS})")
    matches = [_LETTERED.match(option) for option in options]
    letters = "".join(m.group(1) if m else "?" for m in matches)
    if all(matches) and letters != OPTION_LETTERS[:len(options)]:  # which letter would "answer: A" mean?
        raise BadRecord("bad_options", f"options lettered {letters}: lettered options must come in order "
                                       f"({OPTION_LETTERS[:len(options)]})")
    return [m.group(2) if m and m.group(1) == OPTION_LETTERS[i] else option.strip()
            for i, (option, m) in enumerate(zip(options, matches))]


def _candidate(answer, candidates: list[str]) -> int:
    if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
        raise BadRecord("bad_options", repr(candidates)[:200])
    if answer not in candidates:
        raise BadRecord("bad_answer", f"{answer!r} is not one of the candidates")
    return candidates.index(answer)


def videomme(record: dict):
    video = record.get("video")  # ("url" is the YouTube page)
    if not isinstance(video, str):
        video_id = record.get("videoID")
        if not isinstance(video_id, str) or not video_id:
            raise BadRecord("bad_path", "no videoID")
        video = f"{video_id}.mp4"
    options = _strip_letters(record.get("options"))
    return _mc(_text(record, "question"), options, answer_index(record.get("answer"), options), video,
               record.get("task_type"), record.get("duration"), rid=record.get("question_id"))


def mvbench(record: dict):
    candidates = record.get("candidates")
    return _mc(_text(record, "question"), candidates, _candidate(record.get("answer"), candidates),
               record.get("video"), record.get("task_type"), start=record.get("start"), end=record.get("end"))


def mlvu(record: dict):
    video = record.get("video_name", record.get("video"))
    category = record.get("task_type", record.get("question_type"))
    if "candidates" in record:  # the dev set
        candidates = record["candidates"]
        return _mc(_text(record, "question"), candidates, _candidate(record.get("answer"), candidates), video,
                   category, rid=record.get("question_id"))
    lines = _text(record, "question").splitlines()
    options, question = [], []
    for line in lines:
        match = _LETTERED.match(line)
        if match and len(options) < len(_LETTERS) and match.group(1) == _LETTERS[len(options)]:
            options.append(match.group(2))  # more than OPTION_LETTERS allows: refused by _mc
        elif not options:
            question.append(line)
    if len(options) < 2:
        raise BadRecord("bad_options", "no lettered options in the question")
    return _mc("\n".join(question).strip(), options, answer_index(record.get("answer"), options), video, category,
               rid=record.get("question_id"))


def longvideobench(record: dict):
    options = []
    for i in range(5):
        option = record.get(f"option{i}")
        if option is None or option == "N/A":
            break
        if not isinstance(option, str):
            raise BadRecord("bad_options", f"option{i}={option!r}")
        options.append(option)
    return _mc(_text(record, "question"), options, answer_index(record.get("correct_choice"), options),
               record.get("video_path"), record.get("question_category"), record.get("duration_group"),
               rid=record.get("id"))


BENCHMARK_FORMATS = {"videomme": videomme, "mvbench": mvbench, "mlvu": mlvu, "longvideobench": longvideobench}
# the keys that tell each format apart when --format is auto
_SIGNATURES = (("longvideobench", {"video_path", "correct_choice"}), ("videomme", {"videoID", "options"}),
               ("mvbench", {"video", "candidates"}), ("mlvu", {"video_name", "question"}))


def detect(record: dict) -> str | None:
    return next((name for name, keys in _SIGNATURES if keys <= record.keys()), None)
