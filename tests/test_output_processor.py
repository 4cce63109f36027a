"""Stop conditions and streamed deltas on the scheduler side, with SmolLM2's tokenizer."""
import numpy as np
import pytest

from pagedserve.common.protocol import Logprob, TopLogprobs
from pagedserve.common.sampling import SamplingParams
from pagedserve.scheduler_svc.beam_search import Hypothesis
from pagedserve.scheduler_svc.output_processor import DeltaTracker, OutputProcessor
from pagedserve.scheduler_svc.sequence import Request, Sequence
from pagedserve.scheduler_svc.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return Tokenizer.from_model_dir(smollm2_dir)


def started(tokenizer, prompt=(504,), max_model_len=8192, stream=False, **params):
    """A processor, and the started sequence of a one-sequence request with ``params``."""
    processor = OutputProcessor(tokenizer, lambda: max_model_len)
    request = Request("r", b"c", SamplingParams(**params), list(prompt), stream=stream)
    seq = Sequence(0, request.prompt_token_ids, request)
    request.seqs.append(seq)
    processor.start(seq)
    return processor, seq


def feed(tokenizer, text, max_model_len=8192, **params):
    """Stream ``text``'s tokens through the processor; returns (seq, deltas sent, reason)."""
    processor, seq = started(tokenizer, [504, 3575], max_model_len, stream=True, **params)
    tracker, sent, reason = DeltaTracker(seq.request, tokenizer), [], None
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
    for ignore_eos, expected in ((False, ("stop", None)), (True, None)):
        processor, seq = started(tokenizer, ignore_eos=ignore_eos)
        assert processor.append(seq, eos, 0.0, None) == expected


def test_max_tokens_and_context_end_with_length(tokenizer):
    _, _, reason = feed(tokenizer, " one two three four five", max_tokens=3)
    assert reason == ("length", None)
    seq, _, reason = feed(tokenizer, " one two three four five", max_model_len=4)
    assert reason == ("length", None) and seq.num_tokens == 4


def top(token_ids, logprobs, sampled_rank):
    return TopLogprobs(seq_id=0, token_ids=np.array(token_ids), logprobs=np.array(logprobs),
                       sampled_rank=sampled_rank)


def test_logprobs_are_vllms_the_sampled_token_first_with_rank_and_text(tokenizer):
    processor, seq = started(tokenizer, logprobs=1)
    processor.append(seq, 7042, -0.25, top([9], [-0.125], sampled_rank=2))
    processor.append(seq, 30, -0.5, top([30], [-0.5], sampled_rank=1))
    assert seq.cumulative_logprob == -0.75
    logprobs = DeltaTracker(seq.request, tokenizer).deltas()[0].logprobs
    first = tokenizer.token_texts([9])[0]
    assert logprobs == [{7042: Logprob(-0.25, 2, " Paris"), 9: Logprob(-0.125, 1, first)},
                        {30: Logprob(-0.5, 1, ".")}]
    assert [list(position) for position in logprobs] == [[7042, 9], [30]]


def test_logprobs_0_returns_the_sampled_token_alone(tokenizer):
    processor, seq = started(tokenizer, logprobs=0)
    processor.append(seq, 7042, -0.25, top([], [], sampled_rank=3))
    assert DeltaTracker(seq.request, tokenizer).deltas()[0].logprobs == [
        {7042: Logprob(-0.25, 3, " Paris")}]


def test_the_earliest_stop_string_wins_and_none_is_returned(tokenizer):
    # " Paris" is one token: "is" and "Pa" both end in it, "Pa" first.
    seq, sent, reason = feed(tokenizer, " Paris is", stop=["is", "Pa"])
    assert reason == ("stop", "Pa")
    assert seq.output_text == "".join(sent) == " "
    seq, _, reason = feed(tokenizer, " Paris is", stop=["Par", "Pa", "ris"])
    assert reason == ("stop", "Pa") and seq.output_text == " "  # the shortest, at one start


def test_include_stop_str_in_output_keeps_the_stop_string_and_the_stop_token(tokenizer):
    seq, sent, reason = feed(tokenizer, " Paris is lovely. The end of it all",
                             stop=["The end"], include_stop_str_in_output=True)
    assert reason == ("stop", "The end")
    assert seq.output_text == "".join(sent) == " Paris is lovely. The end"
    newline = tokenizer.encode("\n")[0]
    for include, text in ((False, " Paris."), (True, " Paris.\n")):
        seq, _, reason = feed(tokenizer, " Paris.\nThe end", stop_token_ids=[newline],
                              include_stop_str_in_output=include)
        assert reason == ("stop", newline) and seq.output_text == text


def test_min_tokens_holds_back_every_stop_until_reached(tokenizer):
    # "t" ends the text only in the third token; "two", in the second, may not stop it
    seq, _, reason = feed(tokenizer, " one two three four", stop=["two", "t"], min_tokens=2)
    assert reason == ("stop", "t") and seq.output_text == " one two "
    newline = tokenizer.encode("\n")[0]
    seq, _, reason = feed(tokenizer, " a\n b\n c", stop_token_ids=[newline], min_tokens=2)
    assert reason == ("stop", newline) and seq.output_text == " a\n b"  # the second newline


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_in_the_text_only_without_skip_special_tokens(tokenizer, skip):
    seq, sent, _ = feed(tokenizer, " Hi<|im_start|>user", skip_special_tokens=skip)
    assert "".join(sent) == seq.output_text
    assert seq.output_text == (" Hiuser" if skip else " Hi<|im_start|>user")


def beam_request(tokenizer, **params):
    request = Request("r", b"c", SamplingParams(beam_width=2, **params), [504], stream=False)
    request.beam = OutputProcessor(tokenizer, lambda: 8192).beam_search(request)
    return request


@pytest.mark.parametrize("logprobs, expected", [
    (None, None), (0, {7042: (-1.0, 2)}), (1, {7042: (-1.0, 2), 9: (-0.5, 1)})])
def test_a_beams_logprobs_rank_its_token_among_the_candidates(tokenizer, logprobs, expected):
    request = beam_request(tokenizer, logprobs=logprobs)
    beam = Sequence(0, [504], request)
    beam.candidates = [(9, -0.5), (7042, -1.0), (30, -2.0)]
    assert request.beam.position_logprobs(beam, 7042, -1.0) == expected


@pytest.mark.parametrize("include, text", [(False, " Paris"), (True, " Paris\n")])
def test_a_hypothesis_ending_on_a_stop_token_leaves_it_out_of_the_text(tokenizer, include,
                                                                      text):
    request = beam_request(tokenizer, stop_token_ids=[198], include_stop_str_in_output=include)
    request.beam.hypotheses = [Hypothesis([7042, 198], -1.0, -0.5, "stop", [])]
    request.beam.done = True
    delta = DeltaTracker(request, tokenizer).deltas()[0]
    assert (delta.text, delta.stop_reason, delta.token_ids) == (text, 198, [7042, 198])


@pytest.mark.parametrize("params, cut", [
    ({"max_tokens": 3}, 8), ({"max_tokens": 4}, 8), ({"stop_token_ids": [198]}, 8),
    ({"stop_token_ids": [198], "include_stop_str_in_output": True}, 8),
    ({"skip_special_tokens": False}, 8), ({}, 3), ({}, 2), ({}, 5)])
def test_an_output_read_only_at_its_end_has_the_streamed_text(tokenizer, params, cut):
    """A request that neither streams nor stops on strings defers its text to the end; it
    comes out as a streamed one's, whether it ends (length, stop token) or is aborted after
    ``cut`` tokens, inside the emoji's three tokens too."""
    text_ids = tokenizer.encode(" Paris 🎉<|im_start|> done\n more")  # 8 tokens
    outputs = []
    for stream in (True, False):
        processor, seq = started(tokenizer, stream=stream, **params)
        tracker, reason = DeltaTracker(seq.request, tokenizer), None
        for token in text_ids[:cut]:
            reason = processor.append(seq, token, -0.5, None)
            if reason:
                break
        seq.finish(*(reason or ("abort",)))
        outputs.append((reason, tracker.deltas()[0].text, seq.output_text))
    assert outputs[0] == outputs[1]
