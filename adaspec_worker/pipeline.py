"""The worker's shard pipeline: three threads, so that the next shard's rows are read and tokenized, and the
last shard's files written, while the device decodes.

    submit(item) -> Ticket: `decoded` (the device stage is done) and `done` (write's result)
    read stage   (reader thread):  read(item) -> prepared              input rows, tokenization
    device stage (device thread):  decode(item, prepared) -> decoded    everything that touches the model
    write stage  (writer thread):  write(item, decoded) -> result       the commit

Every stage takes items in the order they were submitted, one at a time. A stage that raises fails that
item's futures with its exception and the item goes no further: its later stages never run (a shard whose
decode failed is never written; one whose write failed has no commit marker, so it is decoded again whole),
and the items behind it carry on. The writer writes one item at a time from start to end, so whatever order
`write` keeps inside an item (a shard's files, then its marker) holds across items too.

The device stage may instead be a *stream* (`stream=`): a generator over a `Feed` that takes items when it has
room for them (`feed.take(wait)`) and hands each back, in the order taken, with its decoded value (or
`Failed(error)`, that item's failure alone), so one item may start decoding before the one before it is done
(the worker's shards share the engine's slots). Items reach the writer in the order taken. If the stream
raises, every item it had taken and not handed back fails with that exception (they were in the engine; none
is lost, none written twice) and a new stream starts with the items behind them. A plain `decode` function is
the stream that takes one item, decodes it and hands it back.

`on_device(fn)` runs a function on the device thread and returns its result: model load, warm-up, compile
and graph capture belong to the thread that later decodes (CUDA graphs and compiled graphs are recorded
per thread). `close()` lets the items in flight finish and stops the threads.

Knows nothing of shards, models, Ray or storage.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

_STOP = object()


@dataclass
class Ticket:
    """An item's progress: `decoded` resolves (to None) once the device stage is done with it, `done` to what
    `write` returned; a failed stage's exception fails both (or only `done`, when the write failed)."""

    decoded: Future
    done: Future


@dataclass
class Item:
    """What a stream takes from its feed: the submitted payload, and what the read stage made of it."""

    payload: Any
    ticket: Ticket
    value: Any = None  # what the last stage handed on


@dataclass
class Failed:
    """What a stream hands back for an item whose decoding failed (that item's failure alone)."""

    error: BaseException


class Feed:
    """The items queued for the device stage, as a stream takes them: until a call to run on the device thread
    (`on_device`) or `close` comes next, which ends the stream (`ended`) once it has handed back what it took."""

    def __init__(self, inbox: queue.Queue):
        self._inbox = inbox
        self.taken: list[Item] = []  # taken and not yet handed back, in order
        self.barrier: Any = None  # the _Call or _STOP that ended this feed
        self.ended = False

    def take(self, wait: bool) -> Item | None:
        """The next item; None when there is none now (wait=False) or no more for this stream (`ended`)."""
        if self.ended:
            return None
        try:
            item = self._inbox.get() if wait else self._inbox.get_nowait()
        except queue.Empty:
            return None
        if not isinstance(item, Item):
            self.barrier, self.ended = item, True
            return None
        self.taken.append(item)
        return item


@dataclass
class _Call:
    """A function to run on the device thread between items."""

    fn: Callable[[], Any]
    future: Future


class Pipeline:
    def __init__(
        self,
        read: Callable[[Any], Any],
        decode: Callable[[Any, Any], Any] | None,
        write: Callable[[Any, Any], Any],
        name: str = "pipeline",
        stream: Callable[[Feed], Iterator[tuple[Item, Any]]] | None = None,
    ):
        self._read, self._decode, self._write = read, decode, write
        self._stream = stream or self._one_at_a_time
        self._reads: queue.Queue = queue.Queue()
        self._decodes: queue.Queue = queue.Queue()
        self._writes: queue.Queue = queue.Queue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, args=(self._reads, self._read_one, self._decodes), name=f"{name}-read"),
            threading.Thread(target=self._device_loop, name=f"{name}-device"),
            threading.Thread(target=self._loop, args=(self._writes, self._write_one, None), name=f"{name}-write"),
        ]
        for t in self._threads:
            t.daemon = True  # an actor that is killed takes them along
            t.start()

    def submit(self, payload: Any) -> Ticket:
        """Queue an item for the three stages."""
        if self._closed:
            raise RuntimeError("the pipeline is closed")
        item = Item(payload, Ticket(Future(), Future()))
        self._reads.put(item)
        return item.ticket

    def on_device(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the device thread (after the items already queued there) and return what it returns."""
        call = _Call(fn, Future())
        self._decodes.put(call)
        return call.future.result()

    def close(self, timeout: float | None = None) -> None:
        self._closed = True
        self._reads.put(_STOP)
        for t in self._threads:
            t.join(timeout)

    # ---- the stages
    def _read_one(self, item: Item) -> Any:
        return self._read(item.payload)

    def _one_at_a_time(self, feed: Feed) -> Iterator[tuple[Item, Any]]:
        while (item := feed.take(wait=True)) is not None:
            try:
                yield item, self._decode(item.payload, item.value)
            except BaseException as e:  # the item's failure, never the thread's
                yield item, Failed(e)

    def _device_loop(self) -> None:
        """Streams over the device queue, one after another; between them, the calls that ended them."""
        while True:
            feed = Feed(self._decodes)
            try:
                for item, value in self._stream(feed):
                    assert feed.taken and item is feed.taken[0], "a stream hands items back in the order it took them"
                    feed.taken.pop(0)
                    self._decoded(item, value)
                lost: BaseException = RuntimeError("the device stage ended without decoding it")
            except BaseException as e:  # the failure of the items the stream had taken, never the thread's
                lost = e
            for item in feed.taken:
                self._decoded(item, Failed(lost))
            if feed.barrier is _STOP:
                self._writes.put(_STOP)
                return
            if isinstance(feed.barrier, _Call):
                self._run_call(feed.barrier)

    def _decoded(self, item: Item, value: Any) -> None:
        t = item.ticket
        if isinstance(value, Failed):
            t.decoded.set_exception(value.error)
            t.done.set_exception(value.error)
            return
        item.value = value
        t.decoded.set_result(None)
        self._writes.put(item)

    @staticmethod
    def _run_call(call: _Call) -> None:
        try:
            call.future.set_result(call.fn())
        except BaseException as e:  # handed to the caller, whatever it is
            call.future.set_exception(e)

    def _write_one(self, item: Item) -> Any:
        return self._write(item.payload, item.value)

    @staticmethod
    def _loop(inbox: queue.Queue, step: Callable[[Item], Any], outbox: queue.Queue | None) -> None:
        while True:
            item = inbox.get()
            if item is _STOP:
                if outbox is not None:
                    outbox.put(_STOP)
                return
            t = item.ticket
            try:
                item.value = step(item)
            except BaseException as e:  # the item's failure, never the thread's
                if not t.decoded.done():
                    t.decoded.set_exception(e)
                t.done.set_exception(e)
                continue
            if outbox is None:
                t.done.set_result(item.value)
            else:
                outbox.put(item)
