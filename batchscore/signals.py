"""How a run stops on SIGINT/SIGTERM: finish what is in flight, commit, and say how to resume."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from batchscore.errors import Interrupted


class StopFlag:
    """Set by SIGINT/SIGTERM: the pipeline takes no new work and the run commits what it has.

    A second signal does not wait for work in flight (a decode stuck on a dead network mount,
    say): it raises Interrupted at once, the current file or part is dropped, and parts
    committed earlier stay.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, _frame: object) -> None:
            if self.signum is not None:
                raise Interrupted(f"stopped at once by a second signal {signum}", signum)
            self.signum = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
