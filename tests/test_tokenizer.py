"""The scheduler's tokenizer agrees with transformers and streams text without broken characters."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.scheduler_svc.tokenizer import IncrementalDetokenizer, Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "The capital of France is",
    "",
    "Héllo wörld, naïve café — Ærøskøbing",
    "日本語のテキストと中文文本",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧",
    "  leading,   inner\t\truns \n\n\n and trailing  ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_model_dir(smollm2_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


class CountingTokenizer(Tokenizer):
    """A tokenizer that records the length of every decode it is asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoded_lengths: list[int] = []

    def decode(self, token_ids, skip_special_tokens=True):
        self.decoded_lengths.append(len(token_ids))
        return super().decode(token_ids, skip_special_tokens)


@pytest.fixture
def counting(smollm2_dir) -> CountingTokenizer:
    return CountingTokenizer.from_model_dir(smollm2_dir)


@pytest.fixture(scope="module")
def partial_char_ids(tokenizer) -> list[int]:
    """Ids of tokens that hold only part of a multi-byte character."""
    return [i for i in range(tokenizer.vocab_size) if "\ufffd" in tokenizer.decode([i])]


def test_encodes_smollm2_prompt_without_bos(tokenizer):
    assert tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_agree_with_transformers(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer(text).input_ids
    for skip in (True, False):
        assert tokenizer.decode(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_smollm2_special_ids(tokenizer, hf_tokenizer):
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert set(hf_tokenizer.all_special_ids) <= set(tokenizer.all_special_ids)
    assert tokenizer.decode(tokenizer.all_special_ids) == ""


def test_eos_ids_are_the_union_of_the_model_configs(smollm2_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text('{"eos_token_id": 2}')
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [0, 2]}')
    assert Tokenizer.from_model_dir(tmp_path).eos_token_ids == {0, 2}


def test_missing_tokenizer_json_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_model_dir(tmp_path)


def test_detokenizer_streams_the_known_smollm2_continuation(tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    output = [7042, 30, 198, 198, 504, 2988, 314, 42]
    deltas = [detokenizer.step([token_id]) for token_id in output]
    assert deltas == [" Paris", ".", "\n", "\n", "The", " answer", " is", ":"]
    assert detokenizer.text == " Paris.\n\nThe answer is:"


def test_detokenizer_holds_back_a_split_character_until_complete(tokenizer):
    ids = tokenizer.encode(" 🎉")
    assert len(ids) > 1, "the emoji should span several tokens"
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas = [detokenizer.step([token_id]) for token_id in ids]
    assert deltas == [""] * (len(ids) - 1) + [" 🎉"]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_detokenizer_deltas_add_up_to_the_full_decode(tokenizer, partial_char_ids, data):
    token_ids = st.one_of(
        st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=3),  # anything, special ids too
        st.text(max_size=6).map(tokenizer.encode),  # real text
        st.lists(st.sampled_from(partial_char_ids), max_size=4),  # characters split across tokens
    )
    output = [i for ids in data.draw(st.lists(token_ids, max_size=8)) for i in ids]
    prompt = tokenizer.encode(data.draw(st.text(max_size=12)))
    skip = data.draw(st.booleans())
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    generated, streamed = [], ""
    while len(generated) < len(output):
        chunk = output[len(generated):len(generated) + data.draw(st.integers(1, 4))]
        generated += chunk
        delta = detokenizer.step(chunk)
        full = tokenizer.decode(generated, skip)
        assert "\ufffd" not in delta or "\ufffd" in full
        streamed += delta
        if not full.endswith("\ufffd"):
            assert streamed == full
    streamed += detokenizer.flush()
    assert streamed == detokenizer.text == tokenizer.decode(output, skip)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_deferred_ids_come_out_as_stepped_ones(tokenizer, partial_char_ids, data):
    """Ids deferred and caught up at any point give the text id-by-id steps give (an output
    ending inside a character included), and the same whole text once flushed."""
    output = data.draw(st.lists(st.one_of(st.integers(0, tokenizer.vocab_size - 1),
                                          st.sampled_from(partial_char_ids)), max_size=12))
    prompt = tokenizer.encode(data.draw(st.text(max_size=12)))
    skip = data.draw(st.booleans())
    stepped = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    deferred = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    for token_id in output:
        stepped.step([token_id])
        deferred.defer([token_id])
        if data.draw(st.booleans()):
            deferred.catch_up()
            assert deferred.text == stepped.text
    deferred.catch_up()
    assert deferred.text == stepped.text
    assert deferred.flush() == stepped.flush()
    assert deferred.text == tokenizer.decode(output, skip)


def test_a_deferred_output_is_decoded_once_at_its_end(tokenizer, counting):
    detokenizer = IncrementalDetokenizer(counting, tokenizer.encode("The capital of France is"))
    output = tokenizer.encode(" Paris. And a long output" * 20)
    counting.decoded_lengths.clear()
    for token_id in output:
        detokenizer.defer([token_id])
    assert counting.decoded_lengths == []
    detokenizer.flush()
    assert len(counting.decoded_lengths) == 2 and detokenizer.text == tokenizer.decode(output)


def test_forked_detokenizers_continue_independently(tokenizer):
    parent = IncrementalDetokenizer(tokenizer, tokenizer.encode("The capital of France is"))
    parent.step([7042])  # " Paris"
    child = parent.fork()
    parent.step(tokenizer.encode("."))
    child.step(tokenizer.encode("!"))
    assert (parent.text, child.text) == (" Paris.", " Paris!")
    parent.defer(tokenizer.encode(" It"))
    child = parent.fork()
    child.defer(tokenizer.encode(" is"))
    assert (parent.flush(), child.flush()) == (" It", " It is")


def test_detokenizer_decodes_a_small_window_per_token(tokenizer, counting):
    prompt = tokenizer.encode("A long prompt " * 20)
    detokenizer = IncrementalDetokenizer(counting, prompt)
    for token_id in tokenizer.encode(" and a long output" * 100):
        detokenizer.step([token_id])
    assert max(counting.decoded_lengths) <= 6


def test_importing_the_tokenizer_loads_neither_torch_nor_transformers():
    code = (
        "import sys, pagedserve.scheduler_svc.tokenizer; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
