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


def test_a_template_that_runs_forever_is_stopped_at_build_and_in_a_sample(llama3_tokenizer, monkeypatch):
    """jinja's sandbox bounds a loop's length, not nested loops: 10^10 steps hung storm-fit at build."""
    from storm_lightning import tokenizer as tokenizer_module
    from storm_lightning.errors import ConfigError
    from storm_lightning.tokenizer import check_chat_format

    monkeypatch.setattr(tokenizer_module, "TEMPLATE_SECONDS", 0.5)
    llama3_tokenizer.chat_template = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                      "{% endfor %}" + LLAMA3)
    with pytest.raises(ConfigError, match="chat template ran for more than 0.5 s"):
        check_chat_format(llama3_tokenizer, "data.tokenizer_path")
    with pytest.raises(ValueError, match="ran for more than 0.5 s"):  # a sample: skipped and counted
        encode_prompt(llama3_tokenizer, TURNS[:1])


def test_a_conversation_of_thousands_of_turns_renders_only_what_fits(llama3_tokenizer, monkeypatch):
    """Every assistant turn renders its prefix: 2,000 exchanges took 34 s. Turns past max_length tokens
    are not rendered, and the tokens kept are those of the whole conversation."""
    from storm_lightning.tokenizer import _encode_with_template, _messages

    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": f"turn {i} " * 3} for i in range(4000)]
    rendered = []
    render = type(llama3_tokenizer).apply_chat_template
    monkeypatch.setattr(type(llama3_tokenizer), "apply_chat_template",
                        lambda self, messages, **kw: rendered.append(len(messages)) or render(self, messages, **kw))
    ids, labels = encode_conversation(llama3_tokenizer, turns, 64)
    assert len(rendered) < 200 and max(rendered) < 200  # 4,001 renders of up to 4,000 turns before
    monkeypatch.undo()
    whole_ids, whole_labels = _encode_with_template(llama3_tokenizer, _messages(turns[:200], None))
    assert (ids, labels) == (whole_ids[:64], whole_labels[:64])


def test_a_template_that_renders_megabytes_from_a_few_words_is_refused(llama3_tokenizer):
    """Its rendering is tokenized in native code, past the time limit: 12 MB took 13 s and 3 GB."""
    llama3_tokenizer.chat_template = "{{ 'x' * 12000000 }}" + LLAMA3
    with pytest.raises(ValueError, match="chat template rendered 120.* characters from"):
        encode_conversation(llama3_tokenizer, TURNS, 64)
    with pytest.raises(ValueError, match="chat template rendered"):
        encode_prompt(llama3_tokenizer, TURNS[:1])
