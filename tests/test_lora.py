"""LoRA (peft) on the LLM and the vision tower: only adapters and projector weights change; a plain
checkpoint starts a LoRA stage; storm-export merges the adapters; conf/sft_lora.yaml end to end."""

import torch

from storm_lightning.lora import LoraSettings, plain_key
from tests.conftest import FAST, storm_fit
from tests.test_model import fit_tiny, make_batch, tiny

import pytest


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_only_adapters_and_the_projector_train():
    model = tiny(lora_llm=LoraSettings(rank=4), freeze_vision=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("projector.", "downsampler.")) for n in trainable)
    assert any(n.startswith("llm.") for n in trainable) and not any(n.startswith("vision.") for n in trainable)
    before = snapshot(model)
    fit_tiny(model, steps=3)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("lora_B" in k for k in changed) and any(k.startswith("projector.") for k in changed)
    assert all("lora_" in k or k.startswith(("projector.", "downsampler.")) for k in changed), sorted(changed)[:5]


def test_lora_on_the_vision_tower_too():
    model = tiny(lora_llm=LoraSettings(rank=2), lora_vision=LoraSettings(rank=2, target_modules=["q_proj", "v_proj"]))
    vision = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    assert vision and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in vision)


def test_an_adapter_on_a_tied_embedding_is_refused():
    """Trained, the adapter would change the input embedding only; merged by storm-export, the shared
    weight, so the output head too: the export would not be the trained model."""
    from storm_lightning.errors import ConfigError

    for targets in (["embed_tokens"], ["q_proj", "lm_head"]):
        with pytest.raises(ConfigError, match=r"model.lora_llm.target_modules=.*tie_word_embeddings"):
            tiny(lora_llm=LoraSettings(rank=2, target_modules=targets))
    assert tiny(lora_llm=LoraSettings(rank=2, target_modules=["q_proj", "v_proj"])) is not None


def test_a_plain_checkpoint_starts_a_lora_stage(tmp_path):
    plain = tiny()
    torch.save({"state_dict": plain.state_dict()}, tmp_path / "sft.ckpt")
    adapted = tiny(lora_llm=LoraSettings(rank=4), init_from=str(tmp_path / "sft.ckpt"))
    theirs = {plain_key(k): v for k, v in adapted.state_dict().items() if "lora_" not in k}
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(theirs[name], value, msg=name)
    batch = make_batch(adapted)
    with torch.no_grad():  # lora_B starts at zero: the same function as the checkpoint's
        torch.testing.assert_close(adapted.eval()(batch)["loss"], plain.eval()(batch)["loss"])


@pytest.mark.slow
def test_sft_lora_config_trains_resumes_exports_merged_and_chats(run_dir):
    storm_fit("--config", "conf/sft_lora.yaml", *FAST, "--trainer.max_steps=2")
    ckpt = run_dir / "runs/sft_lora/checkpoints/last.ckpt"
    storm_fit("--config", "conf/sft_lora.yaml", *FAST, "--trainer.max_steps=3",
              f"--ckpt_path={ckpt}")
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 3 and any("lora_A" in k for k in state["state_dict"])
    from storm_lightning.cli import export_main
    from storm_lightning.inference import from_pretrained, load_model

    export_main(["--checkpoint", str(ckpt), "--out", str(run_dir / "export")])
    exported = from_pretrained(str(run_dir / "export"))
    assert not any("lora_" in k for k in exported.state_dict())  # merged: a plain model
    adapted, _ = load_model(str(ckpt))
    batch = make_batch(adapted, frames=(0, 0))
    with torch.no_grad():
        torch.testing.assert_close(exported(batch)["loss"], adapted(batch)["loss"], rtol=1e-4, atol=1e-4)
    import subprocess
    import sys

    chat = subprocess.run([sys.executable, "-c", "from storm_lightning.cli import chat_main; chat_main()",
                           "--checkpoint", str(run_dir / "export"), "--prompt", "What is 1 plus 1?",
                           "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
