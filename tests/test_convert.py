"""storm-shards convert / check: LLaVA-style JSON in, shards out, nothing outside the media root read."""

import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from storm_lightning.data.convert import check, convert
from storm_lightning.data.synth import encode_mp4
from tests.conftest import FAST, storm_fit
from tests.test_data import png


def turn(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture
def llava(tmp_path):
    """A media folder, a secret file beside it, and annotations with good and bad records."""
    root = tmp_path / "media"
    (root / "img").mkdir(parents=True)
    (root / "vid").mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(png())
    for i in range(3):
        (root / "img" / f"{i}.png").write_bytes(png(size=24 + i))
    for i in range(2):
        clip = [np.full((40, 48, 3), 20 * t, np.uint8) for t in range(6 + i)]
        (root / "vid" / f"{i}.mp4").write_bytes(encode_mp4(clip))
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "img" / "link.png").symlink_to(secret)
    (root / "notes.txt").write_text("hi")
    records = (
        [{"id": f"i{i}", "image": f"img/{i}.png", "conversations": turn("<image>\nWhat is it?", "a square.")}
         for i in range(3)]
        + [{"id": f"v{i}", "video": f"vid/{i}.mp4", "conversations": turn("<video>\nWhat happens?", "it brightens."),
            "options": ["darker", "brighter"], "answer": 1, "category": "light"} for i in range(2)]
        + [{"id": "text", "conversations": turn("What is 2 plus 2?", "4.")}]
    )
    bad = {
        "escape_dotdot": {"image": "../secret.png"},
        "escape_absolute": {"image": str(secret)},
        "escape_symlink": {"image": "img/link.png"},
        "missing": {"image": "img/nope.png"},
        "corrupt": {"image": "img/broken.jpg"},
        "unsupported": {"image": "notes.txt"},
    }
    records += [{"id": name, **media, "conversations": turn("<image>\nhi", "yo.")} for name, media in bad.items()]
    records.append({"id": "no_conversations", "image": "img/0.png"})
    annotations = tmp_path / "llava.json"
    annotations.write_text(json.dumps(records))
    return annotations, root, tmp_path / "shards"


def test_convert_writes_good_records_and_reports_the_rest(llava):
    annotations, root, out = llava
    report = convert(str(annotations), str(root), str(out), samples_per_shard=5, workers=2, progress=False)
    assert (report["records"], report["written"], report["shards"]) == (13, 6, 3)
    assert report["problems_by_kind"] == {"bad_conversations": 1, "corrupt_media": 1, "escapes_media_root": 3,
                                          "missing_media": 1, "unsupported_media": 1}
    by_id = {p["id"]: p["problem"] for p in report["problems"]}
    assert by_id["escape_dotdot"] == by_id["escape_absolute"] == by_id["escape_symlink"] == "escapes_media_root"
    assert by_id["missing"] == "missing_media" and by_id["corrupt"] == "corrupt_media"
    assert json.loads((out / "convert_report.json").read_text())["written"] == 6
    results = check(sorted(str(p) for p in out.glob("*.tar")))
    assert sum(r["samples"] for r in results) == 6 and not any(r["bad"] for r in results)


def test_secret_outside_the_media_root_never_reaches_a_shard(llava):
    annotations, root, out = llava
    convert(str(annotations), str(root), str(out), samples_per_shard=100, progress=False)
    secret = (root.parent / "secret.png").read_bytes()
    assert secret not in (out / "data-000000.tar").read_bytes().replace(png(size=24), b"")


def test_convert_resumes_by_skipping_finished_shards(llava):
    annotations, root, out = llava
    convert(str(annotations), str(root), str(out), samples_per_shard=5, progress=False)
    (out / "data-000001.tar").unlink()
    report = convert(str(annotations), str(root), str(out), samples_per_shard=5, progress=False)
    assert report["resumed_shards"] == 2 and (out / "data-000001.tar").exists() and report["written"] == 6


def test_check_finds_bad_samples_and_fails(tmp_path, llava):
    annotations, root, out = llava
    convert(str(annotations), str(root), str(out), samples_per_shard=100, progress=False)
    data = (out / "data-000000.tar").read_bytes()
    (out / "cut-000000.tar").write_bytes(data[: len(data) * 2 // 3])
    cmd = [sys.executable, "-c", "from storm_lightning.cli import shards_main; shards_main()", "check"]
    good = subprocess.run(cmd + [str(out / "data-000000.tar")], capture_output=True, text=True)
    assert good.returncode == 0 and "6 samples, 0 bad" in good.stdout
    bad = subprocess.run(cmd + [str(out / "cut-000000.tar")], capture_output=True, text=True)
    assert bad.returncode == 1 and "bad" in bad.stdout


@pytest.mark.slow
def test_converted_shards_train_and_export(llava, run_dir):
    annotations, root, out = llava
    convert(str(annotations), str(root), str(out), samples_per_shard=4, progress=False)
    (run_dir / "mine.yaml").write_text(
        "data:\n  train_sources:\n"
        f"    - {{name: mine, shards: '{out}/data-{{000000..000002}}.tar', frames_per_clip: 4}}\n"
        "  val_sources: []\n  batch_size: 3\n")
    storm_fit("--config", "conf/sft.yaml", "--config", "mine.yaml", *FAST)
    assert (run_dir / "runs/sft/checkpoints/last.ckpt").is_file()
    from storm_lightning.cli import export_main
    from storm_lightning.inference import from_pretrained

    export_main(["--checkpoint", str(run_dir / "runs/sft/checkpoints/last.ckpt"), "--out", str(run_dir / "export")])
    assert from_pretrained(str(run_dir / "export")).visual_tokens(4, training=False) == (64, 32)  # pooling 2


def test_bundled_eval_shards_check_clean():
    from tests.conftest import SHARDS

    results = check(sorted(str(p) for p in (SHARDS / "eval").glob("*.tar")), workers=2)
    assert len(results) == 4 and all(r["samples"] > 0 and not r["bad"] for r in results)


# ---- real annotation formats, frame folders, clip bounds, conversion-time sampling -------------------------

def video_file(path, frames=40, fps=10, size=(48, 40)):
    """A clip whose frame i is uniformly grey level 5 * i (so a decoded frame says which it is)."""
    clip = [np.full((size[1], size[0], 3), 5 * i, np.uint8) for i in range(frames)]
    path.write_bytes(encode_mp4(clip, fps=fps))
    return path


@pytest.fixture
def formats(tmp_path):
    """One annotation file per style (LLaVA, VILA, ms-swift, LLaMA-Factory, ShareGPTVideo frame folder)."""
    from PIL import Image

    root = tmp_path / "media"
    root.mkdir()
    video_file(root / "clip.mp4")
    video_file(root / "clip.mkv")
    (root / "frames").mkdir()
    for i in range(12):  # frame_2 sorts before frame_10
        Image.new("RGB", (32, 24), (10 * i,) * 3).save(root / "frames" / f"frame_{i}.jpg")
    (root / "a.png").write_bytes(png())
    (root / "b.png").write_bytes(png())
    q, a = "<video>\nWhat happens?", "it brightens."
    styles = {
        "llava": [{"id": "l0", "video": "clip.mp4", "conversations": turn(q, a)},
                  {"id": "l1", "video": "clip.mkv", "conversations": turn(q, a), "start": 1.0, "end": 3.0}],
        "vila": [{"id": "v0", "videos": ["clip.mkv"], "conversations": turn(q, a)},
                 {"id": "v1", "images": ["a.png", "b.png"], "conversations": turn("<image>\nAnd these?", "two.")}],
        "swift": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                                {"role": "assistant", "content": a}], "videos": ["clip.mp4"]},
                  {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                   "videos": ["frames"]}],
        "sharegptvideo": [{"id": "f0", "video": "frames", "conversations": turn(q, a), "fps": 2}],
    }
    files = {}
    for name, records in styles.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(records))
    return files, root


def read_all(out):
    from storm_lightning.data.samples import SampleProcessor
    from storm_lightning.data.stream import ShardStream
    from storm_lightning.data import ShardSource
    from tests.conftest import TOKENIZER

    shards = sorted(str(p) for p in out.glob("*.tar"))
    stream = ShardStream([ShardSource("c", shards[0], frames_per_clip=4)], [shards], SampleProcessor(TOKENIZER, 16, 512),
                         infinite=False)
    return {s.key: s for s in stream}


def test_each_annotation_style_converts_and_reads(formats, tmp_path):
    files, root = formats
    for name, path in files.items():
        report = convert(str(path), str(root), str(tmp_path / name), progress=False)
        samples = read_all(tmp_path / name)
        assert len(samples) == report["written"], name
    vila = json.loads((tmp_path / "vila/convert_report.json").read_text())
    assert vila["written"] == 1 and vila["problems"][0]["problem"] == "several_media"  # never text-only
    llava = read_all(tmp_path / "llava")
    bounded = llava["000000001"]  # frames only from [1, 3) s at 10 fps: indices 10..29
    assert all(10 <= i < 30 for i in bounded.frame_indices) and all(1.0 <= t < 3.0 for t in bounded.timestamps)
    swift = read_all(tmp_path / "swift")
    assert swift["000000001"].clip_frames == 12  # the frame folder, stored frame by frame
    folder = read_all(tmp_path / "sharegptvideo")["000000000"]
    assert folder.timestamps == [i / 2 for i in folder.frame_indices]  # the record's fps
    # frame i of the folder is grey 10 * i: natural name order kept
    assert [int(folder.pixel_values[k].float().mean().round()) for k in range(4)] == [
        10 * i for i in folder.frame_indices]


def test_conversion_time_sampling_keeps_the_source_positions(formats, tmp_path):
    files, root = formats
    out = tmp_path / "small"
    report = convert(str(files["llava"]), str(root), str(out), progress=False, frames=8, size=16)
    assert report["written"] == 2 and report["shard_bytes"] > 0
    with tarfile.open(out / "data-000000.tar") as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert [len(m["frame_indices"]) for m in metas] == [8, 8] and "start" not in metas[1]
    assert all(10 <= i < 30 for i in metas[1]["frame_indices"])
    sample = read_all(out)["000000001"]  # 4 of the clip's 8 frames, named by their place in the source video
    assert set(sample.frame_indices) <= set(metas[1]["frame_indices"])
    assert sample.timestamps == [i / 10 for i in sample.frame_indices]


def test_bad_records_are_reported_never_fatal(tmp_path, formats):
    files, root = formats
    records = ["not an object", {"id": "nul", "video": "cl\0ip.mp4", "conversations": turn("<video>\nhi", "yo.")},
               {"id": 7, "image": {"path": "a.png"}, "conversations": turn("<image>\nhi", "yo.")},
               {"id": "ok", "conversations": turn("hi", "yo.")}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    report = convert(str(path), str(root), str(tmp_path / "out"), progress=False, samples_per_shard=2, workers=2)
    assert report["written"] == 1 and [p["problem"] for p in report["problems"]] == [
        "not_an_object", "bad_path", "bad_path"]
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo."}]}\n'
                     "{not json\n")
    report = convert(str(jsonl), str(root), str(tmp_path / "out_jsonl"), progress=False)
    assert report["written"] == 1 and report["problems"][0]["problem"] == "bad_json"
    assert not list((tmp_path / "out").glob("*.tmp*"))


def test_an_output_made_otherwise_is_refused_and_temporaries_are_cleaned(formats, tmp_path):
    from storm_lightning.errors import ConfigError, UserError

    files, root = formats
    out = tmp_path / "out"
    convert(str(files["llava"]), str(root), str(out), progress=False, samples_per_shard=1)
    with pytest.raises(UserError, match="other options"):  # 45,100 entries with 5,100 duplicates, before
        convert(str(files["llava"]), str(root), str(out), progress=False, samples_per_shard=2)
    with pytest.raises(UserError, match="another annotation file"):
        convert(str(files["vila"]), str(root), str(out), progress=False, samples_per_shard=1)
    with pytest.raises(ConfigError, match="--samples-per-shard must be >= 1"):
        convert(str(files["llava"]), str(root), str(tmp_path / "x"), progress=False, samples_per_shard=-1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / f"data-000000.tar.tmp{dead.pid}").write_bytes(b"half")  # a conversion killed midway
    report = convert(str(files["llava"]), str(root), str(out), progress=False, samples_per_shard=1)
    assert report["resumed_shards"] == 2 and not list(out.glob("*.tmp*"))
    moved = tmp_path / "moved.json"  # the same annotations elsewhere: the same conversion
    moved.write_bytes(files["llava"].read_bytes())
    assert convert(str(moved), str(root), str(out), progress=False, samples_per_shard=1)["resumed_shards"] == 2
    other_root = tmp_path / "other_media"  # another media folder would mix two sets of media in one output
    shutil.copytree(root, other_root)
    with pytest.raises(UserError, match=r"\(media_root differ\)"):
        convert(str(files["llava"]), str(other_root), str(out), progress=False, samples_per_shard=1)


def test_storm_shards_errors_are_one_line(tmp_path, formats):
    files, root = formats
    cmd = [sys.executable, "-c", "from storm_lightning.cli import shards_main; shards_main()"]
    for args, message in ((["convert", "--annotations", str(tmp_path / "none.json"), "--media-root", str(root),
                            "--out", str(tmp_path / "o")], "no such file"),
                          (["convert", "--annotations", str(files["llava"]), "--media-root", str(root), "--out",
                            str(tmp_path / "o"), "--samples-per-shard", "0"], "--samples-per-shard must be >= 1"),
                          (["check", str(tmp_path / "none.tar")], "no such shard")):
        proc = subprocess.run(cmd + args, capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith("storm-shards: ") and message in proc.stderr


@pytest.mark.slow
def test_real_style_annotations_convert_check_and_train(formats, tmp_path, run_dir):
    """LLaVA, VILA, ms-swift and ShareGPTVideo-style files -> shards -> check passes -> storm-fit trains."""
    files, root = formats
    patterns = []
    for name, path in files.items():
        report = convert(str(path), str(root), str(tmp_path / name), progress=False)
        patterns.append(report["shard_pattern"])
    check = subprocess.run([sys.executable, "-c", "from storm_lightning.cli import shards_main; shards_main()", "check",
                            *patterns, "--frames", "4"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    sources = "\n".join(f"    - {{name: {name}, shards: '{pattern}', frames_per_clip: 4}}"
                        for name, pattern in zip(files, patterns))
    (run_dir / "mine.yaml").write_text(f"data:\n  train_sources:\n{sources}\n  val_sources: []\n  batch_size: 2\n")
    storm_fit("--config", "conf/sft.yaml", "--config", "mine.yaml", *FAST, "--trainer.max_steps=3")
    assert (run_dir / "runs/sft/checkpoints/last.ckpt").is_file()


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_stopping_convert_stops_the_worker_processes_too(tmp_path, stop):
    """Left alone, convert's workers (children of the multiprocessing forkserver) ran on after SIGTERM or
    SIGKILL, holding 550 MB each and writing shards into --out after the command had exited."""
    import signal
    import subprocess
    import sys
    import time

    video_file(tmp_path / "v.mp4")
    records = [{"video": "v.mp4", "conversations": turn(f"<video>\nWhat {i}?", "ok")} for i in range(3000)]
    (tmp_path / "many.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "from storm_lightning.cli import shards_main; shards_main()",
                             "convert", "--annotations", str(tmp_path / "many.json"), "--media-root", str(tmp_path),
                             "--out", str(out), "--frames", "8", "--size", "32", "--samples-per-shard", "50",
                             "--workers", "2"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar")) and time.monotonic() < deadline:  # the workers are writing
        time.sleep(0.2)
    workers = _descendants(proc.pid)  # the forkserver, its workers, the resource tracker
    proc.send_signal(getattr(signal, stop))
    if stop == "SIGTERM":  # handled: the workers stopped, then exit at once
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert "storm-shards: stopped by SIGTERM" in proc.stderr.read()
    else:  # nothing runs in the killed process: each worker notices within a second
        assert proc.wait(timeout=30) == -signal.SIGKILL
    time.sleep(3)
    assert len(workers) >= 3 and not [pid for pid in workers if _running(pid)]
    written = sorted(out.iterdir())
    time.sleep(2)
    assert sorted(out.iterdir()) == written  # nothing is written after the command has stopped


def _descendants(pid: int) -> list[int]:
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found += children.get(todo[-1], [])
        todo = todo[:-1] + children.get(todo[-1], [])
    return found


def _running(pid: int) -> bool:
    from pathlib import Path

    try:  # a zombie has stopped; only its exit status is left to collect
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
