"""Image bytes read from object stores ahead of use, so that request latency costs no CPU time."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from batchscore.errors import StoreUnavailable
from batchscore.names import is_url
from batchscore.sources import ImageRef
from batchscore.storage import ATTEMPTS, StorageOptions, authority, read_object, reason

PREFETCH_WINDOW = 32  # objects being fetched at once, per process that fetches
STORE_DOWN_AFTER = 3  # objects in a row that a store, having answered before, left unanswered


def prefetched(
    refs: Iterable[ImageRef], options: StorageOptions, window: int = PREFETCH_WINDOW
) -> Iterator[ImageRef]:
    """`refs` in order, each object URL's bytes read ahead into `ref.data`, `window` at once.

    An object store answers each GET in tens of milliseconds; one GET after another would
    leave the CPUs idle. Fetching the next `window` objects concurrently while earlier ones
    are decoded hides that latency, and the window bounds the memory it takes. A missing or
    forbidden object becomes the ref's problem (an error row); a store that keeps failing
    raises StoreUnavailable. Local files pass through untouched: workers read those.

    An object whose store still fails after every retry (throttling, 5xx, timeouts, resets)
    is an error row, so one dead web server named in a manifest never blocks a nightly run.
    But when a store that did answer earlier in the run fails for `STORE_DOWN_AFTER` objects
    in a row, it went down mid-run: the run stops, keeping what it committed, and a rerun
    resumes, instead of turning the rest of the night into error rows."""
    health = _Health()
    pending: deque[tuple[ImageRef, Future[bytes] | None]] = deque()
    with ThreadPoolExecutor(max_workers=window, thread_name_prefix="prefetch") as pool:
        try:
            for ref in refs:
                future = None
                if ref.problem is None and ref.path is not None and is_url(ref.path):
                    future = pool.submit(read_object, ref.path, options)
                pending.append((ref, future))
                if len(pending) >= window:
                    yield _fetched(*pending.popleft(), health)
            while pending:
                yield _fetched(*pending.popleft(), health)
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()


class _Health:
    """Per store (bucket or web host): whether it answered in this run, and how many objects in
    a row it has left unanswered since."""

    def __init__(self) -> None:
        self.answered: set[str] = set()
        self.unanswered: dict[str, int] = {}

    def answer(self, store: str) -> None:
        self.answered.add(store)
        self.unanswered[store] = 0

    def went_down(self, store: str) -> bool:
        self.unanswered[store] = self.unanswered.get(store, 0) + 1
        return store in self.answered and self.unanswered[store] >= STORE_DOWN_AFTER


def _fetched(ref: ImageRef, future: Future[bytes] | None, health: _Health) -> ImageRef:
    if future is None:
        return ref
    store = authority(str(ref.path))
    try:
        data = future.result()
    except StoreUnavailable as exc:
        if health.went_down(store):
            raise
        cause = exc.__cause__ or exc
        reason_ = reason(cause).removeprefix("cannot read object: ")
        return replace(ref, problem=f"no answer after {ATTEMPTS} tries: {reason_}")
    except Exception as exc:  # 404, 403...: the store answered, about this object
        health.answer(store)
        return replace(ref, problem=reason(exc))
    health.answer(store)
    return replace(ref, data=data)
