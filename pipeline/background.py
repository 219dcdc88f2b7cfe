"""Run a producer a step ahead of its consumer in a thread, so I/O and compute overlap."""

from __future__ import annotations

import threading
from queue import Full, Queue
from typing import Iterator


def in_background(items: Iterator, stop: threading.Event) -> Iterator:
    """Iterate ``items`` in a thread of its own, at most one item ahead of the consumer; the
    producer's exception is raised in the consumer. Setting ``stop`` ends the thread."""
    queue: Queue = Queue(maxsize=1)
    done = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        queue.put((item, None), timeout=0.1)
                        break
                    except Full:
                        continue
                if stop.is_set():
                    return
            queue.put((done, None))
        except BaseException as error:  # handed to the consumer, which raises it
            queue.put((done, error))

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item, error = queue.get()
        if error is not None:
            raise error
        if item is done:
            return
        yield item
