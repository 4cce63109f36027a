"""Wire protocol, sampling params and config: round trips and errors that name the field."""
import msgpack
import numpy as np
import pytest

from pagedserve.common import protocol as p
from pagedserve.common.config import ExecutorConfig, SchedulerConfig
from pagedserve.common.sampling import SamplingParams


def test_plan_round_trips_with_int_arrays_as_packed_int32():
    plan = p.StepPlan(step=7, removed=[3], seq_ids=[1, 2], num_tokens=[5, 1], block_appends=[2, 9],
                      new_seqs=[p.NewSeq(seq_id=1, token_ids=[10, 11, 12, 13, 14],
                                         block_table=[4], params=SamplingParams().to_dict())])
    raw = msgpack.unpackb(p.encode(plan))
    assert raw["v"] == p.PROTOCOL_VERSION and raw["type"] == "step"
    assert raw["seq_ids"] == np.array([1, 2], dtype="<i4").tobytes()
    back = p.decode(p.encode(plan))
    assert back.seq_ids.tolist() == [1, 2]
    assert back.new_seqs[0].token_ids.tolist() == [10, 11, 12, 13, 14]
    assert back.new_seqs[0].params == SamplingParams().to_dict()


def test_pure_decode_step_costs_eight_bytes_per_sequence():
    def size(n):
        return len(p.encode(p.StepPlan(step=1, removed=[], new_seqs=[], seq_ids=list(range(n)),
                                       num_tokens=[1] * n, block_appends=[])))
    assert (size(256) - size(0)) / 256 < 8.05  # two int32s, plus msgpack length headers


def test_result_round_trips_floats_and_top_logprobs():
    result = p.StepResult(step=1, seq_ids=[4], token_ids=[9], logprobs=np.array([-0.5]),
                          top_logprobs=[p.TopLogprobs(seq_id=4, token_ids=[9, 3],
                                                      logprobs=np.array([-0.5, -1.25]))])
    back = p.decode(p.encode(result))
    assert back.logprobs.dtype == np.float32 and back.logprobs.tolist() == [-0.5]
    assert back.top_logprobs[0].logprobs.tolist() == [-0.5, -1.25]


@pytest.mark.parametrize("raw, message", [
    (msgpack.packb({"v": 1, "type": "abort"}), "missing field 'request_id' in 'abort'"),
    (msgpack.packb({"v": 1, "type": "abort", "request_id": 3}), "'abort.request_id' must be str"),
    (msgpack.packb({"v": 0, "type": "abort", "request_id": "x"}), "unsupported protocol version 0"),
    (msgpack.packb({"v": 1, "type": "step", "step": 1, "removed": b"\x00", "new_seqs": [],
                    "seq_ids": b"", "num_tokens": b"", "block_appends": b""}), "step.removed"),
    (msgpack.packb({"v": 1, "type": "step", "step": 1, "removed": b"", "seq_ids": b"",
                    "num_tokens": b"", "block_appends": b"", "new_seqs": [{"seq_id": 1}]}),
     "missing field 'token_ids' in 'step.new_seqs[0]'"),
    (msgpack.packb({"v": 1, "type": "output", "request_id": "r", "finished": False, "outputs": [
        {"index": 0, "text": "", "token_ids": b"", "cumulative_logprob": 0,
         "logprobs": [{5: [-0.5, 1, "a"]}, {7: [-0.5, "1", "b"]}]}]}),
     "'output.outputs[0].logprobs[1][7].rank' must be int, got str '1'"),
    (msgpack.packb({"v": 1, "type": "output", "request_id": "r", "finished": True, "outputs": [
        {"index": 0, "text": "", "token_ids": b"", "cumulative_logprob": -1.5,
         "stop_reason": 2.5}]}), "'output.outputs[0].stop_reason' must be int"),
])
def test_invalid_messages_name_the_bad_field(raw, message):
    with pytest.raises(p.ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        p.decode(raw)


def test_decode_accepts_only_the_expected_types():
    with pytest.raises(p.ProtocolError, match="expected one of"):
        p.decode(p.encode(p.Heartbeat()), (p.GenerateRequest, p.AbortRequest))


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"), ({"n": 0}, "n"),
    ({"stop": [""]}, "stop"), ({"logprobs": 21}, "logprobs"), ({"seed": -1}, "seed"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"best_of": 1, "n": 2}, "best_of"),
])
def test_sampling_params_reject_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.from_dict({"temprature": 0.5})
    assert SamplingParams.from_dict({"stop": "x", "top_k": -1}).stop == ["x"]


@pytest.mark.parametrize("make, field", [
    (lambda: SchedulerConfig(block_size=12), "block_size"),
    (lambda: SchedulerConfig(client_port=70000), "client_port"),
    (lambda: SchedulerConfig(max_num_seqs=0), "max_num_seqs"),
    (lambda: ExecutorConfig(device="tpu"), "device"),
    (lambda: ExecutorConfig(kv_cache_gb=1.0, num_device_blocks=10), "kv_cache_gb"),
    (lambda: ExecutorConfig(dtype="int8"), "dtype"),
    (lambda: ExecutorConfig(kv_cache_dtype="fp8"), "kv_cache_dtype"),
])
def test_configs_are_validated_at_construction(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_a_step_sends_one_message_per_client_with_each_requests_outputs_in_order():
    from types import SimpleNamespace

    from pagedserve.scheduler_svc.client_link import ClientLink

    class Socket:
        def __init__(self):
            self.sent = []

        def send_multipart(self, frames):
            self.sent.append((frames[0], p.decode(frames[1])))

    class Frontend:
        def output(self, request):
            return p.RequestOutputMsg(request_id=request.request_id, finished=request.is_finished,
                                      outputs=[])

    def request(client, request_id, stream=True, finished=False):
        return SimpleNamespace(client=client, request_id=request_id, stream=stream,
                               is_finished=finished, seqs=[], num_generated=1)

    sock = Socket()
    link = ClientLink(sock, Frontend(), engine=None, config=SchedulerConfig(),
                      model_info=lambda request_id: None)
    link.send_outputs([request(b"a", "a1"), request(b"b", "b1"), request(b"a", "a2"),
                       request(b"a", "a3", stream=False), request(b"b", "b2", finished=True)])
    (to_a, batch_a), (to_b, batch_b) = sock.sent
    assert to_a == b"a" and isinstance(batch_a, p.OutputBatch)
    assert [m.request_id for m in batch_a.outputs] == ["a1", "a2"]  # a3 waits for its end
    assert isinstance(batch_a.outputs[0], p.RequestOutputMsg)
    assert to_b == b"b" and [m.request_id for m in batch_b.outputs] == ["b1", "b2"]
    assert batch_b.outputs[1].finished
    link.send_outputs([request(b"a", "a4")])
    assert isinstance(sock.sent[-1][1], p.RequestOutputMsg)  # one output: no batch around it


@pytest.mark.parametrize("values", [[], [7], [0, -1, 2**31 - 1, -2**31], [1.5, 2], [True]])
def test_int_lists_pack_as_numpy_packs_them(values):
    """A list packs through ``array``, an array through numpy: the same bytes either way."""
    delta = p.CompletionDelta(index=0, text="", token_ids=values, cumulative_logprob=0.0)
    wire = msgpack.unpackb(p.encode(p.RequestOutputMsg("r", [delta], finished=False)))
    assert wire["outputs"][0]["token_ids"] == np.asarray(values, "<i4").tobytes()


def test_float_lists_pack_as_numpy_packs_them_and_out_of_range_ints_are_refused():
    result = p.StepResult(step=1, seq_ids=[1, 2], token_ids=[3, 4], logprobs=[-0.5, 1e40])
    assert p.decode(p.encode(result)).logprobs.tolist() == [-0.5, float("inf")]
    with pytest.raises(OverflowError):
        p.encode(p.StepResult(step=1, seq_ids=[2**40], token_ids=[3], logprobs=[0.0]))


def test_nested_messages_and_optional_fields_round_trip():
    top = p.TopLogprobs(seq_id=3, token_ids=[5, 6], logprobs=[-0.1, -2.0], sampled_rank=1)
    result = p.StepResult(step=2, seq_ids=np.array([3], np.int32), token_ids=[5],
                          logprobs=[-0.1], top_logprobs=[top])
    back = p.decode(p.encode(result))
    assert back.top_logprobs[0].token_ids.tolist() == [5, 6] and back.step == 2
    msg = p.RequestOutputMsg("r", [p.CompletionDelta(0, "a", [1], -1.0, "stop", " end",
                                                     [{1: p.Logprob(-1.0, 1, "a")}])],
                             finished=True, prompt_token_ids=[4, 5], prompt="x",
                             prompt_logprobs=[None, {5: p.Logprob(-2.0, 3, "b")}])
    back = p.decode(p.encode(msg))
    assert back.outputs[0].stop_reason == " end" and back.outputs[0].logprobs == [
        {1: p.Logprob(-1.0, 1, "a")}]
    assert back.prompt_token_ids.tolist() == [4, 5] and back.prompt_logprobs == [
        None, {5: p.Logprob(-2.0, 3, "b")}]
