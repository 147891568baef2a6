"""Frontend ↔ worker messages: round trips, one serializer, versions refused in one line."""

from __future__ import annotations

import pytest

from kvbridge.engine.request import FinishReason, RequestOutput, SamplingParams
from kvbridge.serving.messages import (
    Delta,
    GenerateRequest,
    PrefillMode,
    PrefillTarget,
    ProtocolError,
    Sampling,
    Timings,
    decode,
    encode,
    encode_line,
)


def test_generate_request_round_trip_keeps_sampling():
    p = SamplingParams(max_tokens=7, temperature=0, stop=["\n"], seed=3, logprobs=True)
    req = GenerateRequest(
        request_id="r1", prompt_token_ids=[1, 2, 3], sampling=Sampling.of(p),
        prefill=PrefillTarget(worker_id="prefill-0", url="http://127.0.0.1:1", bootstrap="127.0.0.1:2"),
    )  # fmt: skip
    back = decode(encode(req), GenerateRequest)
    assert back == req and back.sampling.params() == p
    assert back.sampling.params(max_tokens=1).max_tokens == 1


def test_delta_carries_a_request_output_and_the_first_token_facts():
    out = RequestOutput("r1", [5], "hi", finished=True, finish_reason=FinishReason.LENGTH, num_prompt_tokens=3,
                        num_output_tokens=1, new_logprobs=[-0.5])  # fmt: skip
    d = Delta.of(out, prefill_mode=PrefillMode.FALLBACK, failed_prefill_worker="prefill-0", timings=Timings(queue=0.1))
    line = encode_line(d)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = decode(line, Delta)
    assert back.output() == out
    assert back.prefill_mode is PrefillMode.FALLBACK and back.failed_prefill_worker == "prefill-0"


def test_other_versions_and_garbage_are_refused_in_one_line():
    data = encode(Delta(request_id="r", token_ids=[], text="", v=2))
    with pytest.raises(ProtocolError, match="protocol version 2; this kvbridge speaks 1"):
        decode(data, Delta)
    with pytest.raises(ProtocolError, match="undecodable Delta"):
        decode(b"{not json", Delta)
