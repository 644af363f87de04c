"""Running the device feed ahead of the step: a thread, and on CUDA a side stream."""
from __future__ import annotations

import itertools
import queue
import threading
from contextlib import nullcontext

import torch


class DevicePrefetcher:
    """Iterates `loader`, running `feed(batch, train, device)` on each batch `depth` batches ahead, in a thread.

    On CUDA the feed runs on a side stream and each batch carries an event the consumer's stream waits for, so
    the copies, decoding and augmentation of the next batches overlap the training step (their host-side work
    too: torch releases the GIL inside its ops). On other devices it is the same thread and queue, no streams;
    with `threaded=False`, no thread: the feed runs in the consumer's, between steps (on a CPU whose cores the
    step already fills, where loader workers work ahead anyway, a second thread's ops only slow the step's down).
    Sized when the loader is, as Lightning wants for its epoch length."""

    def __init__(self, loader, feed, train: bool, device, depth: int = 2, threaded: bool = True):
        self.loader, self.feed, self.train, self.depth, self.threaded = loader, feed, train, depth, threaded
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        cuda = self.device.type == "cuda"
        if not (self.threaded or cuda):
            yield from (self.feed(batch, self.train, self.device) for batch in self.loader)
            return
        ready: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()

        def put(item) -> None:  # gives up once the consumer has gone
            while not stop.is_set():
                try:
                    return ready.put(item, timeout=0.1)
                except queue.Full:
                    pass

        # The first batch is fetched here, in the consumer's thread: starting the loader draws its workers' seeds
        # from torch's global RNG, which must happen at the same point of every run, not whenever the thread runs.
        batches = iter(self.loader)
        first = next(batches, StopIteration)

        def work() -> None:
            try:
                if cuda:
                    torch.cuda.set_device(self.device)
                side = torch.cuda.Stream(self.device) if cuda else None
                for batch in itertools.chain([] if first is StopIteration else [first], batches):
                    if stop.is_set():
                        return
                    with torch.cuda.stream(side) if cuda else nullcontext():
                        out = self.feed(batch, self.train, self.device)
                        done = torch.cuda.Event() if cuda else None
                        if done is not None:
                            done.record(side)
                    put((out, done))
                put(StopIteration)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                put(e)

        thread = threading.Thread(target=work, name="effnet-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is StopIteration:
                    return
                if isinstance(item, BaseException):
                    raise item
                out, done = item
                if done is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(done)
                    for t in out:  # made on the side stream: keep the allocator from reusing it too early
                        if torch.is_tensor(t):
                            t.record_stream(stream)
                yield out
        finally:
            stop.set()
            thread.join(timeout=5)
