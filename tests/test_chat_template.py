"""Chat templates rendered without transformers agree with transformers' apply_chat_template."""
from __future__ import annotations

import json

import pytest

from pagedserve.common.chat_template import (
    ChatTemplate, ChatTemplateError, read_chat_template, read_special_tokens)
from pagedserve.scheduler_svc.tokenizer import Tokenizer

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one word."}
CONVERSATIONS = {
    "system_and_user": [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
    "no_system_message": [{"role": "user", "content": "Hello! Who are you?"}],
    "multi_turn": [
        SYSTEM,
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, with ünïcödé and 日本語 🎉?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And a third"},
    ],
    "multi_turn_no_system": [
        {"role": "user", "content": "2 + 2 = ?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  spaces\n\nand lines  "},
    ],
}


@pytest.fixture(scope="module")
def template(smollm2_dir) -> ChatTemplate:
    return ChatTemplate(read_chat_template(smollm2_dir), read_special_tokens(smollm2_dir))


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_text_and_token_ids_as_transformers(template, hf_tokenizer, smollm2_dir, name,
                                                    add_generation_prompt):
    messages = CONVERSATIONS[name]
    text = template.render(messages, add_generation_prompt)
    assert text == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = Tokenizer.from_model_dir(smollm2_dir).encode(text, add_special_tokens=False)
    assert ids == hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, return_dict=False)


def test_smollm2_prompt_ends_with_the_assistant_header(template):
    text = template.render(CONVERSATIONS["no_system_message"])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_reads_special_tokens_of_tokenizer_config(smollm2_dir, hf_tokenizer):
    assert read_special_tokens(smollm2_dir) == hf_tokenizer.special_tokens_map


def test_template_from_tokenizer_config_string_or_default_of_named_list(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "A{{ messages[0]['content'] }}",
                                  "bos_token": {"content": "<s>", "special": True}}))
    assert read_chat_template(tmp_path) == "A{{ messages[0]['content'] }}"
    assert read_special_tokens(tmp_path) == {"bos_token": "<s>"}
    config.write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert read_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # the file wins over the config
    assert read_chat_template(tmp_path) == "J"
    override = tmp_path / "mine.jinja"
    override.write_text("O")
    assert read_chat_template(tmp_path, override) == "O"


def test_named_templates_without_default_are_refused(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}]}))
    with pytest.raises(ChatTemplateError, match=r"\['tool_use'\] but none named 'default'"):
        read_chat_template(tmp_path)


def test_model_without_template_has_none_and_missing_override_is_named(tmp_path):
    assert read_chat_template(tmp_path) is None
    with pytest.raises(ChatTemplateError, match="nope.jinja does not exist"):
        read_chat_template(tmp_path, tmp_path / "nope.jinja")


def test_environment_matches_transformers_globals_and_filters(smollm2_dir, hf_tokenizer):
    source = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
              "{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}\n"
              "  {{ ns.n }} {{ messages[0] | tojson }} {{ dict(a=1) | tojson }}"
              "{{ dict.fromkeys(['b']) | tojson(indent=1) }}\n"
              "{% generation %}{{ bos_token }}|{{ eos_token }}{% endgeneration %}\n"
              "{% if add_generation_prompt %}>{% endif %}")
    messages = [{"role": "user", "content": "<é> & \"q\""}]
    text = ChatTemplate(source, read_special_tokens(smollm2_dir)).render(messages)
    assert text == hf_tokenizer.apply_chat_template(messages, chat_template=source,
                                                    tokenize=False, add_generation_prompt=True)
    assert '"<é> & \\"q\\""' in text  # tojson keeps non-ASCII and HTML characters


def test_raise_exception_in_template_is_a_chat_template_error():
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}"
                            "{{ raise_exception('Conversation must start with user') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="must start with user"):
        template.render([{"role": "assistant", "content": "hi"}])


def test_sandbox_refuses_reaching_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}{% set ns = namespace() %}"
                            "{% set ns._x = 1 %}")
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="underscore"):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([{"role": "user", "content": ""}])


def test_none_values_are_dropped_and_bad_messages_named():
    template = ChatTemplate("{{ 'name' in messages[0] }}")
    assert template.render([{"role": "user", "content": "x", "name": None}]) == "False"
    with pytest.raises(ChatTemplateError, match="message 1 must be a dict"):
        template.render([{"role": "user", "content": "x"}, "hello"])
    with pytest.raises(ChatTemplateError, match="empty"):
        template.render([])


def test_syntax_error_is_named():
    with pytest.raises(ChatTemplateError, match="does not compile.*line 1"):
        ChatTemplate("{% for m in messages %}")
