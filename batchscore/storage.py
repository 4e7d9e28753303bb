"""Objects in buckets (S3, GCS, Azure) and on web servers: listed, read and written with retries.

Everything remote goes through fsspec and its backends (s3fs, gcsfs, adlfs, aiohttp for
HTTP), installed as extras. pyarrow's own filesystems, which batchscore already has, lack
three things a nightly job needs (docs/object-storage.md): the ETag or generation of an
object (the incremental fingerprint), a conditional create (the dataset lock), and `https://`.
Dask's `storage_options` convention is fsspec's too.

Credentials come only from where each backend's SDK looks (environment, config files,
instance or service-account metadata) or from `--storage-option`; a URL that carries them
is refused, and every URL written down is redacted first (`names.redact_url`).

Failures are sorted in two. Only what is wrong with the object itself (missing: 404, a prefix
and not an object, larger than MAX_OBJECT_BYTES) is that image's problem: an error row that
`--no-retry-errors` counts as done. Everything else is the store's or the network's
(throttling, 5xx, timeouts, resets, a 403, missing credentials or extra): retried with
exponential backoff; when it persists the object becomes an `unavailable` row, which no run
counts as done, or the run stops with `StoreUnavailable` (committed parts stay; a rerun
resumes).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from importlib.util import find_spec
from typing import Any, TypeVar

from batchscore.errors import ConfigError, StoreUnavailable, WriteFailed
from batchscore.names import carries_credentials, redact_url

StorageOptions = Mapping[str, Any]
T = TypeVar("T")

# URL scheme -> (fsspec protocol, the module its backend needs, the batchscore extra)
SCHEMES = {
    "s3": ("s3", "s3fs", "s3"),
    "s3a": ("s3", "s3fs", "s3"),
    "gs": ("gcs", "gcsfs", "gcs"),
    "gcs": ("gcs", "gcsfs", "gcs"),
    "az": ("abfs", "adlfs", "azure"),
    "abfs": ("abfs", "adlfs", "azure"),
    "abfss": ("abfs", "adlfs", "azure"),
    "http": ("http", "aiohttp", "http"),
    "https": ("https", "aiohttp", "http"),
}
# botocore retries nothing and gives up on a dead endpoint in seconds: `retried` decides.
_S3_CLIENT_CONFIG = {
    "retries": {"total_max_attempts": 1, "mode": "standard"},
    "connect_timeout": 10,
    "read_timeout": 60,
}
LIST_PAGE_KEYS = 1000  # S3's own maximum per ListObjectsV2 page
STORE_DOWN_AFTER = 3  # objects in a row that a store, having answered before, left unanswered
ATTEMPTS = 6  # first try + 5 retries: 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s of backoff at most
START_ATTEMPTS = 3  # the check at start: a store down then is exit 2 within seconds
BACKOFF_S = 0.2
MAX_OBJECT_BYTES = 512 << 20  # an "image" larger than this is an error row, not a 10 GB read
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Client exceptions of a dropped or slow connection, by name: botocore's, aiohttp's, fsspec's
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_TRANSIENT_NAME = re.compile(r"Timeout|Connect|Disconnect|Reset|IncompleteRead|Payload|Throttl")


class ObjectTooLarge(ValueError):
    """An object bigger than MAX_OBJECT_BYTES: that image's own problem, not the store's."""


def scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def authority(url: str) -> str:
    """What stands between '://' and the first '/': the bucket, or a web server's host.
    (Parsed by hand: urllib drops tabs and newlines, which object keys may hold.)"""
    return url.partition("://")[2].partition("/")[0]


def check_url(url: str) -> None:
    """Refuse what cannot or must not be used: an unknown scheme, a missing extra, a URL that
    carries credentials (they would end up in logs and shell history)."""
    name = scheme(url)
    if name not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(f"{redact_url(url)}: unsupported URL scheme (supported: {known})")
    if carries_credentials(url):
        raise ConfigError(
            f"{redact_url(url)}: the URL carries credentials; batchscore reads them only from"
            " the standard environment, config files or --storage-option, never from a URL"
        )
    if not authority(url):
        kind = "host" if name in ("http", "https") else "bucket"
        raise ConfigError(f"{redact_url(url)}: no {kind} name after {name}://")
    if missing_extra(url):
        extra = SCHEMES[name][2]
        raise ConfigError(
            f"{name}:// needs batchscore's '{extra}' extra (from a checkout: pip install"
            f" '.[{extra}]'; docs/object-storage.md)"
        )


def missing_extra(url: str) -> bool:
    """Whether the backend this URL needs is not installed here (installed, it would work)."""
    return scheme(url) in SCHEMES and find_spec(SCHEMES[scheme(url)][1]) is None


def is_image_fault(exc: BaseException) -> bool:
    """Whether a failed read says something about the object itself, which no retry changes:
    missing (404, 410), a prefix and not an object, too large. Anything else (a 403, a 5xx,
    no credentials, a client error) may pass, so the row is never counted as done."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, ObjectTooLarge)):
        return True
    return status_of(exc) in (404, 410)


def url_problem(url: str) -> str | None:
    """Why a URL listed in a manifest cannot be read, or None."""
    try:
        check_url(url)
    except ConfigError as exc:
        return str(exc).removeprefix(f"{redact_url(url)}: ")  # the row names its URL already
    return None


def filesystem(url: str, options: StorageOptions) -> tuple[Any, str]:
    """The fsspec filesystem for `url` and the path within it (instances are cached by
    fsspec per protocol and options)."""
    check_url(url)
    from fsspec.core import url_to_fs  # noqa: PLC0415  (an extra's dependency, loaded on use)

    protocol = SCHEMES[scheme(url)][0]
    target = url if protocol in ("http", "https") else f"{protocol}://{url.split('://', 1)[1]}"
    if protocol == "s3":
        options = {"config_kwargs": _S3_CLIENT_CONFIG, **options}
    if protocol == "abfs":
        options = {"connection_timeout": 10, **options}
    try:
        fs, path = url_to_fs(target, **options)
    except Exception as exc:  # a client that cannot even be made: no credentials, bad options
        raise ConfigError(f"cannot use {redact_url(url)}: {_short(exc)}") from exc
    if protocol == "s3":
        fs.retries = 1  # s3fs's own retry loop: `retried` is the one place that retries
    loop = getattr(fs, "loop", None)
    if loop is not None:
        # A connection reset leaves aiohttp tasks whose exception nobody awaits, and asyncio
        # prints each as a traceback at 3 a.m.; the request that failed raises on its own.
        loop.set_exception_handler(_ignore_orphaned_task_errors)
    return fs, str(path)


def _ignore_orphaned_task_errors(loop: Any, context: dict[str, Any]) -> None:
    del loop, context


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


def status_of(exc: BaseException) -> int | None:
    """The HTTP status behind an exception, looked for along its chain of causes."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
        code = (  # aiohttp's status, Azure's status_code, urllib's code
            getattr(seen, "status", None)
            or getattr(seen, "status_code", None)
            or getattr(seen, "code", None)
        )
        if isinstance(code, int) and 100 <= code < 600:
            return code
        seen = seen.__cause__ or seen.__context__
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether trying again may help: throttling, a 5xx, a timeout, a dropped connection."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False  # the client has decided, whatever failed on the way there
    status = status_of(exc)
    if status is not None:
        return status in _TRANSIENT_STATUS
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ConnectionError, TimeoutError)) or _TRANSIENT_NAME.search(
            type(seen).__name__
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying cannot help: a missing or forbidden object, a wrong request, missing
    credentials, anything not known to be transient."""
    return not is_transient(exc)


def failure(exc: BaseException) -> str:
    """What went wrong with a request, in a few words: the store's answer, or the client's
    own error (its text one line, URLs in it redacted)."""
    status = status_of(exc)
    if isinstance(exc, FileNotFoundError) or status == 404:
        return "object not found (404)"
    if isinstance(exc, PermissionError) or status == 403:
        return "access denied (403): check the credentials' permissions on this object"
    if isinstance(exc, IsADirectoryError):
        return "is a prefix (folder), not an object"
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = _URL_IN_TEXT.sub(lambda found: redact_url(found.group(0)), text)  # aiohttp's names it
    label = f"HTTP {status}: " if status else ""
    return f"{label}{text[:300] or type(exc).__name__}"


def reason(exc: BaseException) -> str:
    """What an error row says about an object that could not be read."""
    text = failure(exc)
    answered = isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))
    if answered or status_of(exc) in (403, 404):
        return text
    return f"cannot read object: {text}"


def retried(action: Callable[[], T], url: str, what: str, attempts: int = ATTEMPTS) -> T:
    """`action()`, retried with exponential backoff and jitter while the store's failure is
    transient; a permanent one is raised as it is, a persistent one as StoreUnavailable."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as exc:
            if is_permanent(exc):
                raise
            if attempt == attempts - 1:
                raise StoreUnavailable(
                    f"{redact_url(url)}: {what} failed {attempts} time{'s' * (attempts > 1)},"
                    f" the store is not answering ({failure(exc)}); committed work is kept,"
                    " run again to resume"
                ) from exc
            time.sleep(BACKOFF_S * 2**attempt * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def read_object(url: str, options: StorageOptions) -> bytes:
    """The bytes of one object, at most MAX_OBJECT_BYTES (a bigger one raises ObjectTooLarge)."""
    fs, path = filesystem(url, options)
    try:
        data: bytes = retried(
            lambda: fs.cat_file(path, start=0, end=MAX_OBJECT_BYTES + 1), url, "GET"
        )
    except OSError as exc:
        if status_of(exc) == 416:  # a range on an empty object: S3 answers "not satisfiable"
            return b""
        raise
    if len(data) > MAX_OBJECT_BYTES:
        raise ObjectTooLarge(f"object larger than {MAX_OBJECT_BYTES >> 20} MiB")
    return data


def object_fingerprint(info: Mapping[str, Any]) -> str | None:
    """Size + the store's version of the content (GCS generation, else ETag), never a time
    when a version exists: objects copied between buckets keep the ETag of their bytes, not
    their dates. A web server that sends neither (nor a Last-Modified) gives None."""
    version = info.get("generation") or info.get("ETag") or info.get("etag")
    if version is None:
        modified = info.get("LastModified") or info.get("Last-Modified") or info.get("mtime")
        if modified is None:
            return None
        version = f"modified:{modified}"
    return f"{info.get('size')}-{str(version).strip(chr(34))}"


def stat_object(url: str, options: StorageOptions) -> dict[str, Any]:
    fs, path = filesystem(url, options)
    info: dict[str, Any] = retried(lambda: fs.info(path), url, "HEAD")
    return info


def list_objects(url: str, options: StorageOptions) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object below the prefix `url`, sorted by key, as (URL, info), read lazily.

    S3 is listed one page (1,000 keys) at a time, in the order S3 keeps keys (UTF-8 bytes,
    the order Python sorts them in), so a prefix of millions of objects never sits in memory.
    Other stores are listed whole by their fsspec backend, then sorted."""
    fs, path = filesystem(url, options)
    prefix = url.split("://", 1)[0]
    if SCHEMES[scheme(url)][0] == "s3":
        yield from _s3_pages(fs, path.rstrip("/"), url, prefix)
        return
    found: dict[str, dict[str, Any]] = retried(
        lambda: fs.find(path.rstrip("/"), detail=True), url, "LIST"
    )
    spelled = authority(url)  # `container@account.dfs.core.windows.net`, kept as written
    for name, info in sorted(found.items()):
        if info.get("type", "file") == "file":
            if "://" in name:  # http: URLs
                yield name, info
            else:
                yield f"{prefix}://{spelled}/{name.partition('/')[2]}", info


def _s3_pages(fs: Any, path: str, url: str, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    from fsspec.asyn import sync  # noqa: PLC0415  (an extra's dependency, loaded on use)

    bucket, _, key_prefix = path.partition("/")
    request: dict[str, Any] = {
        "Bucket": bucket,
        "Prefix": f"{key_prefix}/" if key_prefix else "",
        "MaxKeys": LIST_PAGE_KEYS,
    }
    while True:
        page = retried(
            lambda: sync(fs.loop, fs._call_s3, "list_objects_v2", **request), url, "LIST"
        )
        for item in page.get("Contents", []):
            if item["Key"].endswith("/"):
                continue  # a "folder" marker some tools write
            info = {"size": item.get("Size"), "ETag": item.get("ETag"), "type": "file"}
            yield f"{prefix}://{bucket}/{item['Key']}", info
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
        request["ContinuationToken"] = token


def put_file(
    local: str, url: str, options: StorageOptions, fence: Callable[[], None] | None = None
) -> None:
    """Upload a finished local file as one object: readers see all of it or nothing (a
    multipart upload becomes visible only when completed). `fence` runs before every attempt
    and raises WriteFailed when the upload may no longer land (the lock's lease is gone)."""
    fs, path = filesystem(url, options)

    def attempt() -> None:
        if fence is not None:
            fence()
        fs.put_file(local, path)

    _written(attempt, url)


def put_bytes(url: str, data: bytes, options: StorageOptions) -> None:
    fs, path = filesystem(url, options)
    _written(lambda: fs.pipe_file(path, data), url)


def _written(action: Callable[[], object], url: str) -> None:
    """A PUT, retried; when it fails for good, a write that failed mid-run: WriteFailed, one
    line, exit 1 (a store that stopped answering says so in it)."""
    try:
        retried(action, url, "PUT")
    except WriteFailed:
        raise
    except StoreUnavailable as exc:
        raise WriteFailed(str(exc)) from exc
    except Exception as exc:
        raise WriteFailed(f"cannot write {redact_url(url)}: {failure(exc)}") from exc


def delete_object(url: str, options: StorageOptions) -> None:
    fs, path = filesystem(url, options)
    retried(lambda: fs.rm_file(path), url, "DELETE")


def check_reachable(url: str, options: StorageOptions) -> None:
    """Fail before any work, in one line, when the store does not answer, refuses us, or has
    no such bucket. A prefix that holds nothing yet (a new output) is fine."""
    fs, path = filesystem(url, options)
    # Azure's SDK retries a refused connection on its own for over a minute: once is enough.
    attempts = 1 if SCHEMES[scheme(url)][0] == "abfs" else START_ATTEMPTS
    try:
        try:
            retried(lambda: fs.info(path.rstrip("/")), url, "HEAD", attempts)
            return
        except FileNotFoundError:
            if SCHEMES[scheme(url)][0] in ("http", "https"):
                raise
        bucket = path.split("/", 1)[0]
        try:
            retried(lambda: fs.info(bucket), url, "HEAD", attempts)
        except FileNotFoundError:
            raise ConfigError(f"cannot use {redact_url(url)}: no bucket {bucket!r}") from None
    except (StoreUnavailable, OSError, ValueError) as exc:
        raise ConfigError(f"cannot use {redact_url(url)}: {_short(exc)}") from exc
    except ConfigError:
        raise
    except Exception as exc:  # the client's own errors (no credentials, a bad endpoint)
        raise ConfigError(f"cannot use {redact_url(url)}: {_short(exc)}") from exc


def _short(exc: BaseException) -> str:
    if isinstance(exc, StoreUnavailable):
        return str(exc).split(": ", 1)[1].split(";")[0]
    return failure(exc)


class StoreHealth:
    """Per store (bucket or web host): whether it answered in this run, and how many objects in
    a row it has left unanswered since. A store that answered and then leaves
    `STORE_DOWN_AFTER` objects in a row unanswered went down mid-run: the run stops (and a
    rerun resumes). One that never answered is a dead server named in a manifest: its objects
    are error rows, so it cannot block every night."""

    def __init__(self) -> None:
        self.answered: set[str] = set()
        self.unanswered: dict[str, int] = {}

    def answer(self, store: str) -> None:
        self.answered.add(store)
        self.unanswered[store] = 0

    def left_unanswered(self, store: str, unavailable: StoreUnavailable) -> str:
        """The error row's reason for an object `store` left unanswered after every retry;
        raises `unavailable` instead when the store went down mid-run."""
        self.unanswered[store] = self.unanswered.get(store, 0) + 1
        if store in self.answered and self.unanswered[store] >= STORE_DOWN_AFTER:
            raise unavailable
        return f"no answer after {ATTEMPTS} tries: {failure(unavailable.__cause__ or unavailable)}"
