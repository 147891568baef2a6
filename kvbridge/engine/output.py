"""Per-request output: incremental detokenization and stop conditions.

Token-level stops (EOS, stop token ids, max_tokens, context length) are checked on ids;
stop strings on the detokenized text. While a request runs, the last ``len(stop) - 1``
characters are held back so a stop string split across steps is never streamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvbridge.engine.request import FinishReason, Request, RequestOutput


@dataclass
class OutputState:
    detok: object  # IncrementalDetokenizer: add(ids) -> str
    text: str = ""
    sent: int = 0
    holdback: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[float] = field(default_factory=list)


def token_stop(req: Request, token: int, max_model_len: int) -> FinishReason | None:
    p = req.params
    if not p.ignore_eos and token in req.eos_token_ids:
        return FinishReason.STOP
    if token in p.stop_token_ids:
        return FinishReason.STOP
    if req.num_output_tokens >= p.max_tokens or req.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None


def emit(req: Request, st: OutputState, new_ids: list[int], logprobs: list[float | None], reason: FinishReason | None) -> RequestOutput:
    """Detokenize ``new_ids`` and build the delta. A stop string found in the text turns
    the request finished (reason STOP) and cuts the text before it."""
    hidden = reason == FinishReason.STOP and new_ids and new_ids[-1] in req.eos_token_ids | set(req.params.stop_token_ids)
    visible = new_ids[:-1] if hidden else new_ids
    before = len(st.text)
    if visible:
        st.text += st.detok.add(visible)  # type: ignore[attr-defined]
    if reason is not None:
        st.text += st.detok.flush()  # type: ignore[attr-defined]  # an unfinished character, as decode() shows it
    if req.params.stop and reason != FinishReason.ABORT:
        start = max(0, before - max(len(s) for s in req.params.stop) + 1)
        hits = [(i, s) for s in req.params.stop if (i := st.text.find(s, start)) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            st.text = st.text[:cut]
            reason = FinishReason.STOP
    finished = reason is not None
    end = len(st.text) if finished else max(st.sent, len(st.text) - st.holdback)
    delta = st.text[st.sent : end]
    st.sent = end
    lps = [lp for lp in logprobs[: len(visible)] if lp is not None] if req.params.logprobs else None
    return RequestOutput(
        request_id=req.request_id,
        new_token_ids=list(new_ids),
        new_text=delta,
        finished=finished,
        finish_reason=reason,
        num_prompt_tokens=req.num_prompt_tokens,
        num_output_tokens=req.num_output_tokens,
        num_cached_tokens=req.num_cached_tokens,
        new_logprobs=lps,
    )
