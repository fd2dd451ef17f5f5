"""Inference: KV-cache generation equals a cache-free loop; checkpoints reload; storm-chat answers."""

import subprocess
import sys

import pytest
import torch

from storm_lightning.compressors import TemporalSample
from storm_lightning.inference import generate, load_model, media_batch
from tests.conftest import FAST, SHARDS, storm_fit
from tests.test_model import tiny


def test_kv_cache_generation_equals_a_loop_without_cache():
    model = tiny().eval()
    pixels = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    text = generate(model, "What happens?", pixels, max_new_tokens=6, stream=False)
    with torch.no_grad():  # greedy, recomputing everything each step
        inputs, attention, _ = model.build_inputs(media_batch(model, "What happens?", pixels))
        tokens = []
        for _ in range(6):
            logits = model.llm.model(inputs_embeds=inputs, attention_mask=attention, use_cache=False).logits
            token = int(logits[0, -1].argmax())
            if token == model.tokenizer.convert_tokens_to_ids("<|im_end|>"):
                break
            tokens.append(token)
            inputs = torch.cat([inputs, model.llm.embed(torch.tensor([[token]]))], dim=1)
            attention = torch.cat([attention, attention.new_ones(1, 1)], dim=1)
    assert text == model.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def test_generation_stops_at_a_stop_string_or_the_token_budget():
    model = tiny().eval()
    full = generate(model, "Hello", max_new_tokens=12)
    assert len(model.tokenizer.encode(full, add_special_tokens=False)) <= 12
    assert len(generate(model, "Hello", max_new_tokens=3)) < len(full) or len(full) <= 3
    stop = full[len(full) // 2:][:2]
    if stop.strip():
        assert generate(model, "Hello", max_new_tokens=12, until=(stop,)) == full.split(stop)[0].strip()


@pytest.mark.slow
def test_checkpoint_reloads_and_storm_chat_answers(run_dir, tmp_path):
    storm_fit("--config", "conf/sft.yaml", *FAST)
    ckpt = run_dir / "runs/sft/checkpoints/last.ckpt"
    model, _ = load_model(str(ckpt))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], msg=name)
    resampled, _ = load_model(str(ckpt), compressors=[TemporalSample(4)])
    assert resampled.visual_tokens(32, training=False) == (512, 128)

    import tarfile
    with tarfile.open(SHARDS / "eval/video32-000000.tar") as tar:
        video = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".mp4"))).read()
    (tmp_path / "clip.mp4").write_bytes(video)
    cmd = [sys.executable, "-c", "from storm_lightning.cli import chat_main; chat_main()", "--checkpoint", str(ckpt),
           "--video", str(tmp_path / "clip.mp4"), "--prompt", "Describe what happens in the video.",
           "--temporal-sample", "2", "--max-new-tokens", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[32 of 32 frames (0.0-3.9 s), 512 visual tokens -> 256 after compression]" in proc.stderr
    # what was streamed is the greedy answer of the same model on the same frames
    from storm_lightning.data.video import FrameSampling, read_video

    sampled, _ = load_model(str(ckpt), compressors=[TemporalSample(2)])
    pixels = read_video(video, FrameSampling(frames=32), sampled.vision.image_size).frames
    expected = generate(sampled, "Describe what happens in the video.", pixels, max_new_tokens=8, stream=False)
    assert proc.stdout.strip() == expected

    # the same clip as a folder of extracted frames (8 fps): the same frames, the same answer
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(pixels):
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(folder / f"frame_{i}.png")
    as_folder = [arg if arg != str(tmp_path / "clip.mp4") else str(folder) for arg in cmd] + ["--folder-fps", "8"]
    proc = subprocess.run(as_folder, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[32 of 32 frames (0.0-3.9 s)" in proc.stderr and proc.stdout.strip() == expected

    # the user's mistakes: one line each, exit status 2
    (tmp_path / "notes.mp4").write_text("not a video")
    for args, message in ((["--video", str(tmp_path / "nope.mp4")], "no such file"),
                          (["--video", str(tmp_path / "notes.mp4")], "notes.mp4"),
                          (["--video", str(tmp_path / "clip.mp4"), "--frames", "0"], "--frames must be >= 1"),
                          (["--image", str(tmp_path / "clip.mp4")], "--image")):
        bad = subprocess.run(cmd[:5] + args + ["--prompt", "hi"], capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        assert bad.stderr.startswith("storm-chat: ") and message in bad.stderr and len(bad.stderr.splitlines()) == 1

    # storm-export round trip: same weights, same answers
    from storm_lightning.cli import export_main
    from storm_lightning.inference import from_pretrained

    export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "export")])
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    exported = from_pretrained(str(tmp_path / "export"), compressors=[TemporalSample(2)])
    for name, value in sampled.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, msg=name)
    prompt = "Describe what happens in the video."
    assert generate(exported, prompt, pixels, max_new_tokens=8, stream=False) == expected
