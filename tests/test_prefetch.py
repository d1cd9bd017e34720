"""The batch prefetcher: the same batches in the same order, built ahead of the consumer, bounded, and stoppable."""
import threading
import time

import pytest
import torch
from conftest import write_dataset

from engine.config import parse_args
from engine.data.bins import Prefetcher, TokenDataset, train_batches
from engine.objectives import PretrainTask

WAIT = 30  # seconds: an upper bound for events that should happen at once, never a timing under test


class Counting:
    """An endless batch source that records how many batches it has built."""

    def __init__(self):
        self.built = 0
        self.changed = threading.Condition()

    def __iter__(self):
        while True:
            b = {"input_ids": torch.full((2, 3), self.built)}
            with self.changed:
                self.built += 1
                self.changed.notify_all()
            yield b

    def wait_for(self, n):
        with self.changed:
            assert self.changed.wait_for(lambda: self.built >= n, timeout=WAIT), f"only {self.built} built"


@pytest.fixture
def task(tmp_path):
    cfg = parse_args(["--batch_size=3", "--block_size=16"])
    return PretrainTask(cfg, TokenDataset(write_dataset(str(tmp_path / "d"))), 16)


@pytest.mark.parametrize("use_dataloader", [False, True])
def test_same_batches_in_the_same_order(task, use_dataloader):
    got = list(train_batches(task, 3, 7, 2, "cpu", first_micro=2, num_workers=1, use_dataloader=use_dataloader))
    want = [task.batch(it, 2 + m) for it in range(3, 7) for m in range(2)]
    assert len(got) == len(want) == 8
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in g)


def test_builds_ahead_of_the_consumer_and_no_further_than_its_depth():
    source = Counting()
    batches = Prefetcher(source, "cpu", depth=2)
    try:
        assert next(batches)["input_ids"][0, 0] == 0
        source.wait_for(3)  # batches 1 and 2 are built while the consumer still holds batch 0
        time.sleep(0.3)
        # one staged for the device, two in the queue, one waiting to be put: then the thread blocks instead of
        # reading the whole source
        assert source.built <= 5
        assert [int(next(batches)["input_ids"][0, 0]) for _ in range(5)] == [1, 2, 3, 4, 5]
    finally:
        batches.close()
    assert not batches.thread.is_alive()


def test_an_error_in_the_source_reaches_the_consumer_after_the_good_batches():
    def source():
        yield {"x": torch.zeros(1)}
        raise ValueError("token file truncated")

    batches = Prefetcher(source(), "cpu")
    assert torch.equal(next(batches)["x"], torch.zeros(1))
    with pytest.raises(ValueError, match="token file truncated"):
        next(batches)
    assert not batches.thread.is_alive()


def test_end_of_source_stops_iteration_and_the_thread():
    batches = Prefetcher(iter([{"x": torch.ones(1)}] * 3), "cpu")
    assert len(list(batches)) == 3
    with pytest.raises(StopIteration):
        next(batches)
    assert not batches.thread.is_alive()


def test_close_stops_an_endless_source():
    batches = Prefetcher(Counting(), "cpu", depth=1)
    next(batches)
    batches.close()
    assert not batches.thread.is_alive()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_arrive_pinned_and_complete(task):
    source = Counting()
    batches = Prefetcher(source, "cuda", depth=2)
    try:
        source.wait_for(3)
        waiting = batches.queue.queue[0]["input_ids"]  # built by the thread, not yet handed over
        assert waiting.is_pinned() and waiting.is_contiguous()
        assert next(batches)["input_ids"].is_cuda
    finally:
        batches.close()
    got = list(train_batches(task, 0, 20, 2, "cuda"))
    want = [task.batch(it, m) for it in range(20) for m in range(2)]
    for g, w in zip(got, want):
        assert g["input_ids"].is_cuda and torch.equal(g["input_ids"].cpu(), w["input_ids"])
