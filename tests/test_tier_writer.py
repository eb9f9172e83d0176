"""BackgroundWriter, the one write queue of a slow tier: bounded in bytes, batches bounded in
bytes, refusals leave nothing queued, close drains until its deadline and hands back what it
dropped, a failing batch is reported and the thread lives on."""
import threading
import time

import pytest

from kvtier.kvstore.tiers.background_writer import BackgroundWriter, WriterLimits


class Recorder:
    """apply_batch for the writer: records batches; `gate` holds a batch (a stuck store)."""

    def __init__(self, gate: threading.Event | None = None, fail_first: int = 0):
        self.gate, self.fail_first = gate, fail_first
        self.batches: list[list] = []
        self.errors: list[tuple[list, BaseException]] = []
        self.entered = threading.Event()

    def apply(self, batch):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_first > 0:
            self.fail_first -= 1
            raise OSError("disk on fire")
        self.batches.append(batch)

    def on_error(self, batch, error):
        self.errors.append((batch, error))


def writer(rec: Recorder, **limits) -> BackgroundWriter:
    return BackgroundWriter(rec.apply, rec.on_error, WriterLimits(**limits))


def test_queue_is_bounded_in_bytes_and_a_refusal_queues_nothing():
    gate = threading.Event()
    rec = Recorder(gate)
    w = writer(rec, queue_bytes=3000)
    try:
        assert w.submit("first", 1000)
        assert rec.entered.wait(5)  # taken by the thread, which is now stuck
        assert [w.submit(i, 1000) for i in range(4)] == [True, True, True, False]
        assert w.queued_bytes() == 3000 and w.room() == 0
        assert not w.submit("small", 1)  # full is full, whatever the size
        assert not w.flush(timeout=0.05)
        gate.set()
        assert w.flush(timeout=5)
        assert [x for b in rec.batches for x in b] == ["first", 0, 1, 2]
    finally:
        gate.set()
        w.close(5)


def test_an_item_larger_than_the_queue_goes_into_an_empty_queue():
    rec = Recorder()
    w = writer(rec, queue_bytes=100)
    try:
        assert w.submit("huge", 10_000)
        assert w.flush(timeout=5) and rec.batches == [["huge"]]
    finally:
        w.close(5)


def test_batches_are_bounded_in_bytes():
    gate = threading.Event()
    rec = Recorder(gate)
    w = writer(rec, queue_bytes=10_000, batch_bytes=2500)
    try:
        w.submit("first", 1)
        assert rec.entered.wait(5)
        for i in range(5):
            assert w.submit(i, 1000)
        gate.set()
        assert w.flush(timeout=5)
        assert rec.batches == [["first"], [0, 1], [2, 3], [4]]
    finally:
        gate.set()
        w.close(5)


def test_close_drains_everything_queued_within_the_deadline():
    rec = Recorder()
    rec.apply = lambda batch: (time.sleep(0.02), rec.batches.append(batch))
    w = writer(rec, queue_bytes=1 << 20, batch_bytes=1)  # one item per batch: several batches
    for i in range(10):
        assert w.submit(i, 1)
    start = time.monotonic()
    assert w.close(timeout=5) == []
    assert time.monotonic() - start < 5
    assert [x for b in rec.batches for x in b] == list(range(10))
    assert not w.submit("late", 1)  # closed: refused


def test_close_drops_and_returns_what_a_stuck_store_leaves_at_the_deadline():
    gate = threading.Event()
    rec = Recorder(gate)
    w = writer(rec, queue_bytes=1 << 20, close_timeout_s=0.2)
    try:
        w.submit("stuck", 1)
        assert rec.entered.wait(5)
        w.submit("a", 1)
        w.submit("b", 1)
        start = time.monotonic()
        assert w.close() == ["a", "b"]  # the limits' deadline
        assert time.monotonic() - start < 1.5
        assert w.queued_bytes() == 0
    finally:
        gate.set()


def test_a_failing_batch_is_reported_and_the_thread_keeps_going():
    rec = Recorder(fail_first=1)
    w = writer(rec)
    try:
        w.submit("lost", 1)
        assert w.flush(timeout=5)
        w.submit("kept", 1)
        assert w.flush(timeout=5)
        assert [(b, type(e)) for b, e in rec.errors] == [(["lost"], OSError)]
        assert rec.batches == [["kept"]]
    finally:
        w.close(5)


@pytest.mark.parametrize("limits, message", [
    (dict(queue_bytes=0), "queue_bytes"),
    (dict(batch_bytes=-1), "batch_bytes"),
    (dict(close_timeout_s=-0.5), "close_timeout_s"),
])
def test_limits_are_validated_once(limits, message):
    with pytest.raises(ValueError, match=message):
        WriterLimits(**limits)
