"""Image bytes read from object stores ahead of use, so that request latency costs no CPU time."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from batchscore.errors import StoreUnavailable
from batchscore.names import is_url
from batchscore.sources import ImageRef
from batchscore.storage import StorageOptions, read_object, reason

PREFETCH_WINDOW = 32  # objects being fetched at once, per process that fetches


def prefetched(
    refs: Iterable[ImageRef], options: StorageOptions, window: int = PREFETCH_WINDOW
) -> Iterator[ImageRef]:
    """`refs` in order, each object URL's bytes read ahead into `ref.data`, `window` at once.

    An object store answers each GET in tens of milliseconds; one GET after another would
    leave the CPUs idle. Fetching the next `window` objects concurrently while earlier ones
    are decoded hides that latency, and the window bounds the memory it takes. A missing or
    forbidden object becomes the ref's problem (an error row); a store that keeps failing
    raises StoreUnavailable. Local files pass through untouched: workers read those."""
    pending: deque[tuple[ImageRef, Future[bytes] | None]] = deque()
    with ThreadPoolExecutor(max_workers=window, thread_name_prefix="prefetch") as pool:
        try:
            for ref in refs:
                future = None
                if ref.problem is None and ref.path is not None and is_url(ref.path):
                    future = pool.submit(read_object, ref.path, options)
                pending.append((ref, future))
                if len(pending) >= window:
                    yield _fetched(*pending.popleft())
            while pending:
                yield _fetched(*pending.popleft())
        finally:
            for _, future in pending:
                if future is not None:
                    future.cancel()


def _fetched(ref: ImageRef, future: Future[bytes] | None) -> ImageRef:
    if future is None:
        return ref
    try:
        return replace(ref, data=future.result())
    except StoreUnavailable:
        raise
    except Exception as exc:
        return replace(ref, problem=reason(exc))
