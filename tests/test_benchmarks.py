"""The four video benchmarks' own annotation formats -> multiple-choice shards -> storm-fit test.

The fixtures carry exactly the fields each benchmark ships (Video-MME as parquet, as on its hub page);
the videos are generated here."""

import json

import numpy as np
import pytest

from storm_lightning.data.convert import convert
from storm_lightning.data.synth import encode_mp4
from tests.conftest import storm_fit
from tests.test_convert import read_all


def videos(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        clip = [np.full((32, 32, 3), (20 * i + 3 * t) % 255, np.uint8) for t in range(24)]
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode_mp4(clip, fps=8))


BENCHMARKS = {
    "videomme": [  # one row per question, as its parquet has them
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
         "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "When demonstrating the Germany modern Christmas tree is "
         "initially decorated with apples, candles and berries, which kind of the decoration has the largest number?",
         "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."],
         "answer": "C"},
        {"video_id": "002", "duration": "long", "domain": "Sports", "sub_category": "Football",
         "url": "https://www.youtube.com/watch?v=abc", "videoID": "xyz123", "question_id": "002-1",
         "task_type": "Action Reasoning", "question": "Why does the player fall?",
         "options": ["A. A tackle.", "B. Rain.", "C. A cramp.", "D. He slips."], "answer": "A"},
    ],
    "mvbench": [
        {"video": "166583.webm".replace(".webm", ".mp4"), "question": "What is the action performed by the person "
         "in the video?", "candidates": ["Not sure", "Scattering something down", "Piling something up"],
         "answer": "Piling something up"},
        {"video": "clips/v_2.mp4", "question": "What happened after the person took the box?",
         "candidates": ["Ate the medicine.", "Tidied up the blanket."], "answer": "Tidied up the blanket.",
         "start": 0.5, "end": 2.5},
    ],
    "mlvu": [
        {"video_name": "movie101_66.mp4", "duration": 600, "question": "What is the main background of the video?\n"
         "(A) Playground\n(B) Classroom\n(C) Road\n(D) Kitchen", "answer": "C", "question_type": "topic_reasoning"},
        {"video_name": "AWA-6.mp4", "duration": 467.98, "question": "Rerank the events.\n(A) 1-2-3\n(B) 3-2-1",
         "answer": "(B)", "question_type": "order"},
    ],
    "longvideobench": [
        {"video_id": "86CxyhFV9MI", "video_path": "86CxyhFV9MI.mp4", "subtitle_path": "86CxyhFV9MI_en.json",
         "duration": 14.1, "duration_group": 15, "starting_timestamp_for_subtitles": 0, "id": "86CxyhFV9MI_0",
         "question": "In the video, which subtitles appear at the same time as a man with black hair?",
         "question_wo_referring_query": "Which subtitles appear?", "option0": "A.", "option1": "B.",
         "option2": "C.", "option3": "D.", "option4": "N/A", "correct_choice": 2,
         "question_category": "T3E", "topic_category": "NP-News-Programs", "level": "L2-Relation"},
        {"video_id": "q2", "video_path": "q2.mp4", "duration": 480.0, "duration_group": 600, "id": "q2_0",
         "question": "What color is the car?", "option0": "Red", "option1": "Blue", "option2": "N/A",
         "option3": "N/A", "option4": "N/A", "correct_choice": 1, "question_category": "S2A"},
    ],
}
VIDEO_NAMES = {"videomme": ["fFjv93ACGo8.mp4", "xyz123.mp4"], "mvbench": ["166583.mp4", "clips/v_2.mp4"],
               "mlvu": ["movie101_66.mp4", "AWA-6.mp4"], "longvideobench": ["86CxyhFV9MI.mp4", "q2.mp4"]}


def write(tmp_path, name, records):
    if name == "videomme":  # the parquet Video-MME ships
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "test-00000-of-00001.parquet"
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        path = tmp_path / ("action_sequence.json" if name == "mvbench" else f"{name}.json")
        path.write_text(json.dumps(records))
    return path


@pytest.fixture
def benchmark_shards(tmp_path):
    out = {}
    for name, records in BENCHMARKS.items():
        root = tmp_path / name / "videos"
        videos(root, VIDEO_NAMES[name])
        annotations = write(tmp_path / name, name, records)
        for fmt in (name, "auto"):  # named, and recognised by its keys
            report = convert(str(annotations), str(root), str(tmp_path / name / f"shards_{fmt}"), format=fmt,
                             progress=False)
            assert report["written"] == 2, (name, fmt, report["problems"])
        out[name] = tmp_path / name / f"shards_{name}"
    return out


def test_each_benchmark_becomes_multiple_choice_samples(benchmark_shards):
    mme = read_all(benchmark_shards["videomme"])
    first = mme["000000000"]
    assert first.options == ["Apples.", "Candles.", "Berries.", "The three kinds are of the same number."]
    assert (first.answer, first.category, first.duration) == (2, "Counting Problem", "short")
    prompt = first.input_ids.tolist()
    from storm_lightning.tokenizer import load_tokenizer
    from tests.conftest import TOKENIZER

    text = load_tokenizer(TOKENIZER).decode(prompt)
    assert "C. Berries." in text and "Answer with the option's letter" in text
    mv = read_all(benchmark_shards["mvbench"])
    assert mv["000000000"].answer == 2 and mv["000000000"].category == "action_sequence"  # the file's task
    assert all(0.5 <= t < 2.5 for t in mv["000000001"].timestamps)  # its start/end
    mlvu = read_all(benchmark_shards["mlvu"])
    assert mlvu["000000000"].options == ["Playground", "Classroom", "Road", "Kitchen"]
    # MLVU's duration is the video's length in seconds (467.98 was refused as bad_duration): no group
    assert (mlvu["000000000"].answer, mlvu["000000001"].answer, mlvu["000000001"].duration) == (2, 1, None)
    lvb = read_all(benchmark_shards["longvideobench"])
    assert lvb["000000000"].options == ["A.", "B.", "C.", "D."] and lvb["000000001"].options == ["Red", "Blue"]
    assert (lvb["000000000"].answer, lvb["000000000"].category, lvb["000000000"].duration) == (2, "T3E", "15")


@pytest.mark.slow
def test_storm_fit_test_reports_per_category_and_duration(benchmark_shards, run_dir):
    sources = "\n".join(f"    - {{name: {name}, shards: '{path}/data-000000.tar', frames_per_clip: 8}}"
                        for name, path in benchmark_shards.items())
    (run_dir / "bench.yaml").write_text(f"data:\n  val_sources:\n{sources}\n")
    proc = storm_fit("test", "--config", "conf/sft.yaml", "--config", "bench.yaml", "--trainer.limit_test_batches=null",
                     "--trainer.enable_progress_bar=false", "--data.num_workers=0", "--data.val_batch_size=4")
    output = proc.stdout + proc.stderr
    for group in ("test/accuracy/overall", "test/accuracy/category/Counting Problem", "test/accuracy/category/T3E",
                  "test/accuracy/category/action_sequence", "test/accuracy/duration/long",
                  "test/accuracy/duration/600"):
        assert group in output, group
    predictions = json.loads((run_dir / "runs/sft/predictions.json").read_text())
    assert len(predictions) == 8 and {p["source"] for p in predictions} == set(BENCHMARKS)
