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

`on_device(fn)` runs a function on the device thread and returns its result: model load, warm-up, compile
and graph capture belong to the thread that later decodes (CUDA graphs and compiled graphs are recorded
per thread). `close()` lets the items in flight finish and stops the threads.

Knows nothing of shards, models, Ray or storage.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
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
class _Item:
    payload: Any
    ticket: Ticket
    value: Any = None  # what the last stage handed on


@dataclass
class _Call:
    """A function to run on the device thread between items."""

    fn: Callable[[], Any]
    future: Future


class Pipeline:
    def __init__(
        self,
        read: Callable[[Any], Any],
        decode: Callable[[Any, Any], Any],
        write: Callable[[Any, Any], Any],
        name: str = "pipeline",
    ):
        self._read, self._decode, self._write = read, decode, write
        self._reads: queue.Queue = queue.Queue()
        self._decodes: queue.Queue = queue.Queue()
        self._writes: queue.Queue = queue.Queue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, args=(self._reads, self._read_one, self._decodes), name=f"{name}-read"),
            threading.Thread(
                target=self._loop, args=(self._decodes, self._decode_one, self._writes, True), name=f"{name}-device"
            ),
            threading.Thread(target=self._loop, args=(self._writes, self._write_one, None), name=f"{name}-write"),
        ]
        for t in self._threads:
            t.daemon = True  # an actor that is killed takes them along
            t.start()

    def submit(self, payload: Any) -> Ticket:
        """Queue an item for the three stages."""
        if self._closed:
            raise RuntimeError("the pipeline is closed")
        item = _Item(payload, Ticket(Future(), Future()))
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
    def _read_one(self, item: _Item) -> Any:
        return self._read(item.payload)

    def _decode_one(self, item: _Item) -> Any:
        return self._decode(item.payload, item.value)

    def _write_one(self, item: _Item) -> Any:
        return self._write(item.payload, item.value)

    @staticmethod
    def _loop(inbox: queue.Queue, step: Callable[[_Item], Any], outbox: queue.Queue | None, device=False) -> None:
        while True:
            item = inbox.get()
            if item is _STOP:
                if outbox is not None:
                    outbox.put(_STOP)
                return
            if isinstance(item, _Call):
                try:
                    item.future.set_result(item.fn())
                except BaseException as e:  # handed to the caller, whatever it is
                    item.future.set_exception(e)
                continue
            t = item.ticket
            try:
                item.value = step(item)
            except BaseException as e:  # the item's failure, never the thread's
                if not t.decoded.done():
                    t.decoded.set_exception(e)
                t.done.set_exception(e)
                continue
            if device:
                t.decoded.set_result(None)
            if outbox is None:
                t.done.set_result(item.value)
            else:
                outbox.put(item)
