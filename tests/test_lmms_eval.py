"""The lmms-eval adapter (``storm_lightning/lmms_eval_model.py``), through lmms-eval's own CLI, offline.

Needs the ``eval`` extra (lmms-eval pins av<16 and pulls ~50 packages): ``.ci/run`` runs this file in a
second environment; where lmms_eval is not importable (the main suite's), the whole file is skipped.

The test writes everything lmms-eval reads: two tasks (``--include_path``) over a local JSON Lines file
(``dataset_path: json``, ``dataset_kwargs.data_files``: the datasets library's packaged builder, no Hub),
two mp4 videos and one frame folder, and a tiny STORM checkpoint (conf/sft.yaml's model, random weights).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[eval]', see .ci/run)")

import numpy as np
import torch
import yaml

# not `from tests.conftest import ...`: lmms-eval's dependency latex2sympy2 installs a top-level `tests` package
ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "data_shards" / "tokenizer")

FRAMES = 8
GEN_TASK, CHOICE_TASK = "storm_local_video", "storm_local_choice"
QUESTIONS = [("What moves in the video?", ["a circle", "a square", "a star", "nothing"], 1),
             ("What colour is the shape?", ["red", "green", "blue", "white"], 2),
             ("How many shapes are there?", ["one", "two", "three", "four"], 0)]


def _clip(seed: int, frames: int = 12) -> list[np.ndarray]:
    """A square moving right over a noisy background, 48 x 64."""
    rng = np.random.default_rng(seed)
    clip = []
    for t in range(frames):
        frame = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
        frame[16:32, 4 * t:4 * t + 16] = (200, 40 + 60 * seed, 40)
        clip.append(frame)
    return clip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkpoint (with its config.yaml), a storm-export of it, media, a dataset and two task YAMLs."""
    from PIL import Image

    from storm_lightning.data.synth import encode_mp4
    from storm_lightning.inference import build_model, export

    root = tmp_path_factory.mktemp("lmms")
    run = root / "run"
    run.mkdir()
    config = yaml.safe_load((ROOT / "conf/sft.yaml").read_text())
    config["data"]["tokenizer_path"] = TOKENIZER  # absolute: lmms-eval runs in another directory
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    model, _ = build_model(str(run / "config.yaml"))
    with torch.no_grad():  # random weights would mostly predict ids the tokenizer lacks (1024 > its vocabulary),
        model.llm.model.get_input_embeddings().weight[len(model.tokenizer):] = 0  # which decode to "" (tied head)
    torch.save({"state_dict": model.state_dict()}, run / "model.ckpt")
    export(str(run / "model.ckpt"), str(root / "exported"))

    media = root / "media"
    media.mkdir()
    (media / "clip0.mp4").write_bytes(encode_mp4(_clip(0)))
    (media / "clip1.mp4").write_bytes(encode_mp4(_clip(1)))
    (media / "frames2").mkdir()
    for i, frame in enumerate(_clip(2)):
        Image.fromarray(frame).save(media / "frames2" / f"frame_{i}.png")
    videos = [media / "clip0.mp4", media / "clip1.mp4", media / "frames2"]

    records = [{"video": str(v), "question": q, "options": o, "answer": "ABCD"[a], "answer_index": a}
               for v, (q, o, a) in zip(videos, QUESTIONS)]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = root / "tasks"
    tasks.mkdir()
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "doc_to_visual": "video", "metadata": [{"version": 0.0}]}
    prompt = "{{question}}\nA. {{options[0]}}\nB. {{options[1]}}\nC. {{options[2]}}\nD. {{options[3]}}"
    (tasks / f"{GEN_TASK}.yaml").write_text(yaml.safe_dump({
        **common, "task": GEN_TASK, "output_type": "generate_until", "doc_to_text": prompt,
        "doc_to_target": "answer",
        "generation_kwargs": {"max_new_tokens": 3, "until": ["\n\n"], "temperature": 0, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    (tasks / f"{CHOICE_TASK}.yaml").write_text(yaml.safe_dump({
        **common, "task": CHOICE_TASK, "output_type": "multiple_choice", "doc_to_text": prompt,
        "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer_index",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    return root


def _offline_env(root: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                HF_HOME=str(root / "hf_home"), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
                WANDB_MODE="disabled", HF_HUB_DISABLE_TELEMETRY="1")


def _lmms_eval() -> list[str]:
    script = Path(sys.executable).with_name("lmms-eval")  # the console script, as users run it
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lmms_eval"]


MODEL_ARGS = f"frames={FRAMES},temporal_sample=2,max_new_tokens=5"


def _evaluate(workdir: Path, out: Path, launcher: list[str], **env):
    """``lmms-eval --model storm`` over both tasks; returns (results, {task: samples by doc_id}, process)."""
    cmd = [*launcher, "--model", "storm",
           "--model_args", f"checkpoint={workdir / 'run/model.ckpt'},{MODEL_ARGS}",
           "--tasks", f"{GEN_TASK},{CHOICE_TASK}", "--include_path", str(workdir / "tasks"),
           "--batch_size", "1", "--device", "cpu", "--output_path", str(out), "--log_samples",
           "--verbosity", "DEBUG"]  # DEBUG: an exception in the evaluation fails the process
    proc = subprocess.run(cmd, cwd=workdir, env={**_offline_env(workdir), **env}, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    results = sorted(out.rglob("*_results.json"))
    assert len(results) == 1, f"no results file under {out}: {sorted(out.rglob('*'))}\n{proc.stderr[-3000:]}"
    samples = {}
    for task in (GEN_TASK, CHOICE_TASK):
        files = sorted(out.rglob(f"*_samples_{task}.jsonl"))
        assert len(files) == 1, f"no samples of {task}: {sorted(out.rglob('*'))}"
        samples[task] = sorted((json.loads(line) for line in files[0].read_text().splitlines() if line.strip()),
                               key=lambda s: s["doc_id"])
    return json.loads(results[0].read_text()), samples, proc


@pytest.fixture(scope="module")
def evaluated(workdir):
    return _evaluate(workdir, workdir / "out", _lmms_eval())


def test_storm_is_an_lmms_eval_model_through_the_entry_point():
    from importlib.metadata import entry_points

    assert [ep.value for ep in entry_points(group="lmms_eval.models") if ep.name == "storm"] == [
        "storm_lightning.lmms_eval_model:manifest"]
    from lmms_eval.models import get_model

    from storm_lightning.lmms_eval_model import Storm

    assert get_model("storm") is Storm


def test_lmms_eval_cli_writes_results_for_both_tasks(evaluated):
    results, samples, _ = evaluated
    assert results["config"]["model"] == "storm"
    assert results["config"]["model_backend"] == "storm_lightning.lmms_eval_model.Storm (simple)"  # the entry point's
    assert f"frames={FRAMES}" in results["config"]["model_args"]
    assert set(results["results"]) == {GEN_TASK, CHOICE_TASK}
    assert 0.0 <= results["results"][GEN_TASK]["exact_match,none"] <= 1.0
    assert 0.0 <= results["results"][CHOICE_TASK]["acc,none"] <= 1.0
    assert [s["doc_id"] for s in samples[GEN_TASK]] == [s["doc_id"] for s in samples[CHOICE_TASK]] == [0, 1, 2]


def test_logged_answers_are_storm_chats_and_the_option_scores_the_adapters(evaluated, workdir, storm):
    """What lmms-eval logged is the shared generation path's answer (inference.generate, as storm-chat) on
    the same frames, within the task's max_new_tokens (3, not model_args' 5), and the option scores are the
    adapter's teacher-forced losses (lmms-eval picks the option of least loss)."""
    from storm_lightning.data.video import FrameSampling, read_path
    from storm_lightning.inference import generate

    _, samples, _ = evaluated
    records = [json.loads(line) for line in (workdir / "data.jsonl").read_text().splitlines()]
    model = storm.model
    answers = []
    for sample in samples[GEN_TASK]:
        record = records[sample["doc_id"]]
        pixels = read_path(record["video"], FrameSampling(frames=FRAMES), model.vision.image_size).frames
        expected = generate(model, sample["input"], pixels, max_new_tokens=3, until=("\n\n",))
        answer = sample["filtered_resps"]
        answer = answer[0] if isinstance(answer, list) else answer
        assert answer == expected, (record["video"], answer, expected)
        assert len(model.tokenizer.encode(answer, add_special_tokens=False)) <= 3
        answers.append(answer)
    # the media reached the model: one prompt's text with each document's video scores differently (a random
    # model's greedy answers may all be the same, even empty)
    storm.task_dict = {GEN_TASK: {"test": records}}
    text = samples[GEN_TASK][0]["input"]
    scores = [storm.loglikelihood([_Request(text, " A", lambda doc: [doc["video"]], doc_id, GEN_TASK, "test")])[0][0]
              for doc_id in range(len(records))]
    assert len({round(score, 6) for score in scores}) == len(records), scores

    storm.task_dict = {CHOICE_TASK: {"test": records}}
    for sample in samples[CHOICE_TASK]:
        logged = [(float(score), greedy in (True, "True")) for score, greedy in sample["filtered_resps"]]
        assert len(logged) == 4 and all(score > 0 for score, _ in logged)
        best = min(range(4), key=lambda i: logged[i][0])
        assert sample["acc"] == float(best == records[sample["doc_id"]]["answer_index"])
        if sample["doc_id"] == 0:  # recomputed in this process (1-2 s an option on 2 cores)
            requests = [_Request(sample["input"], f" {letter}", lambda doc: [doc["video"]], 0, CHOICE_TASK, "test")
                        for letter in "ABCD"]
            computed = storm.loglikelihood(requests)
            assert [greedy for _, greedy in logged] == [greedy for _, greedy in computed]
            assert [score for score, _ in logged] == pytest.approx([score for score, _ in computed], abs=1e-4)


def test_two_ranks_share_the_documents_and_answer_as_one_process(evaluated, workdir):
    """``torchrun --nproc_per_node 2``: lmms-eval gives each rank its shard of the documents (2 + 1 here),
    each rank's model answers its own, and rank 0 writes everything, the same as one process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "lmms_eval"]
    results, samples, proc = _evaluate(workdir, workdir / "out_2ranks", launcher, OMP_NUM_THREADS="1")
    log = proc.stdout + proc.stderr
    assert "rank1-world_size2" in log and "number of requests on this rank: 1" in log, log[-3000:]
    _, single, _ = evaluated
    assert [s["filtered_resps"] for s in samples[GEN_TASK]] == [s["filtered_resps"] for s in single[GEN_TASK]]
    for two, one in zip(samples[CHOICE_TASK], single[CHOICE_TASK]):
        assert [float(x) for x, _ in two["filtered_resps"]] == pytest.approx(
            [float(x) for x, _ in one["filtered_resps"]], abs=1e-4)
    assert set(results["results"]) == {GEN_TASK, CHOICE_TASK}


@pytest.fixture(scope="module")
def storm(workdir):
    from storm_lightning.lmms_eval_model import Storm

    return Storm(checkpoint=str(workdir / "run/model.ckpt"), frames=FRAMES, temporal_sample=2, device="cpu")


class _Request:
    def __init__(self, *args):
        self.args = args


def test_media_kinds_and_export_directory(storm, workdir):
    """A video, a frame folder, a list of PIL images (one video's frames), one PIL image (an image); a
    storm-export directory loads the same model as its checkpoint."""
    from PIL import Image

    from storm_lightning.lmms_eval_model import Storm

    size = storm.model.vision.image_size
    assert storm.media(str(workdir / "media/clip0.mp4")).shape == (FRAMES, 3, size, size)
    folder = storm.media([str(workdir / "media/frames2")])
    assert folder.shape == (FRAMES, 3, size, size)
    images = [Image.open(p) for p in sorted((workdir / "media/frames2").iterdir(), key=lambda p: int(p.stem[6:]))]
    assert torch.equal(storm.media(images), folder)  # the same frames, sampled alike (folder_fps)
    assert storm.media(images[0]).shape == (1, 3, size, size)
    assert storm.media([]) is None

    exported = Storm(checkpoint=str(workdir / "exported"), frames=FRAMES, temporal_sample=2, device="cpu")
    storm.task_dict = exported.task_dict = {"t": {"test": [{"video": str(workdir / "media/clip1.mp4")}]}}
    request = _Request("What happens?", {"until": ["\n\n"], "max_new_tokens": 4}, lambda d: [d["video"]], 0, "t",
                       "test")
    assert storm.generate_until([request]) == exported.generate_until([request])
    choice = _Request("What happens?", " B", lambda d: [d["video"]], 0, "t", "test")
    (score, greedy), = storm.loglikelihood([choice])
    assert exported.loglikelihood([choice]) == [(score, greedy)] and score > 0


def test_loglikelihood_is_the_mean_nll_of_the_continuation_tokens(storm):
    """Teacher forcing: a continuation of several tokens scores the mean negative log-probability of its
    tokens (lmms-eval's models' loss), each given the prompt and the tokens before it (checked against the
    cache-free LLM on the embeddings)."""
    from storm_lightning.inference import media_batch

    storm.task_dict = {}
    continuation = "red square"
    target = storm.tokenizer.encode(continuation, add_special_tokens=False)
    assert len(target) >= 2
    (score, greedy), = storm.loglikelihood([_Request("", continuation)])  # lmms-eval's unconditional form
    inputs, _, _ = storm.model.build_inputs(media_batch(storm.model, "", None))
    with torch.no_grad():
        embeds = torch.cat([inputs, storm.model.llm.embed(torch.tensor([target]))], dim=1)
        logits = storm.model.llm.model(inputs_embeds=embeds, use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits[inputs.shape[1] - 1:-1], -1)
    assert score == pytest.approx(-float(logprobs[range(len(target)), target].mean()), abs=1e-4)
    assert greedy == bool((logprobs.argmax(-1) == torch.tensor(target)).all())


def test_user_errors_are_one_line(storm, workdir):
    from storm_lightning.errors import ConfigError, MissingPathError, UserError
    from storm_lightning.lmms_eval_model import Storm

    with pytest.raises(MissingPathError, match="checkpoint: no such file or directory"):
        Storm(checkpoint=str(workdir / "missing.ckpt"))
    with pytest.raises(ConfigError, match="checkpoint=PATH is required"):
        Storm()
    with pytest.raises(ConfigError, match="unknown for storm: frame"):
        Storm(checkpoint=str(workdir / "run/model.ckpt"), frame=8)
    with pytest.raises(ConfigError, match="frames must be >= 1"):
        Storm(checkpoint=str(workdir / "run/model.ckpt"), frames=0)
    # accepted before, then failing (or taking 30 s) at every request
    for args, text in ((dict(fps="inf"), "fps must be > 0 and finite"),
                       (dict(frames="100000000"), "100000000 frames a video, over the reader's limit of 1024"),
                       (dict(folder_fps="1e9"), "folder_fps must be in"),
                       (dict(device="meta"), "device='meta': not usable here")):
        with pytest.raises(ConfigError, match=text):
            Storm(checkpoint=str(workdir / "run/model.ckpt"), **args)
    (workdir / "bad.mp4").write_bytes(b"not a video")
    for visual, error, text in ((workdir / "bad.mp4", UserError, "cannot read"),
                                (workdir / "gone.mp4", MissingPathError, "no such video"),
                                ([str(workdir / "media/clip0.mp4")] * 2, UserError, "one video")):
        with pytest.raises(error, match=text) as info:
            storm.media(visual if isinstance(visual, list) else str(visual))
        assert "\n" not in str(info.value)
    # a task's generation_kwargs that would end the evaluation with a traceback at its first request
    from storm_lightning.lmms_eval_model import _generation_settings

    assert _generation_settings({"until": "\n", "max_new_tokens": "8", "do_sample": False, "temperature": 0.7},
                                "t", 16) == (("\n",), 8, 0.0)
    for kwargs, text in (({"max_new_tokens": "64 tokens"}, "max_new_tokens='64 tokens': expected a whole number"),
                         ({"until": [None]}, "until=\\[None\\]: expected a string or a list"),
                         ({"temperature": "hot"}, "temperature='hot': expected a number"),
                         ({"temperature": float("nan")}, "temperature=nan")):
        with pytest.raises(ConfigError, match=f"task t: generation_kwargs.{text}"):
            _generation_settings(kwargs, "t", 16)
    # PIL frames are held to the reader's limits as a frame folder's are: only the sampled ones are read
    from PIL import Image

    huge = workdir / "huge.png"
    Image.new("1", (8000, 8000)).save(huge)  # 64 M pixels (8 MB), over the 8K limit; tiny as a PNG
    for visual in ([Image.open(huge)], [Image.open(huge)] * 3):
        with pytest.raises(UserError, match="8000x8000 image, over the limit") as info:
            storm.media(visual)
        assert "\n" not in str(info.value)
    frame = Image.new("RGB", (64, 48), (200, 40, 40))
    assert storm.media([frame] * 1_000_000).shape[0] == FRAMES  # a long list: FRAMES of them read
    with pytest.raises(NotImplementedError, match="multi-round"):
        storm.generate_until_multi_round([])


def test_a_missing_checkpoint_is_one_line_where_lmms_eval_builds_the_model(workdir):
    """The evaluator's own call (``create_from_arg_string``); its CLI prints the message as
    "Error during evaluation: ..." (and exits 0 unless --verbosity DEBUG: lmms-eval's choice)."""
    from lmms_eval.models import get_model

    from storm_lightning.errors import MissingPathError

    with pytest.raises(MissingPathError) as info:
        get_model("storm").create_from_arg_string(f"checkpoint={workdir / 'nowhere.ckpt'},frames=8", {"device": None})
    assert str(info.value) == f"--model_args checkpoint: no such file or directory '{workdir / 'nowhere.ckpt'}'"
