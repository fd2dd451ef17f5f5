"""One definition of a valid record: what training skips, ``storm-shards check`` reports, sample for sample."""

import json
import logging
import re

import numpy as np
import pytest

from storm_lightning.data import ShardSource
from storm_lightning.data.convert import CheckSettings, check_shard
from storm_lightning.data.records import BadRecord, validate_record
from storm_lightning.data.samples import SampleProcessor
from storm_lightning.data.stream import ShardStream
from storm_lightning.data.synth import encode_mp4
from tests.conftest import TOKENIZER
from tests.test_data import conv, png, write_tar


def mc(answer, options=("red", "blue", "green"), **extra):
    return json.dumps({"conversations": [{"from": "human", "value": "<image>\nWhich colour?"},
                                         {"from": "gpt", "value": "B"}],
                       "options": options, "answer": answer, **extra}).encode()


def record(**fields):
    base = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo."}]}
    return json.dumps({**base, **fields}).encode()


MP4 = encode_mp4([np.full((16, 16, 3), 10 * i, np.uint8) for i in range(6)])
CASES = {  # key: (entries, good?)
    "a_index_answer": ({"json": mc(1), "png": png()}, True),
    "b_letter_answer": ({"json": mc("B"), "png": png()}, True),  # converted to its index
    "c_answer_out_of_range": ({"json": mc(5), "png": png()}, False),
    "d_answer_letter_out_of_range": ({"json": mc("F"), "png": png()}, False),
    "e_answer_is_true": ({"json": mc(True), "png": png()}, False),
    "f_options_not_a_list": ({"json": mc(1, options="red or blue"), "png": png()}, False),
    "g_nine_options": ({"json": mc(1, options=[str(i) for i in range(9)]), "png": png()}, False),
    "h_options_without_answer": ({"json": mc(None), "png": png()}, False),
    "i_category_not_text": ({"json": mc(1, category=3), "png": png()}, False),
    "j_json_not_an_object": ({"json": b"[1, 2]"}, False),
    "k_placeholder_in_answer": ({"json": json.dumps({"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image> yo"}]}).encode(), "png": png()}, False),
    "l_two_media": ({"json": conv(), "png": png(), "mp4": MP4}, False),
    "m_clip_bounds_reversed": ({"json": record(start=3.0, end=1.0), "mp4": MP4}, False),
    "n_clip_bounds": ({"json": record(start=0.1, end=0.6), "mp4": MP4}, True),
    "o_huge_turn": ({"json": json.dumps({"conversations": [
        {"from": "human", "value": "word " * 400_000}, {"from": "gpt", "value": "yes."}]}).encode()}, False),
    "p_duration_not_text": ({"json": mc(1, duration=600), "png": png()}, False),
    "q_text_only": ({"json": record()}, True),
    "r_turns_not_dicts": ({"json": json.dumps({"conversations": ["hi", "yo"]}).encode()}, False),
    "s_video_no_stream": ({"json": record(), "mp4": b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64}, False),
}


@pytest.fixture
def shard(tmp_path):
    return write_tar(tmp_path / "mixed-000000.tar", {key: entries for key, (entries, _) in CASES.items()})


def test_check_reports_exactly_what_training_skips(shard, caplog):
    good = {key for key, (_, ok) in CASES.items() if ok}
    stream = ShardStream([ShardSource("mixed", shard, frames_per_clip=4)], [[shard]],
                         SampleProcessor(TOKENIZER, 16, 512), infinite=False)
    with caplog.at_level(logging.WARNING):
        trained = {s.key for s in stream}
    skipped = set(re.findall(r"skipped '([^']+)'", caplog.text))
    report = check_shard(shard, CheckSettings(TOKENIZER, 16, 512, frames_per_clip=4))
    assert trained == good
    assert skipped == set(CASES) - good
    assert {b["key"] for b in report["bad"]} == skipped and report["samples"] == len(CASES)


def test_a_letter_answer_becomes_its_index():
    meta = json.loads(mc("(C)"))
    meta["conversations"][1]["value"] = "C"  # (the reply "B" would contradict it: answer_mismatch)
    assert validate_record(meta, has_media=True).answer == 2


def test_a_huge_turn_is_capped_before_it_is_tokenized(monkeypatch):
    """A 20 MB turn cost 17 s and 2.8 GB when tokenized whole; only what max_length can keep is tokenized (and a record over 16 MB is refused unparsed)."""
    from storm_lightning.data.shards import RawSample

    processor = SampleProcessor(TOKENIZER, 16, 512)
    tokenizer = processor.tokenizer
    lengths = []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text, **kw: lengths.append(len(text)) or encode(text, **kw))
    raw = RawSample("big", {"json": json.dumps({"conversations": [
        {"from": "human", "value": "What is this? " + "x" * 10_000_000}, {"from": "gpt", "value": "x"}]}).encode()},
        "shard", 0, 0)
    with pytest.raises(BadRecord, match="no assistant token left"):
        processor(raw, ShardSource("s", "shard"))
    assert max(lengths) <= 512 * max(len(t) for t in tokenizer.get_vocab()) + 1024 + 64
