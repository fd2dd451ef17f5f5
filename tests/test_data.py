"""Shards -> batches: decoding, chat-template masking, bad samples, splitting, the synthetic generator."""

import hashlib
import io
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from storm_lightning.data import ShardSource, StormDataModule
from storm_lightning.data.batching import collate
from storm_lightning.data.samples import SampleProcessor
from storm_lightning.data.stream import ShardStream
from storm_lightning.data.media import decode_image, uniform_indices
from storm_lightning.data.video import FrameSampling, read_video
from storm_lightning.data.synth import encode_mp4, synthesize
from storm_lightning.errors import ConfigError
from storm_lightning.tokenizer import IGNORE_INDEX, encode_conversation, encode_prompt, load_tokenizer
from tests.conftest import SHARDS, TOKENIZER


def write_tar(path, samples: dict[str, dict[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for key, entries in samples.items():
            for ext, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def conv(question="<image>\nWhat is it?", answer="a red circle."):
    return json.dumps({"conversations": [{"from": "human", "value": question},
                                         {"from": "gpt", "value": answer}]}).encode()


def png(size=20, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (size, size)).save(buf, format="PNG")
    return buf.getvalue()


def test_uniform_indices():
    assert uniform_indices(128, 4) == [16, 48, 80, 112]
    assert uniform_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # fewer frames than asked: frames repeat
    with pytest.raises(ValueError):
        uniform_indices(0, 4)


def test_decode_video_samples_uniformly():
    clip = [np.full((32, 32, 3), 8 * i, np.uint8) for i in range(20)]
    clip = read_video(encode_mp4(clip), FrameSampling(frames=5), size=16)
    frames, indices = clip.frames, clip.indices
    assert frames.shape == (5, 3, 16, 16) and frames.dtype == torch.uint8 and clip.total_frames == 20
    assert indices == [2, 6, 10, 14, 18] and clip.timestamps == [i / 8 for i in indices]  # 8 fps
    assert abs(frames[2].float().mean().item() - 80) < 4  # frame 10 has value 80 (lossy codec)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
def test_decode_image_modes(mode):
    out = decode_image(png(size=24, mode=mode), size=16)
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.uint8


def test_chat_template_trains_on_assistant_tokens_only():
    tok = load_tokenizer(TOKENIZER)
    turns = [{"from": "human", "value": "What is 1 plus 2?"}, {"from": "gpt", "value": "3."},
             {"from": "human", "value": "And 2 plus 2?"}, {"from": "gpt", "value": "4."}]
    ids, labels = encode_conversation(tok, turns, max_length=1000)
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert trained == "3.<|im_end|>4.<|im_end|>"
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_conversation(tok, turns[:1], max_length=1000)
    # the bundled tokenizer was trained with the role names the template writes before every turn
    header = tok.convert_ids_to_tokens(encode_prompt(tok, turns[:1])[-2:])
    assert header == ["assistant", "Ċ"]


def test_bad_samples_are_skipped_and_counted(tmp_path):
    shard = write_tar(tmp_path / "mixed-000000.tar", {
        "good": {"json": conv(), "png": png()},
        "corrupt_image": {"json": conv(), "png": b"not an image"},
        "bad_json": {"json": b"{not json", "png": png()},
        "no_answer": {"json": json.dumps({"conversations": [{"from": "human", "value": "hi"}]}).encode()},
        "good_text": {"json": conv("What is 1 plus 1?", "2.")},
        "placeholder_without_media": {"json": conv()},
    })
    source = ShardSource("mixed", shard)
    stream = ShardStream([source], [[shard]], SampleProcessor(TOKENIZER, 16, 512), infinite=False)
    samples = list(stream)
    assert [s.key for s in samples] == ["good", "good_text"]
    assert sum(s.skipped.get("mixed", 0) for s in samples) == 3  # counted before good_text
    assert sum(stream.skipped.values()) == 1  # the last one, not yet attached to a sample
    batch = collate(samples, pad_id=0)
    assert batch.skipped == {"mixed": 3}


def test_truncated_shard_does_not_stop_the_stream(tmp_path):
    shard = write_tar(tmp_path / "t-000000.tar", {f"s{i}": {"json": conv("hi", "yo.")} for i in range(20)})
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    stream = ShardStream([ShardSource("t", shard)], [[shard]], SampleProcessor(TOKENIZER, 16, 512), infinite=False)
    assert 0 < len(list(stream)) < 20


def test_readers_split_samples_without_overlap(tmp_path, monkeypatch):
    shard = write_tar(tmp_path / "t-000000.tar", {f"s{i:02d}": {"json": conv("hi", "yo.")} for i in range(10)})
    source = ShardSource("t", shard)
    seen = []
    for reader in range(3):  # one shard, three readers: every reader keeps every 3rd sample
        monkeypatch.setattr("storm_lightning.data.stream.reader_position", lambda taken=0, r=reader: (r, 3))
        stream = ShardStream([source], [[shard]], SampleProcessor(TOKENIZER, 16, 512), infinite=False)
        seen.append([s.key for s in stream])
    assert sorted(sum(seen, [])) == [f"s{i:02d}" for i in range(10)]
    assert all(len(set(a) & set(b)) == 0 for a in seen for b in seen if a is not b)


def test_datamodule_batches_from_bundled_shards():
    dm = StormDataModule(
        train_sources=[ShardSource("image", str(SHARDS / "train/image-000000.tar"), 1.0),
                       ShardSource("video32", str(SHARDS / "train/video32-000000.tar"), 1.0, frames_per_clip=8)],
        tokenizer_path=TOKENIZER, image_size=64, batch_size=6, num_workers=0,
    )
    batch = next(iter(dm.train_dataloader()))
    frames = batch.frames_per_sample
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    assert set(frames.tolist()) <= {1, 8} and batch.pixel_values.shape == (int(frames.sum()), 3, 64, 64)
    assert all(len(ix) == len(ts) == t for ix, ts, t in zip(batch.frame_indices, batch.timestamps, frames.tolist()))


def test_missing_shards_and_tokenizer_fail_when_built(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.train_sources\[0\].shards: no shard matches"):
        StormDataModule([ShardSource("x", str(tmp_path / "none-{000..003}.tar"))], tokenizer_path=TOKENIZER)
    with pytest.raises(FileNotFoundError, match="data.tokenizer_path: .* is not a tokenizer directory"):
        StormDataModule([ShardSource("x", str(SHARDS / "train/text-000000.tar"))], tokenizer_path=str(tmp_path))


def test_synthetic_shards_are_deterministic(tmp_path):
    digests = []
    for run in ("a", "b"):
        synthesize(str(tmp_path / run), seed=3, scale=0.003, shards_per_source=1)
        files = sorted(p for p in (tmp_path / run).rglob("*.tar"))
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in files])
    assert digests[0] == digests[1] and len(digests[0]) == 8


def test_bundled_shards_have_temporal_multiple_choice_questions():
    with tarfile.open(SHARDS / "eval/video32-000000.tar") as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert {m["category"] for m in metas} == {"direction", "order", "flash", "count"}
    assert all(0 <= m["answer"] < len(m["options"]) for m in metas)
    by_category = {m["category"]: m["options"] for m in metas}  # one fixed option list per category
    assert all(m["options"] == by_category[m["category"]] for m in metas)
    assert len(by_category["direction"]) == len(by_category["count"]) == 4 and len(by_category["flash"]) == 8


def test_validation_interleaves_sources(tmp_path):
    a = write_tar(tmp_path / "a-000000.tar", {f"a{i}": {"json": conv("hi", "yo.")} for i in range(3)})
    b = write_tar(tmp_path / "b-000000.tar", {f"b{i}": {"json": conv("hi", "yo.")} for i in range(1)})
    stream = ShardStream([ShardSource("a", a), ShardSource("b", b)], [[a], [b]], SampleProcessor(TOKENIZER, 16, 512),
                         infinite=False)
    assert [s.key for s in stream] == ["a0", "b0", "a1", "a2"]


def test_token_budget_batches_mix_clip_lengths_within_the_budget():
    from storm_lightning.data.batching import TokenBudgetBatches

    counts = {1: 16, 8: 128, 32: 512}

    dm = StormDataModule(
        train_sources=[ShardSource("v32", str(SHARDS / "train/video32-000000.tar"), 1.0, frames_per_clip=8),
                       ShardSource("v128", str(SHARDS / "train/video128-000000.tar"), 1.0, frames_per_clip=32),
                       ShardSource("text", str(SHARDS / "train/text-000000.tar"), 1.0)],
        tokenizer_path=TOKENIZER, image_size=64, num_workers=0, token_budget=600, shuffle_buffer=0,
        visual_tokens=counts.__getitem__,  # what storm-fit links from the model (16 tokens a frame)
    )
    loader = dm.train_dataloader()
    assert isinstance(loader.dataset, TokenBudgetBatches)
    sizes, lengths = [], set()
    for batch, _ in zip(loader, range(30)):
        frames = batch.frames_per_sample.tolist()
        text = (batch.attention_mask.sum(1) - (batch.frames_per_sample > 0).long()).tolist()
        used = sum(t + (counts[f] if f else 0) for t, f in zip(text, frames))
        assert used <= 600 or len(frames) == 1
        sizes.append(len(frames))
        lengths.update(f for f in frames if f)
    assert lengths == {8, 32} and min(sizes) < max(sizes)  # clip lengths share the run; batch size varies



def test_token_budget_batches_keep_to_the_batch_frame_limit():
    """A budget that alone would take 4 clips of 32 frames a batch; data.max_batch_frames=64 closes
    batches at 2 clips (plus images or text)."""
    counts = {1: 16, 32: 512}
    dm = StormDataModule(
        train_sources=[ShardSource("v32", str(SHARDS / "train/video32-000000.tar"), 1.0, frames_per_clip=32),
                       ShardSource("image", str(SHARDS / "train/image-000000.tar"), 1.0)],
        tokenizer_path=TOKENIZER, image_size=64, num_workers=0, token_budget=4 * 600, shuffle_buffer=0,
        visual_tokens=counts.__getitem__, max_batch_frames=64,
    )
    frames = [batch.frames_per_sample.tolist() for batch, _ in zip(dm.train_dataloader(), range(20))]
    assert max(sum(f) for f in frames) <= 64
    assert max(sum(t == 32 for t in f) for f in frames) == 2


def test_fixed_size_batches_close_early_at_the_batch_frame_limit():
    """batch_size 16 of clips (32 frames) and images: at most 64 frames a batch, so a batch closes before a
    third clip."""
    dm = StormDataModule(
        train_sources=[ShardSource("v32", str(SHARDS / "train/video32-000000.tar"), 1.0, frames_per_clip=32),
                       ShardSource("image", str(SHARDS / "train/image-000000.tar"), 1.0)],
        tokenizer_path=TOKENIZER, image_size=64, num_workers=0, batch_size=16, shuffle_buffer=0,
        max_batch_frames=64,
    )
    frames = [batch.frames_per_sample.tolist() for batch, _ in zip(dm.train_dataloader(), range(20))]
    assert max(sum(f) for f in frames) <= 64 and max(sum(t == 32 for t in f) for f in frames) == 2
    assert max(len(f) for f in frames) < 16  # closed early, before the 16th sample


def test_a_clip_longer_than_the_batch_frame_limit_is_refused_at_build():
    clips = ShardSource("v32", str(SHARDS / "train/video32-000000.tar"), frames_per_clip=32)
    with pytest.raises(ConfigError, match=r"data.train_sources\[0\].frames_per_clip=32 is over "
                                          r"data.max_batch_frames=16: one clip would not fit"):
        StormDataModule([clips], tokenizer_path=TOKENIZER, max_batch_frames=16)
    images = ShardSource("image", str(SHARDS / "train/image-000000.tar"))
    StormDataModule([images], tokenizer_path=TOKENIZER, batch_size=200)  # 200 images: fine

def _text_and_image_module(tmp_path, start_step, workers, rewrite=True, **kwargs):
    text, image = str(tmp_path / "text-000000.tar"), str(tmp_path / "image-000000.tar")
    if rewrite:
        write_tar(text, {f"t{i:03d}": {"json": conv("hi", "yo.")} for i in range(40)})
        write_tar(image, {f"i{i:03d}": {"json": conv(), "png": png()} for i in range(40)})
    return StormDataModule(
        train_sources=[ShardSource("text", text, 1.0), ShardSource("image", image, 1.0, start_step=start_step)],
        tokenizer_path=TOKENIZER, image_size=16, num_workers=workers, **{"shuffle_buffer": 0, **kwargs})


def consume(dm, n: int) -> tuple[list[list[str]], dict]:
    """The keys of ``n`` training batches taken as Lightning takes them (the data module sees each one
    before it goes to the model), and the data module's checkpoint state after them."""
    keys = [dm.on_before_batch_transfer(batch, 0).keys for batch, _ in zip(dm.train_dataloader(), range(n))]
    dm.trainer = SimpleNamespace(fit_loop=SimpleNamespace(total_batch_idx=n - 1))
    return keys, dm.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_source_joins_the_mix_at_its_start_step_and_resumes_on_the_same_batches(tmp_path, workers):
    dm = _text_and_image_module(tmp_path, start_step=3, workers=workers, batch_size=4)
    batches = [b.keys for b, _ in zip(dm.train_dataloader(), range(8))]
    sources = [{key[0] for key in keys} for keys in batches]
    assert sources[:3] == [{"t"}] * 3  # steps 0-2: text only, whichever worker made the batch
    assert sum("i" in s for s in sources[3:]) >= 4  # then half the samples are images

    first, state = consume(_text_and_image_module(tmp_path, start_step=3, workers=workers, batch_size=4), 2)
    assert first == batches[:2]
    resumed = _text_and_image_module(tmp_path, start_step=3, workers=workers, batch_size=4)
    resumed.load_state_dict(state)  # a checkpoint taken after step 1
    assert [b.keys for b, _ in zip(resumed.train_dataloader(), range(6))] == batches[2:]
    legacy = _text_and_image_module(tmp_path, start_step=3, workers=workers, batch_size=4)
    legacy.load_state_dict({"train_batches_taken": 2, "seed": 0})  # older checkpoints: replayed
    assert [b.keys for b, _ in zip(legacy.train_dataloader(), range(6))] == batches[2:]


@pytest.mark.parametrize("workers, budget", [(0, None), (2, None), (0, 60), (2, 60)])
def test_resume_restores_reader_positions_and_shuffle_buffers(tmp_path, workers, budget):
    """Small shards through shuffle buffers, over epoch boundaries, stopped at several steps: each
    resume continues on exactly the batches of the uninterrupted run."""
    module = lambda: _text_and_image_module(tmp_path, start_step=2, workers=workers, shuffle_buffer=8,  # noqa: E731
                                            batch_size=5, token_budget=budget, visual_tokens=lambda frames: 16)
    straight = [b.keys for b, _ in zip(module().train_dataloader(), range(40))]
    assert sum(k[0] == "t" for keys in straight for k in keys) > 40  # the text shard's epoch wrapped
    for stop in (1, 7, 17):
        _, state = consume(module(), stop)
        resumed = module()
        resumed.load_state_dict(state)
        assert [b.keys for b, _ in zip(resumed.train_dataloader(), range(40 - stop))] == straight[stop:], stop


def test_resume_decodes_only_what_the_next_batch_needs(tmp_path, monkeypatch):
    """O(shards), not O(steps): resuming at step 50 decodes about one batch, not 50 of them."""
    from storm_lightning.data.samples import SampleProcessor

    _, state = consume(_text_and_image_module(tmp_path, start_step=0, workers=0, batch_size=4, shuffle_buffer=8), 50)
    decoded = []
    real = SampleProcessor.__call__
    monkeypatch.setattr(SampleProcessor, "__call__", lambda self, raw, source: decoded.append(raw.key) or real(
        self, raw, source))
    resumed = _text_and_image_module(tmp_path, start_step=0, workers=0, batch_size=4, shuffle_buffer=8)
    resumed.load_state_dict(state)
    next(iter(resumed.train_dataloader()))
    assert len(decoded) == 4


def test_resume_with_other_workers_is_refused_unless_allowed(tmp_path, caplog):
    _, state = consume(_text_and_image_module(tmp_path, start_step=0, workers=0, batch_size=4), 3)
    other = _text_and_image_module(tmp_path, start_step=0, workers=2, batch_size=4)
    other.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"data.num_workers=0, now 1 x 2.*data.allow_data_restart=true"):
        other.train_dataloader()
    allowed = _text_and_image_module(tmp_path, start_step=0, workers=2, batch_size=4, allow_data_restart=True)
    allowed.load_state_dict(state)
    assert len(next(iter(allowed.train_dataloader())).keys) == 4
    smaller = _text_and_image_module(tmp_path, start_step=0, workers=0, batch_size=2)  # exact, sample by sample
    smaller.load_state_dict(state)
    straight = [k for b, _ in zip(_text_and_image_module(tmp_path, start_step=0, workers=0, batch_size=4)
                                  .train_dataloader(), range(5)) for k in b.keys]
    assert [k for b, _ in zip(smaller.train_dataloader(), range(4)) for k in b.keys] == straight[12:20]
    assert "batches are cut differently from here" in caplog.text


def test_start_step_holds_within_one_sample_with_a_token_budget(tmp_path):
    dm = _text_and_image_module(tmp_path, start_step=4, workers=0, token_budget=60, visual_tokens=lambda frames: 16)
    batches = [b.keys for b, _ in zip(dm.train_dataloader(), range(10))]
    before = [k for keys in batches[:4] for k in keys]
    # the sample that overflows step 3's budget was drawn under step 3 and opens step 4
    assert all(k[0] == "t" for k in before)
    assert any(k[0] == "i" for keys in batches[4:6] for k in keys)


def test_start_step_misconfiguration_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train_sources\[1\] \('image'\): .*start_step >= 0"):
        _text_and_image_module(tmp_path, start_step=-1, workers=0)
    text = str(SHARDS / "train/text-000000.tar")
    with pytest.raises(ConfigError, match="needs weight > 0 and start_step: 0"):
        StormDataModule([ShardSource("text", text, start_step=5), ShardSource("img", text, weight=0.0)],
                        tokenizer_path=TOKENIZER)


def test_bundled_image_position_questions_answer_where_the_shape_is():
    with tarfile.open(SHARDS / "eval/image-000000.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
        metas = {n[:-5]: json.load(tar.extractfile(m)) for n, m in members.items() if n.endswith(".json")}
        checked = 0
        for key, meta in metas.items():
            if meta["category"] != "image_position":
                continue
            frame = np.asarray(Image.open(io.BytesIO(tar.extractfile(members[f"{key}.png"]).read())))
            ys, xs = np.nonzero((np.abs(frame.astype(int) - 25).sum(-1) > 30))  # not the background
            vert = "top" if ys.mean() < frame.shape[0] / 2 else "bottom"
            horiz = "left" if xs.mean() < frame.shape[1] / 2 else "right"
            assert meta["options"][meta["answer"]] == f"{vert} {horiz}", key
            checked += 1
    assert {m["category"] for m in metas.values()} == {"image_color", "image_shape", "image_position"}
    assert checked > 40
