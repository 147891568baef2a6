"""The glue between one engine and its transceiver. Runs on the engine thread only.

Decode side (push mode, the default):
    1) start_remote: reserve the prompt's blocks, ``receive`` them from the prefill peer
    2) the prefill worker's answer brings the first token   → first_token()
    3) the transceiver reports DONE for the request          → poll()
    when both arrived: the engine continues decoding (``remote_prefill_done``).
    The prefill call failed, or the transfer failed: the transfer is ended, the reservation
    freed and the prompt computed here (``remote_prefill_failed``): the client still gets
    its whole answer.

Prefill side:
    a ``hold_kv`` request finishes → ``send`` its blocks → on the transfer's end event the
    blocks are freed (``release_kv``), whatever the outcome.

Blocks are only ever freed on the transceiver's terminal event (see base.py's contract),
so nothing can still be writing into a block that returns to the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter

from kvbridge.transfer.base import Role, TransferError, TransferEvent

if TYPE_CHECKING:
    from kvbridge.engine.engine import LLMEngine
    from kvbridge.engine.request import RequestOutput, SamplingParams
    from kvbridge.transfer.base import KVTransceiver

log = logging.getLogger("kvbridge.connector")

REMOTE_PREFILLS = Counter(
    "kvbridge_remote_prefills", "Decode-side requests by how their prompt was computed", ["outcome"]
)


@dataclass
class _Receiving:
    first: tuple[int, float | None] | None = None  # from the prefill worker's answer
    kv_done: bool = False
    aborted: bool = False  # the client went away
    fallback: bool = False  # the prefill call failed: compute here once the transfer ended
    transfer_seconds: float = 0.0


class KVConnector:
    def __init__(self, engine: LLMEngine, transceiver: KVTransceiver) -> None:
        self.engine = engine
        self.transceiver = transceiver
        self._receiving: dict[str, _Receiving] = {}
        self._sending: set[str] = set()
        self.transfer_seconds: dict[str, float] = {}  # decode side, per finished transfer (for TTFT split)

    @property
    def busy(self) -> bool:
        """Transfers are in flight: keep polling."""
        return bool(self._receiving or self._sending)

    # ------------------------------------------------------------------ decode side
    def start_remote(self, request_id: str, prompt: list[int], params: SamplingParams, peer_address: str) -> bool:
        """Reserve and start receiving. False: not possible now (peer unreachable or refused,
        pool full); the caller queues the request for a local prefill instead."""
        try:
            peer = self.transceiver.connect(peer_address, timeout_s=5.0)
        except TransferError as e:
            log.warning("prefill peer %s: %s; prefilling %s here", peer_address, e, request_id)
            REMOTE_PREFILLS.labels("peer_unreachable").inc()
            return False
        ids = self.engine.reserve_remote_prefill(request_id, prompt, params)
        if ids is None:
            REMOTE_PREFILLS.labels("pool_full").inc()
            return False
        self.transceiver.receive(request_id, peer, ids)
        self._receiving[request_id] = _Receiving()
        return True

    def first_token(self, request_id: str, token: int, logprob: float | None) -> None:
        st = self._receiving.get(request_id)
        if st is None or st.aborted or st.fallback:
            return
        st.first = (token, logprob)
        self._maybe_ready(request_id, st)

    def prefill_failed(self, request_id: str, reason: str) -> None:
        """The prefill worker did not answer: end the transfer, then prefill here."""
        st = self._receiving.get(request_id)
        if st is None or st.aborted:
            return
        log.warning("remote prefill of %s failed (%s); prefilling it here", request_id, reason)
        st.fallback = True
        if st.kv_done:  # the transfer already ended: nothing can touch the blocks
            del self._receiving[request_id]
            REMOTE_PREFILLS.labels("fallback").inc()
            self.engine.remote_prefill_failed(request_id)
        else:
            self.transceiver.abort(request_id)  # the FAILED event frees and falls back

    def abort(self, request_id: str) -> bool:
        """The client went away. True when the connector owns the request's blocks right now
        (they are freed once its transfer has ended); False: the engine may abort it at once."""
        st = self._receiving.get(request_id)
        if st is None:
            return False
        st.aborted = True
        if st.kv_done:
            del self._receiving[request_id]
            self.engine.abort_request(request_id)
        else:
            self.transceiver.abort(request_id)
        return True

    def _maybe_ready(self, request_id: str, st: _Receiving) -> None:
        if st.kv_done and st.first is not None:
            del self._receiving[request_id]
            REMOTE_PREFILLS.labels("remote").inc()
            self.engine.remote_prefill_done(request_id, *st.first)

    # ------------------------------------------------------------------ prefill side
    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.kv_block_ids is not None:
                self._sending.add(out.request_id)
                self.transceiver.send(out.request_id, out.kv_block_ids)

    # ------------------------------------------------------------------ both
    def poll(self) -> None:
        for ev in self.transceiver.poll():
            self._on_event(ev)

    def mid_step_hook(self) -> Callable[[], None] | None:
        """For the next engine step: what to run between its layers so that a peer's
        transfer into or out of our blocks completes during the step, not after it."""
        return self.transceiver.mid_step_hook() if self.busy else None

    def wake(self) -> None:
        """From any thread: end a ``wait`` in progress (the engine has work)."""
        self.transceiver.wake()

    def wait(self, timeout_s: float) -> None:
        """Nothing to compute: sleep in the transceiver until an event or ``timeout_s``."""
        for ev in self.transceiver.wait(timeout_s):
            self._on_event(ev)

    def _on_event(self, ev: TransferEvent) -> None:
        rid = ev.request_id
        if ev.role is Role.SENDER:
            self._sending.discard(rid)
            self.engine.release_kv(rid)
            if not ev.ok:
                log.warning("sending KV of %s failed: %s (%s)", rid, ev.cause.value if ev.cause else "?", ev.message)
            return
        st = self._receiving.get(rid)
        if st is None:
            return
        if ev.ok and not st.aborted and not st.fallback:
            st.kv_done = True
            self.transfer_seconds[rid] = ev.seconds
            self._maybe_ready(rid, st)
            return
        del self._receiving[rid]
        if st.aborted:
            self.engine.abort_request(rid)
        else:
            if not ev.ok:
                log.warning("receiving KV of %s failed: %s (%s); prefilling it here", rid, ev.cause.value if ev.cause else "?", ev.message)
            REMOTE_PREFILLS.labels("fallback").inc()
            self.engine.remote_prefill_failed(rid)

    def close(self) -> None:
        """Abort every transfer and free its blocks (the worker is stopping)."""
        for rid in list(self._receiving):
            self.abort(rid)
        for ev in self.transceiver.wait(2.0, min_events=len(self._receiving) + len(self._sending)) if self.busy else []:
            self._on_event(ev)
