"""storm-shards convert / check: LLaVA-style JSON in, shards out, nothing outside the media root read."""

import json
import subprocess
import sys

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
    assert from_pretrained(str(run_dir / "export")).visual_tokens(4, training=False) == (64, 64)


def test_bundled_eval_shards_check_clean():
    from tests.conftest import SHARDS

    results = check(sorted(str(p) for p in (SHARDS / "eval").glob("*.tar")), workers=2)
    assert len(results) == 4 and all(r["samples"] > 0 and not r["bad"] for r in results)
