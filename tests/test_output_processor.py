"""Stop conditions and streamed deltas on the scheduler side, with SmolLM2's tokenizer."""
import pytest

from pagedserve.common.sampling import SamplingParams
from pagedserve.scheduler_svc.output_processor import DeltaTracker, OutputProcessor
from pagedserve.scheduler_svc.sequence import Request, Sequence
from pagedserve.scheduler_svc.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_model_dir(smollm2_dir)


def feed(tokenizer, text, max_model_len=8192, **params):
    """Stream ``text``'s tokens through the processor; returns (seq, deltas sent, reason)."""
    processor = OutputProcessor(tokenizer, lambda: max_model_len)
    request = Request("r", b"c", SamplingParams(**params), [504, 3575], stream=True)
    seq = Sequence(0, request.prompt_token_ids, request)
    request.seqs.append(seq)
    processor.start(seq)
    tracker, sent, reason = DeltaTracker(request, processor.tokenizer), [], None
    for token in tokenizer.encode(text):
        reason = processor.append(seq, token, -0.5, None)
        if reason:
            seq.finish(*reason)
        sent.append(tracker.deltas()[0].text)
        if reason:
            break
    return seq, sent, reason


def test_stop_string_across_tokens_is_cut_and_never_streamed(tokenizer):
    seq, sent, reason = feed(tokenizer, " Paris is lovely. The end of it all", max_tokens=50,
                             stop=["The end"])
    assert reason == ("stop", "The end")
    assert seq.output_text == " Paris is lovely. "
    assert "".join(sent) == seq.output_text


def test_eos_stops_unless_ignored(tokenizer):
    eos = next(iter(tokenizer.eos_token_ids))
    processor = OutputProcessor(tokenizer, lambda: 8192)
    for ignore_eos, expected in ((False, ("stop", None)), (True, None)):
        request = Request("r", b"c", SamplingParams(ignore_eos=ignore_eos), [504], stream=False)
        seq = Sequence(0, [504], request)
        processor.start(seq)
        assert processor.append(seq, eos, 0.0, None) == expected


def test_max_tokens_and_context_end_with_length(tokenizer):
    _, _, reason = feed(tokenizer, " one two three four five", max_tokens=3)
    assert reason == ("length", None)
    seq, _, reason = feed(tokenizer, " one two three four five", max_model_len=4)
    assert reason == ("length", None) and seq.num_tokens == 4


def test_cumulative_logprob_and_top_logprobs_recorded(tokenizer):
    processor = OutputProcessor(tokenizer, lambda: 8192)
    request = Request("r", b"c", SamplingParams(logprobs=1), [504], stream=False)
    seq = Sequence(0, [504], request)
    processor.start(seq)
    processor.append(seq, 7042, -0.25, {9: -0.1})
    processor.append(seq, 30, -0.5, {30: -0.5})
    assert seq.cumulative_logprob == -0.75
    assert seq.logprobs == [{9: -0.1, 7042: -0.25}, {30: -0.5}]
