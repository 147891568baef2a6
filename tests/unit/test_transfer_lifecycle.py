"""The transport-independent request life (lifecycle.py), driven message by message with a
fake clock and a transport that only records what it would send."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvbridge.config import CacheTransceiverConfig
from kvbridge.engine.kv_cache import KVCache, KVLayout
from kvbridge.transfer import lifecycle
from kvbridge.transfer.base import Msg, WriteDone, WriteStarted


class RecordingTransceiver(lifecycle.LifecycleTransceiver):
    """The shared state machine with a transport that records messages and moves nothing."""

    backend_name = "fake"

    def __init__(self, mode: str) -> None:
        kv = KVCache(KVLayout(2, 8, 16, 2, 64, "float16"))
        super().__init__(kv, CacheTransceiverConfig(backend="NIXL", transfer_mode=mode), model_id="m")
        self._init_lifecycle()
        self.sent: list[tuple[str, Msg]] = []
        self._peers["prefill"] = SimpleNamespace(alive=True, info=SimpleNamespace(agent_name="prefill", num_blocks=8))

    def _notify(self, peer: str, msg: Msg) -> None:
        self.sent.append((peer, msg))

    def poll(self):  # the tests call _begin_poll and _on_msg themselves; this hands out the events
        out, self._events = self._events, []
        return out

    def wait(self, timeout_s: float, min_events: int = 1):
        return self.poll()

    def close(self) -> None:
        pass


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(lifecycle, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


def test_push_receiver_does_not_count_an_engine_step_as_transfer_time(clock):
    t = RecordingTransceiver("push")
    t.receive("r1", "prefill", [1, 2])
    assert [type(m).__name__ for _, m in t.sent] == ["ReceiveRequest"]
    t._begin_poll(clock[0])
    t._on_msg("prefill", WriteStarted(request_id="r1"))  # the transfer starts at 100.0
    clock[0] = 100.002
    t._begin_poll(clock[0])  # a poll that finds nothing new
    clock[0] = 100.502  # then a 500 ms engine step, while WriteDone lands
    t._begin_poll(clock[0])
    t._on_msg("prefill", WriteDone(request_id="r1", checksums=[], block_runs=[]))
    (ev,) = t.poll()
    assert ev.ok and ev.block_ids == (1, 2)
    assert ev.seconds == pytest.approx(0.002)  # landed after the 100.002 poll began: not 0.502


def test_push_receiver_taking_both_messages_in_one_poll_counts_no_step(clock):
    t = RecordingTransceiver("push")
    t.receive("r2", "prefill", [3])
    t._begin_poll(clock[0])
    clock[0] = 101.0  # a 1 s step; both messages landed during it
    t._begin_poll(clock[0])
    t._on_msg("prefill", WriteStarted(request_id="r2"))
    t._on_msg("prefill", WriteDone(request_id="r2", checksums=[], block_runs=[]))
    (ev,) = t.poll()
    assert ev.ok and ev.seconds == pytest.approx(0.0)


def test_nudges_only_a_peer_that_had_no_message_for_a_while(monkeypatch):
    """A peer polls quickly for HOT_S after each message it takes: a message sent within
    NUDGE_EVERY_S of the one before needs no wake-up byte, however long the traffic runs."""
    from kvbridge.transfer import handshake, waiting

    assert handshake.NUDGE_EVERY_S < waiting.HOT_S
    now = [50.0]
    monkeypatch.setattr(handshake, "time", SimpleNamespace(monotonic=lambda: now[0]))
    server = handshake.BootstrapServer("127.0.0.1", 0, "", lambda: None, lambda _: None, lambda _: None)
    sent: list[bytes] = []
    server._socks["decode"] = SimpleNamespace(send=sent.append)
    try:
        step = handshake.NUDGE_EVERY_S * 0.75
        for _ in range(10):  # back-to-back transfers, 10 messages: one wake-up
            server.nudge("decode")
            now[0] += step
        assert sent == [b"!"]
        now[0] += handshake.NUDGE_EVERY_S  # quiet for longer than that: the peer may sleep
        server.nudge("decode")
        assert sent == [b"!", b"!"]
        server.nudge("prefill")  # no liveness connection yet: no wake-up went with this message
        late: list[bytes] = []
        server._socks["prefill"] = SimpleNamespace(send=late.append)
        server.nudge("prefill")
        assert late == [b"!"]
    finally:
        server.close()


def test_wait_hands_out_events_already_ended_without_another_poll(clock):
    """A push send whose copy completed inside the call has its event before ``wait``:
    ``wait`` returns it, counted in the metrics, without polling the transport again."""
    from kvbridge.transfer.stats import STATS
    from kvbridge.transfer.waiting import WaitLoop

    t = RecordingTransceiver("push")
    t.receive("r3", "prefill", [4, 5])
    t._begin_poll(clock[0])
    t._on_msg("prefill", WriteStarted(request_id="r3"))
    t._on_msg("prefill", WriteDone(request_id="r3", checksums=[], block_runs=[]))
    before = STATS._cells[("fake", "receiver")].num_bytes if ("fake", "receiver") in STATS._cells else 0

    def no_poll():
        raise AssertionError("polled although the event was there")

    t.poll = no_poll
    (ev,) = WaitLoop.wait(t, 1.0)
    assert ev.ok and ev.request_id == "r3" and t._events == []
    assert STATS._cells[("fake", "receiver")].num_bytes - before == ev.num_bytes > 0
    with pytest.raises(AssertionError, match="polled"):  # nothing ended: it polls as before
        WaitLoop.wait(t, 1.0)


def test_malformed_block_ids_from_a_peer_end_the_request_clearly(clock):
    """A ReceiveRequest whose packed ids do not parse is answered with an Abort; a
    BlocksReady with such ids fails the receiver's request (BACKEND), never a hang."""
    from kvbridge.transfer.base import Abort, BlocksReady, FailureCause, ReceiveRequest

    t = RecordingTransceiver("pull")
    t._on_msg("prefill", ReceiveRequest(request_id="bad", block_runs=[1]))
    assert [(type(m).__name__, m.cause) for _, m in t.sent] == [("Abort", "backend")]
    assert "bad" not in t._asked
    t.receive("r4", "prefill", [1, 2])
    t._on_msg("prefill", BlocksReady(request_id="r4", block_runs=[0, 0], checksums=[]))
    (ev,) = t.poll()
    assert not ev.ok and ev.cause is FailureCause.BACKEND and "malformed" in ev.message
    assert isinstance(t.sent[-1][1], Abort) and t.sent[-1][1].request_id == "r4"  # the peer frees its blocks
    assert t.num_pending == 0
