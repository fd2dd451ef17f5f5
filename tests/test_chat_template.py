"""The LLM's own chat template: labels cover exactly the assistant replies (Llama 3 style), ChatML for
the bundled tokenizer, and an optional system prompt."""

import json

import pytest

from storm_lightning.tokenizer import IGNORE_INDEX, encode_conversation, encode_prompt, load_tokenizer
from tests.conftest import TOKENIZER

# Meta-Llama-3-8B-Instruct's template
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
          "{% endif %}")
TURNS = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A red circle."},
         {"from": "human", "value": "Which way?"}, {"from": "gpt", "value": "Left, then up."}]


@pytest.fixture
def llama3_tokenizer(tmp_path):
    """A tokenizer built here (the bundled BPE) with Llama 3's special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=f"{TOKENIZER}/tokenizer.json", bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>",
                                  additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"])
    tok.chat_template = LLAMA3
    tok.save_pretrained(tmp_path / "llama3")
    return load_tokenizer(str(tmp_path / "llama3"))


def trained(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_labels_cover_exactly_the_assistant_replies(llama3_tokenizer):
    tok = llama3_tokenizer
    ids, labels = encode_conversation(tok, TURNS, 1000)
    assert tok.decode(ids).startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<video>\n")
    assert trained(tok, ids, labels) == "A red circle.<|eot_id|>Left, then up.<|eot_id|>"
    # every labelled token is inside a reply, every reply token is labelled
    spans = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in spans)
    assert tok.convert_tokens_to_ids("<video>") in ids  # the placeholder is one token


def test_generation_prompt_ends_with_the_assistant_header(llama3_tokenizer):
    tok = llama3_tokenizer
    text = tok.decode(encode_prompt(tok, TURNS[:1], system_prompt="Be brief."))
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chatml_for_the_bundled_tokenizer_with_a_system_prompt():
    tok = load_tokenizer(TOKENIZER)
    ids, labels = encode_conversation(tok, TURNS[:2], 1000, system_prompt="Be brief.")
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert trained(tok, ids, labels) == "A red circle.<|im_end|>"


def test_a_template_that_cannot_give_labels_fails_at_build_naming_the_key(tmp_path, llama3_tokenizer):
    from storm_lightning.data import ShardSource, StormDataModule
    from storm_lightning.errors import ConfigError
    from tests.conftest import SHARDS

    folder = tmp_path / "odd"
    llama3_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ 'ok' }}"
    llama3_tokenizer.save_pretrained(folder)
    with pytest.raises(ConfigError, match="data.tokenizer_path: its chat template"):
        StormDataModule([ShardSource("t", str(SHARDS / "train/text-000000.tar"))], tokenizer_path=str(folder))
    assert json.loads((folder / "tokenizer_config.json").read_text())  # (a real tokenizer folder)


def test_a_template_that_reaches_for_the_os_is_refused_at_build(tmp_path, llama3_tokenizer):
    """The template runs in jinja's sandbox; what it trips on is one config error, nothing runs."""
    from storm_lightning.errors import ConfigError
    from storm_lightning.tokenizer import check_chat_format

    marker = tmp_path / "pwned"
    llama3_tokenizer.chat_template = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    llama3_tokenizer.save_pretrained(tmp_path / "evil")
    with pytest.raises(ConfigError, match="its chat template cannot be used"):  # (the model and data check it)
        check_chat_format(load_tokenizer(str(tmp_path / "evil")), "data.tokenizer_path")
    assert not marker.exists()
