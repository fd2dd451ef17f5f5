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
    assert "[32 of 32 frames, 512 visual tokens -> 256 after compression]" in proc.stderr
    # what was streamed is the greedy answer of the same model on the same frames
    from storm_lightning.data.media import decode_video

    sampled, _ = load_model(str(ckpt), compressors=[TemporalSample(2)])
    pixels, _, _ = decode_video(video, 32, sampled.vision.image_size)
    expected = generate(sampled, "Describe what happens in the video.", pixels, max_new_tokens=8, stream=False)
    assert proc.stdout.strip() == expected

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
