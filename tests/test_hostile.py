"""The second hostile pass's cases (docs/reliability.md): each was a code execution, a traceback, runaway
memory or silent data loss, and is handled now."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from storm_lightning.errors import ConfigError, MissingPathError, UnsafeFileError, UserError
from tests.conftest import SHARDS, TOKENIZER
from tests.test_data import conv, png, write_tar
from tests.test_security import WritesAFile, sharded_checkpoint


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a payload ran"


def test_ckpt_path_urls_and_folders_are_refused(tmp_path, marker):
    from storm_lightning.checkpoint import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    with pytest.raises(UnsafeFileError, match="is not a local file"):  # Lightning unpickled URLs freely
        io.load_checkpoint("http://127.0.0.1:9/evil.ckpt")
    with pytest.raises(UserError, match="is a folder: a sharded"):
        io.load_checkpoint(tmp_path)
    torch.save({"state_dict": {}, "evil": WritesAFile(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeFileError, match="refused"):
        io.load_checkpoint(tmp_path / "evil.ckpt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "script.ckpt")  # a TorchScript archive
    with pytest.raises((UnsafeFileError, UserError)):
        io.load_checkpoint(tmp_path / "script.ckpt")


@pytest.mark.parametrize("attack", ["planner_index", "storage_symlink", "entry_past_the_file", "huge_tensor"])
def test_sharded_checkpoints_that_would_exhaust_memory_are_refused(tmp_path, attack):
    from storm_lightning.checkpoint import _MetadataUnpickler, verify_sharded_checkpoint

    folder = sharded_checkpoint(tmp_path / "ckpt")
    with open(folder / ".metadata", "rb") as f:
        metadata = _MetadataUnpickler(f, folder).load()
    if attack == "planner_index":  # torch grows a list to this index: a 1 KB file asking for 10^11 entries
        metadata.planner_data = {"x": ("x", 10**11)}
    elif attack == "storage_symlink":
        (folder / "zero.distcp").symlink_to("/dev/zero")
        for info in metadata.storage_data.values():
            info.relative_path = "zero.distcp"
    elif attack == "entry_past_the_file":
        for info in metadata.storage_data.values():
            info.length = 3 * 10**9
    else:
        for item in metadata.state_dict_metadata.values():
            if hasattr(item, "size"):
                item.size = torch.Size([2**20, 2**20])
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeFileError, match="refused"):
        verify_sharded_checkpoint(folder)


def test_an_export_is_built_from_its_own_components_and_weights_only(tmp_path, marker):
    from storm_lightning.inference import from_pretrained, load_config

    model = load_config(str(SHARDS.parent / "conf/sft.yaml"))["model"]
    import shutil

    export = tmp_path / "export"
    shutil.copytree(TOKENIZER, export / "tokenizer")
    for bad, message in (({"projector": {"class_path": "this.Foo"}}, "names classes outside storm_lightning"),
                         ({}, "missing, or not a regular file")):
        (export / "config.json").write_text(json.dumps({"model": {**model, **bad, "tokenizer_path": "tokenizer",
                                                                  "init_from": str(tmp_path / "evil.ckpt")}}))
        torch.save({"evil": WritesAFile(str(marker))}, tmp_path / "evil.ckpt")  # ignored: an export's own weights
        with pytest.raises((ConfigError, UserError), match=message):
            from_pretrained(str(export))


def test_a_frame_folder_linking_out_of_the_media_root_is_refused(tmp_path):
    from PIL import Image

    from storm_lightning.data.convert import convert

    root, secret = tmp_path / "media", tmp_path / "secret"
    (root / "vid").mkdir(parents=True)
    secret.mkdir()
    (secret / "id_rsa").write_bytes(b"SECRET-MARKER")
    for i in range(3):
        Image.new("RGB", (16, 16)).save(root / "vid" / f"frame_{i}.jpg")
    (root / "vid" / "frame_3.jpg").symlink_to(secret / "id_rsa")
    (root / "fifo").mkdir()
    Image.new("RGB", (16, 16)).save(root / "fifo" / "frame_0.jpg")
    os.mkfifo(root / "fifo" / "frame_1.jpg")  # reading it would block forever
    turns = [{"from": "human", "value": "<video>\nhi"}, {"from": "gpt", "value": "yo."}]
    (tmp_path / "a.json").write_text(json.dumps([{"video": "vid", "conversations": turns},
                                                 {"video": "fifo", "conversations": turns}]))
    report = convert(str(tmp_path / "a.json"), str(root), str(tmp_path / "out"), progress=False)
    assert [p["problem"] for p in report["problems"]] == ["escapes_media_root", "unsupported_media"]
    assert b"SECRET-MARKER" not in (tmp_path / "out/data-000000.tar").read_bytes()


def test_one_bad_text_or_nesting_is_one_record_of_the_report(tmp_path):
    from storm_lightning.data.convert import convert

    (tmp_path / "media").mkdir()
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo."}]}
    surrogate = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "bad \ud800 x"}]}
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join([json.dumps(good), json.dumps(surrogate), "[" * 100_000 + "]" * 100_000,
                               json.dumps(good)]) + "\n")
    report = convert(str(path), str(tmp_path / "media"), str(tmp_path / "out"), progress=False)
    assert report["written"] == 2 and [p["problem"] for p in report["problems"]] == ["bad_text", "bad_json"]


def test_frames_are_read_in_number_order_and_twice_the_same_frame_is_bad(tmp_path):
    from storm_lightning.data import ShardSource
    from storm_lightning.data.samples import SampleProcessor
    from storm_lightning.data.shards import read_shard
    from storm_lightning.data.records import BadRecord

    frames = {f"frame-{i}.png": png(size=16 + i) for i in range(12)}  # not zero-padded: frame-10 before frame-2
    video = json.dumps({"conversations": [{"from": "human", "value": "<video>\nhi"}, {"from": "gpt", "value": "yo."}],
                        "fps": 1}).encode()
    shard = write_tar(tmp_path / "f-000000.tar", {"a": {"json": video, **frames},
                                                  "b": {"json": video, "frame-1.png": png(), "frame-1.jpg": png()}})
    processor = SampleProcessor(TOKENIZER, 16, 512)
    samples = list(read_shard(shard))
    first = processor(samples[0], ShardSource("f", shard, frames_per_clip=12))
    assert first.frame_indices == list(range(12)) and first.timestamps == [float(i) for i in range(12)]
    with pytest.raises(BadRecord, match="duplicate_frame"):
        processor(samples[1], ShardSource("f", shard, frames_per_clip=12))


def test_an_oversized_json_entry_is_never_read(tmp_path, monkeypatch):
    import storm_lightning.data.shards as shards

    monkeypatch.setattr(shards, "MAX_RECORD_BYTES", 100)  # (16 MB: a 20 GB sparse entry took the memory)
    shard = write_tar(tmp_path / "j-000000.tar", {"big": {"json": conv("x" * 500, "yo.")}, "ok": {"json": b"{}"}})
    big, ok = shards.read_shard(shard)
    assert big.problem.startswith("entry_too_large") and big.entries["json"] == b"" and ok.problem is None


def test_a_brace_pattern_with_a_shard_missing_fails_naming_it(tmp_path):
    from storm_lightning.data import ShardSource

    for i in (0, 1, 3):
        write_tar(tmp_path / f"s-00000{i}.tar", {"a": {"json": conv("hi", "yo.")}})
    with pytest.raises(MissingPathError, match=r"no shard '.*s-000002.tar'"):
        ShardSource("s", str(tmp_path / "s-{000000..000003}.tar")).shard_paths("data.train_sources[0].shards")


def test_resume_onto_replaced_shards_restarts_that_source(tmp_path, caplog):
    from tests.test_data import _text_and_image_module, consume

    _, state = consume(_text_and_image_module(tmp_path, start_step=0, workers=0, batch_size=4, shuffle_buffer=8), 5)
    write_tar(tmp_path / "text-000000.tar", {f"u{i:03d}": {"json": conv("hello", "hey.")} for i in range(60)})
    resumed = _text_and_image_module(tmp_path, start_step=0, workers=0, batch_size=4, shuffle_buffer=8,
                                     rewrite=False)
    resumed.load_state_dict(state)
    keys = [k for b, _ in zip(resumed.train_dataloader(), range(3)) for k in b.keys]
    assert len(keys) == 12 and "its shards are not those of the checkpoint" in caplog.text


# --- the third hostile pass --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["convert", "--annotations", "a.json", "--media-root", ".", "--out", "o", "--frames", "4", "--fps", "inf"],
     "argument --fps: must be in [0.001, 10000.0], got inf"),  # every video left out, exit 0, before
    (["convert", "--annotations", "a.json", "--media-root", ".", "--out", "o", "--frames", "30000000"],
     "argument --frames: must be in [1, 1024], got 30000000"),  # 14 s and 1.5 GB, before
    (["convert", "--annotations", "a.json", "--media-root", ".", "--out", "o", "--folder-fps", "1e5"],
     "argument --folder-fps: must be in [0.001, 10000.0], got 1e5"),  # written, then skipped as bad_fps
    (["check", "x.tar", "--frames", "0"], "argument --frames: must be in [1, 1024], got 0"),
    (["check", "x.tar", "--image-size", "-1"], "argument --image-size: must be in [1, 2048], got -1"),
    # the fourth pass: a ValueError, a ZeroDivisionError, one sample per source without a word
    (["synth", "--image-size", "0"], "argument --image-size: must be in [16, 2048], got 0"),
    (["synth", "--shards-per-source", "0"], "argument --shards-per-source: must be in [1, 10000], got 0"),
    (["synth", "--scale", "-1"], "argument --scale: must be in [0.0001, 1000.0], got -1"),
])
def test_shard_tool_numbers_out_of_range_are_one_line(capsys, argv, message):
    from storm_lightning.cli import shards_main

    with pytest.raises(SystemExit) as exit_:
        shards_main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    """A 530 KB PNG of 13000 x 13000 pixels decoded to 3.9 GB before."""
    import io

    from PIL import Image

    from storm_lightning.data.media import decode_image

    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, format="PNG")
    with pytest.raises(ValueError, match="3000x3000 image, over the limit of 4000000 pixels"):
        decode_image(buffer.getvalue(), 64, max_pixels=2000 * 2000)


def test_fps_sampling_far_past_the_video_is_bounded_before_it_is_made(tmp_path):
    """``end: 1e8`` on a 1 s clip (or a timestamp that lies) made 1e8 steps: GBs. Now the steps are counted
    first; over the cap, the cap's uniform frames. An infinite end or fps is refused."""
    import tracemalloc

    from storm_lightning.data import video as V
    from storm_lightning.data.synth import encode_mp4

    clip = [np.full((16, 16, 3), 10 * i, np.uint8) for i in range(10)]
    path = tmp_path / "a.mp4"
    path.write_bytes(encode_mp4(clip, fps=10))
    tracemalloc.start()  # numpy reports its arrays to tracemalloc
    try:
        out = V.read_video(str(path), V.FrameSampling(frames=4, fps=1.0, end=1e8), 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(out.frames) == 4 and peak < 50 * 2**20  # 1e8 float64 steps: 800 MB
    for bad in (dict(fps=float("inf")), dict(fps=1.0, end=float("inf"))):
        with pytest.raises(ValueError, match="finite"):
            V.FrameSampling(frames=4, **bad)
    with pytest.raises(V.VideoTooLarge, match="20000000 frames asked for"):
        V.read_video(str(path), V.FrameSampling(frames=20_000_000), 16)


def test_check_with_a_config_reads_as_training_would_and_refuses_what_is_not_one(tmp_path, capsys):
    """check --config builds the data module training would (read limits, system prompt, sizes): a frame
    over the config's max_frame_pixels is bad in check as it is skipped in training; a file that is not a
    storm-fit config is one line."""
    import argparse

    from storm_lightning.cli import _check_settings, shards_main

    shard = str(SHARDS / "eval/video32-000000.tar")
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  tokenizer_path: {TOKENIZER}\n  max_frame_pixels: 1000\n  train_sources:\n"
                      f"    - {{name: v, shards: '{shard}', frames_per_clip: 4}}\n")
    with pytest.raises(SystemExit) as exit_:
        shards_main(["check", shard, "--config", str(config), "--workers", "1"])
    out = capsys.readouterr().out
    assert exit_.value.code == 1 and "VideoTooLarge: 64x64 frames, over the limit of 1000 pixels" in out
    for text in ("- just\n- a list\n", "data: [1, 2]\n", "a: !!python/object/apply:os.system ['true']\n"):
        config.write_text(text)
        with pytest.raises(UserError, match=r"--config .*: not a (storm-fit config|readable YAML file)|not a mapping"):
            _check_settings(argparse.Namespace(config=str(config), frames=4), [shard])


def test_a_corrupt_parquet_annotation_file_is_one_line(tmp_path):
    from storm_lightning.data.convert import read_annotations

    path = tmp_path / "ann.parquet"
    path.write_bytes(b"PAR1" + os.urandom(2000))
    with pytest.raises(UserError, match="ann.parquet is not a readable parquet file"):
        list(read_annotations(str(path)))


def test_benchmark_records_with_too_many_options_or_odd_categories_are_reported():
    """Nine options: an IndexError (reported as unexpected_error) in Video-MME, the ninth silently dropped in
    MLVU; a list as category was written as the text "[1, 2]"."""
    from storm_lightning.data.benchmarks import mlvu, videomme
    from storm_lightning.data.records import BadRecord

    letters = "ABCDEFGHI"
    base = {"videoID": "v", "question": "Q?", "answer": "A", "task_type": "t"}
    with pytest.raises(BadRecord) as info:
        videomme({**base, "options": [f"{c}. x{c}" for c in letters]})
    assert info.value.kind == "bad_options"
    question = "Which?\n" + "\n".join(f"({c}) x{c}" for c in letters)
    with pytest.raises(BadRecord) as info:
        mlvu({"video_name": "v.mp4", "question": question, "answer": "A", "task_type": "t"})
    assert info.value.kind == "bad_options"
    for key, value, kind in (("task_type", [1, 2], "bad_category"), ("duration", float("nan"), "bad_duration")):
        with pytest.raises(BadRecord) as info:
            videomme({**base, "options": ["A. a", "B. b"], key: value})
        assert info.value.kind == kind
    ok = videomme({**base, "options": ["A. a", "B. b"], "duration": 600})  # LongVideoBench-style groups
    assert ok.meta["duration"] == "600"


# ---- the fourth hostile pass (docs/reliability.md) --------------------------------------------------------

def test_a_category_or_duration_with_any_character_is_scored():
    """``Action.Counting`` / ``1.5min`` were module names: a KeyError at the first validation."""
    from types import SimpleNamespace

    from storm_lightning.evaluation import MultipleChoiceMetrics

    metrics = MultipleChoiceMetrics()
    batch = SimpleNamespace(options=[["a", "b"], ["a", "b"]], answer=[0, 1], category=["Action.Counting", "x:y/z"],
                            duration=["1.5min", None], clip_frames=[8, 8], keys=["k0", "k1"], sources=["v", "v"],
                            frames_per_sample=torch.tensor([8, 8]))
    metrics.update(batch, torch.tensor([[2.0, 1.0], [2.0, 1.0]]), "val")
    values = metrics.compute("val", world_size=1, device="cpu")
    assert values["val/accuracy/category/Action.Counting"] == 1 and values["val/accuracy/category/x:y/z"] == 0
    assert values["val/accuracy/duration/1.5min"] == 1 and values["val/accuracy/overall"] == 0.5


def test_ckpt_path_of_weights_alone_and_consolidate_into_a_folder_are_one_line(tmp_path):
    from storm_lightning.checkpoint import AtomicCheckpointIO, consolidate

    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "weights.ckpt")  # what init_from takes
    with pytest.raises(UserError, match="holds weights only, not a checkpoint of a run: give it as --model.init_from="):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "weights.ckpt")
    (tmp_path / "shards").mkdir()
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="OUTPUT .*out: is a folder: give the name of the file to write"):
        consolidate(str(tmp_path / "shards"), str(tmp_path / "out"))


def test_synth_into_a_file_is_one_line_and_a_rerun_leaves_no_stale_shards(tmp_path, capsys):
    from storm_lightning.cli import shards_main

    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        shards_main(["synth", "--out", str(tmp_path / "file")])
    assert exit_.value.code == 2 and "--out" in capsys.readouterr().err
    shards_main(["synth", "--out", str(tmp_path / "d"), "--scale", "0.002", "--shards-per-source", "3", "--image-size", "16"])
    shards_main(["synth", "--out", str(tmp_path / "d"), "--scale", "0.002", "--shards-per-source", "2", "--image-size", "16"])
    assert sorted(p.name for p in (tmp_path / "d/train").glob("text-*.tar")) == ["text-000000.tar", "text-000001.tar"]


def test_pickled_or_other_component_weights_are_one_line_and_run_nothing(tmp_path, marker):
    """A SigLIP tower's or an LLM's pytorch_model.bin holding a payload, a timm checkpoint_path holding one
    or holding another model's weights: 18-22-frame tracebacks before (nothing ran: weights-only)."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from storm_lightning.llm import HFCausalLM
    from storm_lightning.vision import SiglipVisionBackbone, TimmViTBackbone

    payload = {"w": WritesAFile(str(marker))}
    for name, config in (("siglip", SiglipVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=48, image_size=32, patch_size=8)),
                         ("qwen2", Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1, intermediate_size=48, vocab_size=64))):
        config.save_pretrained(tmp_path / name)
        torch.save(payload, tmp_path / name / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match=r"^model.vision.init_args.pretrained_path: .*siglip holds more than"):
        SiglipVisionBackbone(pretrained_path=str(tmp_path / "siglip"))
    with pytest.raises(UnsafeFileError, match=r"^model.llm.init_args.pretrained_path: .*qwen2 holds more than"):
        HFCausalLM(pretrained_path=str(tmp_path / "qwen2"))
    torch.save(payload, tmp_path / "timm.pt")
    timm_args = dict(model_name="vit_tiny_patch16_224", image_size=32, patch_size=8)
    with pytest.raises(UnsafeFileError, match=r"^model.vision.init_args.checkpoint_path: .*timm.pt holds more than"):
        TimmViTBackbone(checkpoint_path=str(tmp_path / "timm.pt"), **timm_args)
    torch.save({"state_dict": {"pos_embed": torch.zeros(3)}}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"^model.vision.init_args.checkpoint_path: .*other.pt does not fit"):
        TimmViTBackbone(checkpoint_path=str(tmp_path / "other.pt"), **timm_args)


def test_a_config_whose_aliases_multiply_is_refused_before_it_expands(tmp_path):
    """591 bytes of ten levels of ten aliases: 2.4 GB in 33 s, then out of memory (storm-chat, storm-fit)."""
    from storm_lightning.inference import load_config
    from tests.conftest import storm_fit

    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    (tmp_path / "laughs.yaml").write_text("\n".join(levels) + "\nmodel: {vision: *a9}\n")
    (tmp_path / "loop.yaml").write_text("model: &m {vision: *m}\n")
    (tmp_path / "shared.yaml").write_text("common: &c {x: 1}\nmodel: {a: *c, b: *c}\n")  # anchors as meant
    with pytest.raises(UserError, match="laughs.yaml: expands to more than 1000000 values"):
        load_config(str(tmp_path / "laughs.yaml"))
    with pytest.raises(UserError, match="loop.yaml: a YAML alias refers to a node that contains it"):
        load_config(str(tmp_path / "loop.yaml"))
    assert load_config(str(tmp_path / "shared.yaml"))["model"] == {"a": {"x": 1}, "b": {"x": 1}}
    proc = storm_fit("--config", "conf/sft.yaml", "--config", str(tmp_path / "laughs.yaml"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "storm-fit: error: a YAML config: expands to more than 1000000 values (YAML aliases of aliases)")


def test_resuming_with_the_sources_reordered_continues_each_source_where_it_was(tmp_path):
    """The shard order was seeded by a source's place in the list: with a source inserted before it (or
    the list reordered) the saved position pointed into another shard, silently."""
    from storm_lightning.data import ShardSource
    from storm_lightning.data.samples import SampleProcessor
    from storm_lightning.data.stream import ShardStream

    shards = {name: [write_tar(tmp_path / f"{name}-{i:06d}.tar",
                               {f"{name}{i}_{j:02d}": {"json": conv("hi", "yo.")} for j in range(10)})
                     for i in range(4)] for name in ("a", "b")}

    def stream(names):
        sources = [ShardSource(n, str(tmp_path / f"{n}-{{000000..000003}}.tar")) for n in names]
        return ShardStream(sources, [shards[n] for n in names], SampleProcessor(TOKENIZER, 16, 512), infinite=True,
                           seed=3)

    def by_source(samples):
        return {n: [s.key for s in samples if s.source == n] for n in ("a", "b")}

    straight = iter(stream(["a", "b"]))
    first, rest = [next(straight) for _ in range(25)], [next(straight) for _ in range(30)]
    interrupted = stream(["a", "b"])
    it = iter(interrupted)
    assert [next(it).key for _ in range(25)] == [s.key for s in first]
    state = interrupted.state()
    resumed = stream(["b", "a"])  # the list reordered between the runs
    resumed.open()  # as the batcher does: open, restore, iterate
    resumed.restore(state)
    it = iter(resumed)
    again = by_source([next(it) for _ in range(30)])
    expected = by_source(rest)
    for name in ("a", "b"):  # each source goes on with its own next samples (the mix itself may differ)
        n = min(len(again[name]), len(expected[name]))
        assert n > 5 and again[name][:n] == expected[name][:n]


def test_a_medium_in_a_format_storm_does_not_read_is_a_bad_sample_not_a_text_one(tmp_path):
    """TGIF-QA's .gif (or a .jpeg.gz) beside a record without a placeholder trained as a text question
    about a picture the model never saw; storm-shards check passed it."""
    from storm_lightning.data import ShardSource
    from storm_lightning.data.convert import CheckSettings, check
    from storm_lightning.data.records import BadRecord
    from storm_lightning.data.samples import SampleProcessor
    from storm_lightning.data.shards import read_shard

    shard = write_tar(tmp_path / "m-000000.tar", {"gif": {"json": conv("What moves?", "A cat."), "gif": b"GIF89a"},
                                                  "gz": {"json": conv("What is it?", "A dog."), "jpeg.gz": b"x"},
                                                  "txt": {"json": conv("Hi", "Hello."), "txt": b"a caption",
                                                          "npy": b"features", "text": b"t", "msgpack": b"m",
                                                          "meta.json": b"{}", "json.gz": b"z"},
                                                  "jfif": {"json": conv("What is it?", "A dog."), "jfif": b"x"},
                                                  "png": {"json": conv(), "png": png()}})
    processor, source = SampleProcessor(TOKENIZER, 64, 512), ShardSource("m", shard)
    outcome = {}
    for raw in read_shard(shard):
        try:
            processor(raw, source)
            outcome[raw.key] = "ok"
        except BadRecord as bad:
            outcome[raw.key] = bad.kind
    assert outcome == {"gif": "unsupported_media", "gz": "unsupported_media", "jfif": "unsupported_media",
                       "txt": "ok", "png": "ok"}
    report, = check([shard], CheckSettings(tokenizer_path=TOKENIZER, image_size=64), workers=1)
    assert sorted(b["key"] for b in report["bad"]) == ["gif", "gz", "jfif"]


def test_a_multiple_choice_record_that_contradicts_itself_is_bad():
    """A reply "A" with answer 2 (training teaches A, evaluation scores C) passed check."""
    from storm_lightning.data.records import BadRecord, multiple_choice_prompt, validate_record

    def record(reply, options=("red", "green", "blue"), answer=2):
        turns = [{"from": "human", "value": multiple_choice_prompt("Which colour?", list(options))},
                 {"from": "gpt", "value": reply}]
        return {"conversations": turns, "options": list(options), "answer": answer}

    for reply in ("C", "c", "(c)", "C.", "(C) blue", "C: blue", "The answer is C.", "Answer: (C)", "A blue one.",
                  "A", "Blue, I think.", "The answer is a dog.", "Answer: a dog", "D.C.", "A.I. is everywhere.",
                  "Answer: A dog.", "The answer is A dog running.", "**C**", "[C]", "My answer is C.",
                  "I choose a dog.", "My answer is a dog.", "It is a dog.", "It is A dog.",
                  "C, because it is blue.", "答案：C", "blue (C)"):
        assert validate_record(record(reply, answer=2 if reply != "A" else 0), has_media=False).answer in (0, 2)
    for reply in ("A", "B.", "(A) red", " A", "a", "(a)", "Answer: A", "The answer is A.", "Option A", "answer is b",
                  "**A**", "[A]", "[a]", "*A.*", "My answer is B.", "Final answer: A", "I choose B", "I pick option A",
                  "`B`", "B, because it moves left.", "B - it moves left.", "B\n\nExplanation: it moves.", "It is B.",
                  "b) green", "B). green", "(B)green", "B:green", "答案：B", "green (B)", "It's (b)"):
        with pytest.raises(BadRecord, match="answer_mismatch"):
            validate_record(record(reply), has_media=False)


def test_a_checkpoint_is_read_with_the_config_that_trained_it(run_dir):
    """A fresh fit into the same run folder rewrote config.yaml at its start: exporting the old last.ckpt
    then carried the new run's system prompt and compressors (no weights differ, nothing failed)."""
    from storm_lightning.checkpoint import RUN_CONFIG
    from storm_lightning.inference import export, from_pretrained, load_model
    from tests.conftest import FAST, storm_fit

    storm_fit("--config", "conf/sft.yaml", *FAST, "--data.system_prompt=You are terse.", "--model.compressors=[]")
    ckpt = run_dir / "runs/sft/checkpoints/last.ckpt"
    assert "You are terse." in torch.load(ckpt, weights_only=True)[RUN_CONFIG]
    config = run_dir / "runs/sft/config.yaml"  # what a second run's start writes
    config.write_text(config.read_text().replace("You are terse.", "You are a pirate.").replace(
        "compressors: []", "compressors: [{class_path: storm_lightning.compressors.TemporalAveragePool, "
                           "init_args: {kernel_size: 2}}]"))
    model, _ = load_model(str(ckpt))
    assert model.hparams.system_prompt == "You are terse." and len(model.compressors) == 0
    exported = from_pretrained(str(export(str(ckpt), str(run_dir / "export"))))
    assert exported.hparams.system_prompt == "You are terse." and len(exported.compressors) == 0
    model, _ = load_model(str(ckpt), config=str(config))  # a config given on purpose is used
    assert model.hparams.system_prompt == "You are a pirate." and len(model.compressors) == 1


def test_an_evaluation_of_which_no_sample_could_be_read_is_an_error(run_dir):
    """storm-fit test over a source whose every sample is skipped exited 0, with no figures."""
    from tests.conftest import storm_fit

    write_tar(run_dir / "bad-000000.tar", {f"b{i}": {"json": b'{"conversations": []}'} for i in range(3)})
    for command in ("test", "validate"):
        proc = storm_fit(command, "--config", "conf/sft.yaml", "--data.num_workers=0",
                         "--trainer.enable_progress_bar=false", "--data.val_sources=[{name: bad, shards: bad-000000.tar}]",
                         check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            f"storm-fit: error: storm-fit {command}: no sample of data.val_sources was evaluated (each was skipped, "
            "or the sources are empty: see the warnings above)")
    # one good source and one bad: the figures were the good one's, the bad one left out without a word
    proc = storm_fit("test", "--config", "conf/sft.yaml", "--data.num_workers=0", "--trainer.enable_progress_bar=false",
                     "--data.val_sources=[{name: bad, shards: bad-000000.tar}, "
                     "{name: image, shards: data_shards/eval/image-000000.tar}]", "--trainer.limit_test_batches=null",
                     check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "storm-fit: error: storm-fit test: data.val_sources ['bad'] gave no sample"), proc.stderr[-2000:]


# ---- the fifth hostile pass --------------------------------------------------------------------------------

def test_a_component_given_as_a_bare_string_is_checked_before_it_is_imported(tmp_path, monkeypatch):
    """`projector: evilmod.Foo` (jsonargparse's shorthand for a class_path) was imported unchecked."""
    from storm_lightning.inference import instantiate, load_config

    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Foo: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_config(str(SHARDS.parent / "conf/sft.yaml"))["model"]
    for change in ({"projector": "evilmod.Foo"}, {"compressors": ["evilmod.Foo"]}, {"lora_llm": "evilmod.Foo"}):
        with pytest.raises(ConfigError, match=r"names classes outside storm_lightning: \['evilmod.Foo'\]"):
            instantiate({**model, **change, "tokenizer_path": TOKENIZER})
    with pytest.raises(ConfigError, match=r"dotted keys \['projector.class_path'\]: write them nested"):
        instantiate({**model, "projector.class_path": "evilmod.Foo", "tokenizer_path": TOKENIZER})
    assert not marker.exists()


def test_fifth_pass_user_errors_are_one_line(tmp_path, run_dir):
    """A cut model.safetensors in an LLM's pretrained_path, a checkpoint whose embedded config is 2 MB,
    two sources of one name, an output path under a file, a source of bad samples stopping training."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from storm_lightning.checkpoint import RUN_CONFIG
    from storm_lightning.data import ShardSource, StormDataModule
    from storm_lightning.inference import load_model
    from storm_lightning.llm import HFCausalLM
    from tests.conftest import storm_fit
    from tests.test_user_errors import one_line, run

    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=48, vocab_size=64)).save_pretrained(tmp_path / "qwen2")
    weights = tmp_path / "qwen2/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"^model.llm.init_args.pretrained_path: .* does not load \(SafetensorError"):
        HFCausalLM(pretrained_path=str(tmp_path / "qwen2"))
    torch.save({"state_dict": {}, RUN_CONFIG: "x" * 2_000_000}, tmp_path / "big.ckpt")
    with pytest.raises(UserError, match="its training config is 2000000 characters, over 1000000: pass --config"):
        load_model(str(tmp_path / "big.ckpt"))
    torch.save({"state_dict": [1, 2]}, tmp_path / "list.ckpt")  # a TypeError traceback before (seventh pass)
    with pytest.raises(ConfigError, match="list.ckpt does not fit the model of"):
        load_model(str(tmp_path / "list.ckpt"), config=str(SHARDS.parent / "conf/sft.yaml"))
    shard = write_tar(tmp_path / "t-000000.tar", {"a": {"json": conv("hi", "yo.")}})
    with pytest.raises(ConfigError, match=r"data.train_sources: names \['t'\] more than one source"):
        StormDataModule(train_sources=[ShardSource("t", shard), ShardSource("t", shard)], tokenizer_path=TOKENIZER)
    (tmp_path / "file").write_text("x")
    line = one_line(run("storm_lightning.cli:shards_main", "synth", "--out", tmp_path / "file/sub", "--scale", "0.001"),
                    "storm-shards")  # an output path under a file (a typo): NotADirectoryError tracebacks before
    assert line == f"storm-shards: error: Not a directory: '{tmp_path / 'file/sub/train'}'"
    line = one_line(run("storm_lightning.cli:shards_main", "synth", "--out", "/proc/nope/sub", "--scale", "0.001"),
                    "storm-shards")  # any OSError about a path (missing, read-only, full): one line
    assert line.startswith("storm-shards: error: ") and "/proc/nope" in line
    write_tar(run_dir / "bad-000000.tar", {f"b{i}": {"json": b'{"conversations": []}'} for i in range(20)})
    proc = storm_fit("--config", "conf/sft.yaml", "--trainer.max_steps=2", "--data.num_workers=1",
                     "--trainer.enable_progress_bar=false", "--data.train_sources=[{name: bad, shards: bad-000000.tar}]",
                     "--data.skip_rate_after=5", "--data.max_skip_rate=0.5", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("storm-fit: error: source 'bad': 5 of 5 samples skipped"), \
        proc.stderr[-2000:]


def test_a_checkpoint_is_read_only_with_the_tokenizer_that_trained_it(run_dir):
    """storm-shards synth run again retrains the tokenizer in place: same size, other ids for the same
    tokens. Testing, chatting with or starting a stage from an older checkpoint then went on silently
    with every token embedding meaning another token."""
    import json
    import shutil

    from storm_lightning.checkpoint import TOKENIZER_FINGERPRINT
    from storm_lightning.errors import ConfigError
    from storm_lightning.inference import load_model
    from storm_lightning.tokenizer import load_tokenizer, tokenizer_fingerprint
    from tests.conftest import FAST, storm_fit

    storm_fit("--config", "conf/sft.yaml", *FAST)
    ckpt = run_dir / "runs/sft/checkpoints/last.ckpt"
    same = tokenizer_fingerprint(load_tokenizer("data_shards/tokenizer"))
    assert torch.load(ckpt, weights_only=True)[TOKENIZER_FINGERPRINT] == same
    shutil.copytree("data_shards/tokenizer", "retrained")
    spec = json.loads((run_dir / "retrained/tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["What"], vocab["ang"] = vocab["ang"], vocab["What"]  # two tokens trade ids: the size is the same
    (run_dir / "retrained/tokenizer.json").write_text(json.dumps(spec))
    assert tokenizer_fingerprint(load_tokenizer("retrained")) != same

    for args in (("test", "--config", "conf/sft.yaml", "--ckpt_path", str(ckpt)),
                 ("fit", "--config", "conf/sft.yaml", *FAST, f"--model.init_from={ckpt}",
                  "--trainer.default_root_dir=runs/next")):
        proc = storm_fit(*args, "--data.tokenizer_path=retrained", "--data.num_workers=0", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "another tokenizer than the one in 'retrained'" in proc.stderr.strip().splitlines()[-1]
    config = run_dir / "retrained.yaml"
    config.write_text((run_dir / "runs/sft/config.yaml").read_text().replace("data_shards/tokenizer", "retrained"))
    with pytest.raises(ConfigError, match="another tokenizer"):
        load_model(str(ckpt), str(config))
    load_model(str(ckpt))  # its own tokenizer: loads


# ---- eighth pass ---------------------------------------------------------------------------------------


def test_placeholders_in_a_chat_prompt_or_system_prompt_are_text_or_refused(tmp_path):
    """storm-chat's prompt "<image> what is it?" with no image (or two placeholders for one image) was an
    AssertionError traceback; a placeholder in data.system_prompt passed the build and killed step 1."""
    from storm_lightning.data import ShardSource, StormDataModule
    from storm_lightning.inference import build_model, media_batch

    model, _ = build_model(str(SHARDS.parent / "conf/sft.yaml"))
    image = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    for prompt, pixels in (("<image> what is it?", None), ("<image> or <video>?", image), ("<video>", None)):
        batch = media_batch(model, prompt, pixels)
        model.expand_inputs(batch)  # one placeholder per medium, none without one: no AssertionError
    with pytest.raises(ConfigError, match=r"data.system_prompt: contains a media placeholder"):
        StormDataModule(train_sources=[ShardSource("image", str(SHARDS / "eval/image-000000.tar"))],
                        tokenizer_path=str(TOKENIZER), system_prompt="Look at the <image> carefully.")


def test_a_broken_tokenizer_folder_is_one_line_and_the_fingerprint_covers_the_chat_template(tmp_path):
    import shutil

    from storm_lightning.tokenizer import load_tokenizer, tokenizer_fingerprint

    broken = tmp_path / "tok"
    shutil.copytree(TOKENIZER, broken)
    (broken / "tokenizer_config.json").write_text("{")
    with pytest.raises(UserError, match=r"data.tokenizer_path: '.*tok' is not a readable tokenizer: JSONDecodeError"):
        load_tokenizer(str(broken))
    tok = load_tokenizer(str(TOKENIZER))
    before = tokenizer_fingerprint(tok)
    tok.chat_template = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}{% endfor %}"
    assert tokenizer_fingerprint(tok) != before  # same vocabulary, another prompt format


def test_link_members_overlapping_patterns_and_a_compressed_sample_over_its_bound(tmp_path, monkeypatch):
    """A hard-linked or symlinked image in a tar was dropped without a word (the sample trained as a text
    question); two patterns matching one shard read it twice; three 1000 MiB entries of one gzipped sample
    (each under the per-entry limit) took 4.9 GB."""
    import gzip
    import io
    import tarfile

    import storm_lightning.data.shards as shards
    from storm_lightning.data import ShardSource

    path = tmp_path / "links-000000.tar"
    with tarfile.open(path, "w") as tar:
        for key in ("s0", "s1", "s2"):
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(conv())
            tar.addfile(info, io.BytesIO(conv()))
            info = tarfile.TarInfo(f"{key}.png")
            if key == "s0":
                info.size = len(png())
                tar.addfile(info, io.BytesIO(png()))
            else:
                info.type, info.linkname = (tarfile.LNKTYPE if key == "s1" else tarfile.SYMTYPE), "s0.png"
                tar.addfile(info)
    s0, s1, s2 = shards.read_shard(str(path))
    assert s0.problem is None and s1.problem.startswith("link_entry") and s2.problem.startswith("link_entry")

    (tmp_path / "image-hd-000000.tar").write_bytes(path.read_bytes())
    found = ShardSource("img", str(tmp_path / "{links-*,*-hd-*,image-hd-*}.tar")).shard_paths("data.train_sources[0]")
    assert len(found) == len(set(found)) == 2

    monkeypatch.setattr(shards, "MAX_STREAM_SAMPLE", 3000)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in (("k.json", conv("hi", "yo.")), ("k.pad0", b"\0" * 2000), ("k.pad1", b"\0" * 2000),
                           ("ok.json", conv("hi", "yo."))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "bomb-000000.tar.gz").write_bytes(gzip.compress(raw.getvalue()))
    big, ok = shards.read_shard(str(tmp_path / "bomb-000000.tar.gz"))
    assert big.problem.startswith("entry_too_large: k.pad1") and big.entries["pad1"] == b"" and ok.problem is None


def test_convert_keeps_what_the_annotations_say(tmp_path):
    """A Latin-1 line of a .jsonl was converted with U+FFFD in place of its letters; a LLaVA record's
    duration was dropped; Video-MME options lettered out of order were stored under the wrong letters;
    macOS's ._frame files beside a frame folder's frames were stored as frames."""
    from PIL import Image

    from storm_lightning.data.benchmarks import _strip_letters
    from storm_lightning.data.convert import conversation_record, folder_frames, read_annotations
    from storm_lightning.data.records import BadRecord
    from storm_lightning.data.video import frame_files

    lines = tmp_path / "a.jsonl"
    lines.write_bytes('{"q": "café"}\n'.encode("latin-1") + '{"q": "café"}\n'.encode("utf-8"))
    bad, good = read_annotations(str(lines))
    assert isinstance(bad, BadRecord) and "line 1" in str(bad) and good == {"q": "café"}

    record = {"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nQ?"},
                                                  {"from": "gpt", "value": "A"}], "duration": 600}
    assert conversation_record(record).meta["duration"] == "600"

    assert _strip_letters(["A. red", "B. blue"]) == ["red", "blue"]
    with pytest.raises(BadRecord, match="bad_options: options lettered BA"):
        _strip_letters(["B. blue", "A. red"])

    frames = tmp_path / "media/clip"
    frames.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(frames / f"frame_{i}.jpg")
        (frames / f"._frame_{i}.jpg").write_bytes(b"\0\5\26\7AppleDouble")
    (frames / "frame_9.jpg").write_bytes(b"not a jpeg")
    assert [os.path.basename(f) for f in frame_files(frames)] == ["frame_0.jpg", "frame_1.jpg", "frame_2.jpg",
                                                                  "frame_9.jpg"]
    with pytest.raises(BadRecord, match="corrupt_media: clip/frame_9.jpg"):
        folder_frames((tmp_path / "media").resolve(), frames, "clip")


def test_an_export_is_replaced_whole_and_read_only_with_its_own_tokenizer_and_size(run_dir, tmp_path):
    """An export's tokenizer folder swapped for another (or a link out of the export) loaded silently; a
    3 KB config.json with vocab_size 6,000,000 took gigabytes before any check; a kill during an export
    over an older one left the new config.json with the old weights."""
    import shutil

    from storm_lightning.checkpoint import RUN_CONFIG
    from storm_lightning.inference import _load_checkpoint, export, from_pretrained
    from tests.conftest import FAST, storm_fit

    storm_fit("--config", "conf/sft.yaml", *FAST)
    ckpt = run_dir / "runs/sft/checkpoints/last.ckpt"
    out = run_dir / "exp"
    export(str(ckpt), str(out))
    (out / "tokenizer/stale").mkdir()
    export(str(ckpt), str(out))  # over an export: replaced whole
    assert not (out / "tokenizer/stale").exists() and not list(run_dir.glob(".exp.*"))
    from_pretrained(str(out))

    (run_dir / "mine").mkdir()
    (run_dir / "mine/notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files than an export's"):
        export(str(ckpt), str(run_dir / "mine"))
    assert (run_dir / "mine/notes.txt").read_text() == "mine"

    swapped = run_dir / "swapped"
    shutil.copytree(out, swapped)
    spec = json.loads((swapped / "tokenizer/tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["What"], vocab["ang"] = vocab["ang"], vocab["What"]
    (swapped / "tokenizer/tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="tokenizer folder was changed after the export"):
        from_pretrained(str(swapped))

    linked = run_dir / "linked"
    shutil.copytree(out, linked)
    shutil.rmtree(linked / "tokenizer")
    (linked / "tokenizer").symlink_to(out / "tokenizer")
    with pytest.raises(ConfigError, match="tokenizer_path must be a folder inside the export"):
        from_pretrained(str(linked))

    huge = run_dir / "huge"
    shutil.copytree(out, huge)
    spec = json.loads((huge / "config.json").read_text())
    spec["model"]["llm"]["init_args"]["vocab_size"] = 6_000_000
    (huge / "config.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="describes a model of .* parameters"):
        from_pretrained(str(huge))
    state = torch.load(ckpt, weights_only=True)
    state[RUN_CONFIG] = state[RUN_CONFIG].replace("vocab_size: 1024", "vocab_size: 6000000")
    torch.save(state, run_dir / "huge.ckpt")
    with pytest.raises(ConfigError, match="describes a model of .* parameters"):
        _load_checkpoint(str(run_dir / "huge.ckpt"), None, None)


def test_a_checkpoint_tested_with_other_data_settings_says_so(run_dir):
    from tests.conftest import FAST, storm_fit

    storm_fit("--config", "conf/sft.yaml", *FAST, "--data.system_prompt=Answer in French.")
    proc = storm_fit("test", "--config", "conf/sft.yaml", "--ckpt_path", "runs/sft/checkpoints/last.ckpt",
                     "--trainer.limit_test_batches=1", "--data.num_workers=0")
    assert "was trained with other settings: data.system_prompt='Answer in French.' (now None)" in proc.stderr


def test_config_slips_are_one_line_and_check_imports_nothing(run_dir, tmp_path):
    """A compressor's own error inside a list override was a jsonargparse traceback; a key given twice
    kept the last silently; `storm-shards check --config` imported any module a Callable key named."""
    import argparse
    import sys

    from storm_lightning.cli import _check_settings
    from storm_lightning.config_yaml import repeated_keys
    from storm_lightning.inference import load_config
    from tests.conftest import storm_fit

    proc = storm_fit("--config", "conf/sft.yaml", "--model.compressors+=TemporalSample",
                     "--model.compressors.init_args.stride=0", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "storm-fit: config error: TemporalSample stride must be >= 1, got 0"

    assert repeated_keys("model:\n  lr_llm: 1\n  lr_llm: 5\n") == ["lr_llm"]
    assert repeated_keys("a: &x {b: 1}\nc: *x\nd: {<<: *x, e: 2}\n") == []
    config = tmp_path / "twice.yaml"
    config.write_text("model:\n  lr_llm: 1.0e-3\n  lr_llm: 5.0\n")
    with pytest.raises(UserError, match="the key 'lr_llm' is given twice"):
        load_config(str(config))

    sys.modules.pop("this", None)
    config.write_text(f"data:\n  tokenizer_path: {TOKENIZER}\n  visual_tokens: this.s\n")
    with pytest.raises(ConfigError, match=r"names classes outside storm_lightning: \['this.s'\]"):
        _check_settings(argparse.Namespace(config=str(config), frames=4), [str(SHARDS / "eval/image-000000.tar")])
    assert "this" not in sys.modules


def test_a_photo_is_read_upright_and_an_odd_member_name_is_printed(tmp_path):
    import io
    import subprocess
    from pathlib import Path
    import sys
    import tarfile

    from PIL import Image

    from storm_lightning.data.media import decode_image

    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # stored: red on the left; orientation 6 shows it on top
    exif = stored.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif, quality=95)
    shown = decode_image(buf.getvalue(), 16)[0].float()
    assert shown[0, :4].mean() > 200 and shown[0, -4:].mean() < 60  # red at the top, as a viewer shows it

    shard = tmp_path / "names-000000.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        info = tarfile.TarInfo("caf\xe9.json")
        data = b'{"conversations": [{"from": "human", "value": "hi"}]}'
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tool = str(Path(sys.executable).with_name("storm-shards"))
    proc = subprocess.run([tool, "check", str(shard), "--tokenizer",
                           str(TOKENIZER), "--workers", "1"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"), timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "caf\\udce9" in proc.stdout, proc.stderr[-1500:]
