"""Running test code in several Python threads at once."""

from __future__ import annotations

import threading


def run_together(work, count: int, timeout: float = 300) -> list:
    """Runs work() in `count` Python threads released together; returns what they raised."""
    errors = []
    start = threading.Barrier(count)

    def body():
        try:
            start.wait()
            work()
        except BaseException as exc:  # returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=body) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors
