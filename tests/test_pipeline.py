"""The worker's shard pipeline (issue #15), without Ray or a model: stages overlap, items keep their order, and a
failure in any stage is that item's failure alone: a failed write leaves no commit marker, so the shard is
decoded again whole, and the shards behind it commit."""

from __future__ import annotations

import threading

import pytest

from adaspec_worker.pipeline import Pipeline
from jobs.layout import Commit, OutputRow, ShardFiles, ShardStats
from jobs.storage import Store


def _pipeline(log: list, fail: dict | None = None, hold=None) -> Pipeline:
    fail = fail or {}

    def stage(name):
        def run(item, value=None):
            if hold is not None:
                hold(name, item)
            log.append((name, item, threading.current_thread().name))
            if fail.get(name) == item:
                raise ValueError(f"{name} failed on {item}")
            return item

        return run

    read, dec, write = stage("read"), stage("decode"), stage("write")
    return Pipeline(lambda i: read(i), lambda i, v: dec(i, v), lambda i, v: write(i, v), name="t")


def test_items_pass_every_stage_in_order_on_their_own_threads():
    log: list = []
    p = _pipeline(log)
    futures = [p.submit(i) for i in range(6)]
    assert [f.done.result(timeout=10) for f in futures] == list(range(6))
    for name in ("read", "decode", "write"):
        assert [i for n, i, _ in log if n == name] == list(range(6))
        assert {t for n, _, t in log if n == name} == {f"t-{'device' if name == 'decode' else name}"}
    assert p.on_device(lambda: threading.current_thread().name) == "t-device"
    p.close(timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        p.submit(7)


def test_the_next_item_is_read_while_one_decodes_and_written_while_the_next_decodes():
    """Decoding item 0 waits until item 1's read has begun, and decoding item 1 until item 0's write has: a
    pipeline that ran the stages one after another would time out here."""
    read1, wrote0 = threading.Event(), threading.Event()

    def hold(name, item):
        if name == "read" and item == 1:
            read1.set()
        if name == "write" and item == 0:
            wrote0.set()
        if name == "decode" and item == 0:
            assert read1.wait(5), "item 1 was not read while item 0 decoded"
        if name == "decode" and item == 1:
            assert wrote0.wait(5), "item 0 was not written while item 1 decoded"

    p = _pipeline([], hold=hold)
    assert [f.done.result(timeout=15) for f in [p.submit(0), p.submit(1)]] == [0, 1]


@pytest.mark.parametrize("stage", ["read", "decode", "write"])
def test_a_stage_failure_is_that_items_failure_alone(stage):
    log: list = []
    p = _pipeline(log, fail={stage: 2})
    futures = [p.submit(i) for i in range(5)]
    with pytest.raises(ValueError, match=f"{stage} failed on 2"):
        futures[2].done.result(timeout=10)
    if stage == "write":  # decoded, then lost in the write: the controller knows it was not being decoded
        assert futures[2].decoded.result(timeout=10) is None
    else:
        with pytest.raises(ValueError, match=f"{stage} failed on 2"):
            futures[2].decoded.result(timeout=10)
    assert [futures[i].done.result(timeout=10) for i in (0, 1, 3, 4)] == [0, 1, 3, 4]
    later = {"read": ("decode", "write"), "decode": ("write",), "write": ()}[stage]
    assert not [n for n, i, _ in log if i == 2 and n in later], "a failed item goes no further"


def test_a_failure_on_the_device_thread_leaves_it_working():
    p = _pipeline([])
    with pytest.raises(ZeroDivisionError):
        p.on_device(lambda: 1 / 0)
    assert p.submit(1).done.result(timeout=10) == 1


class FailingStatsStore(Store):
    """A store whose stats write fails for one shard (what a broken bucket or a full disk does mid-commit)."""

    def __init__(self, root, bad: str):
        super().__init__(root, backoff_s=0.001, attempts=1)
        self.bad = bad

    def write_bytes(self, rel, data):
        if rel == self.bad:
            raise PermissionError(f"injected: {rel}")
        super().write_bytes(rel, data)


def test_a_failed_write_leaves_no_marker_and_the_shards_behind_it_commit(tmp_path):
    """The writer thread commits through ShardFiles: shard 1's stats write fails, so shard 1 has no marker (it
    does not exist; a rerun decodes it whole and overwrites its shard file) and shards 0 and 2 are committed."""
    files = ShardFiles(FailingStatsStore(str(tmp_path), "stats/shard-00001.json"))

    def write(i, rows):
        files.commit(rows, [], ShardStats(shard=i, rows=len(rows)), Commit(i, len(rows), 0, 1, "h"))
        return i

    p = Pipeline(lambda i: i, lambda i, _: [OutputRow(f"r{i}", "p", "c", 1, 1, "stop")], write, name="w")
    futures = [p.submit(i) for i in range(3)]
    with pytest.raises(PermissionError, match="stats/shard-00001"):
        futures[1].done.result(timeout=10)
    assert futures[0].done.result(timeout=10) == 0 and futures[2].done.result(timeout=10) == 2
    assert sorted(files.committed()) == [0, 2]
    assert files.missing([0, 1, 2]) == ["shard-00001"]
    assert (tmp_path / "shards" / "shard-00001.parquet").exists()  # written, but without its marker it does not exist
    assert not (tmp_path / "_commits" / "shard-00001.json").exists()
