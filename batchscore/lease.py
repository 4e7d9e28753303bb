"""The lock of a dataset in a bucket: an object held under a lease that its run renews.

- The lock is created with a conditional create (S3 `If-None-Match: *`, GCS
  `ifGenerationMatch=0`, Azure's `If-None-Match: *`): of two runs starting at once exactly one
  gets it. The holder renews it while it works with a conditional overwrite of its own
  version (S3 `If-Match`, GCS `ifGenerationMatch`, Azure's etag condition). Each renewal
  writes a new body (a counter goes up), so its version changes: a run that read the lock
  before a renewal cannot take it over after it. A run killed with the lock leaves a lease
  that expires; the next run takes it over with the same conditional overwrite, so of two
  runs taking over, again exactly one wins.
- A lease's age is judged by the store's clock alone (the `Date` of the store's answer to a
  look at the lock, against the lock's last-modified time), so no host's clock can make a
  live lease look expired. A store that did not say its time falls back to this host's clock:
  hosts may then disagree by less than the fifth of a lease that a holder keeps in hand.
- The holder counts its lease from the moment a renewal was sent (not answered), and checks it
  before every attempt to upload a part: past 80% of a lease with no renewal landed, it stops
  committing, since another run may hold the lock by then. A renewal whose answer was lost
  but which landed (the next conditional write then fails) is recognised by reading the lock
  back: this run's token and counter mean it still holds it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

from batchscore import storage
from batchscore.errors import LockHeld, OutputError, WriteFailed
from batchscore.files import process_alive
from batchscore.names import redact_url
from batchscore.settings import DEFAULT_LEASE_S
from batchscore.storage import StorageOptions

RENEWALS_PER_LEASE = 5  # a lease survives four renewals failing in a row
STORE_NOW = "batchscore_store_now"  # the store's own time when it answered (its Date header)
WAIT_POLL_S = 10.0


class Lease:
    """The lock object of a dataset in a bucket, held and renewed by this run."""

    def __init__(self, url: str, options: StorageOptions, lease_s: float) -> None:
        self.url = url
        self.lease_s = lease_s
        self.options = options
        self.fs, self.path = storage.filesystem(self.url, options)
        self.protocol = storage.SCHEMES[storage.scheme(self.url)][0]  # s3, gcs or abfs
        self.version: str | None = None
        self.lost: str | None = None
        self.token = uuid.uuid4().hex  # this run's, so no other run's lock body is the same
        self.renewals = 0  # in the body: every renewal changes the lock's version
        self.renewed_at = 0.0  # time.monotonic() when the last write that landed was sent
        self._sent_at: dict[int, float] = {}  # renewal counter -> when that write was sent
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_namespace": _pid_namespace(),
            "lease_s": self.lease_s,
            "token": self.token,
            "renewals": self.renewals,
        }
        return json.dumps(holder).encode()

    def acquire(self, *, wait: bool) -> None:
        while True:
            sent = time.monotonic()
            try:
                self._create()
            except Exception as exc:
                if not isinstance(exc, FileExistsError) and storage.status_of(exc) != 409:
                    raise  # 409: S3's answer to two conditional creates at once
                held = self._held()
                if held is None:
                    continue  # released between our create and our look: try again
                info, holder = held
                if holder.get("token") == self.token:  # our create landed, its answer did not
                    self.version = self._version_in(info)
                    self.renewed_at = sent
                    break
                if self._expired(info, holder) and self._take_over(info):
                    break
                if not wait:
                    raise LockHeld(
                        f"another batchscore run (host {holder.get('host')}, pid"
                        f" {holder.get('pid')}) is writing to"
                        f" {redact_url(self.url.rsplit('/', 1)[0])}; it was left alone (use"
                        " --wait-lock to wait for it; a dead run's lease expires"
                        f" {float(holder.get('lease_s', self.lease_s)):.0f} s after its last"
                        " renewal)"
                    ) from None
                time.sleep(min(WAIT_POLL_S, self.lease_s / RENEWALS_PER_LEASE))
                continue
            break
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True)
        self._renewer.start()

    def _create(self) -> None:
        sent = time.monotonic()
        response = storage.retried(
            lambda: self.fs.pipe_file(self.path, self._body(), mode="create"), self.url, "PUT"
        )
        self.version = self._version_in(response) or self._version()
        self.renewed_at = sent

    def _version_in(self, info: object) -> str | None:
        """The lock's version in a store's answer (a look at it, or a write's answer): what its
        conditional writes compare (GCS's generation, else the ETag); None if it is not there."""
        if not isinstance(info, Mapping):
            return None
        keys = ("generation",) if self.protocol == "gcs" else ("ETag", "etag")
        version = next((info[k] for k in keys if info.get(k)), None)
        return None if version is None else str(version)

    def _version(self) -> str | None:
        return self._version_in(storage.stat_object(self.url, self.options))

    def _held(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        try:
            info = self._stat_with_store_time()
            holder = json.loads(storage.read_object(self.url, self.options))
        except FileNotFoundError:
            return None
        except ValueError:
            holder = {}
        return info, holder if isinstance(holder, dict) else {}

    def _expired(self, info: Mapping[str, Any], holder: Mapping[str, Any]) -> bool:
        """Whether the holder's own lease (as it wrote it) ran out since its last renewal, or
        the holder was a process of this machine that is gone (as a flock is dropped)."""
        pid = holder.get("pid")
        here = holder.get("host") == socket.gethostname()
        same_pids = holder.get("pid_namespace") == _pid_namespace()  # not another container's
        if here and same_pids and isinstance(pid, int) and not process_alive(pid):
            return True
        modified = next(
            (info[k] for k in ("LastModified", "last_modified", "mtime", "updated") if info.get(k)),
            None,
        )
        if isinstance(modified, str):  # GCS's `updated`: RFC 3339 text
            with suppress(ValueError):
                modified = datetime.fromisoformat(modified.replace("Z", "+00:00"))
        if not isinstance(modified, datetime):
            return False  # no time to judge by: never take a lock over
        lease = holder.get("lease_s", self.lease_s)
        lease_s = float(lease) if isinstance(lease, (int, float)) else self.lease_s
        now = info.get(STORE_NOW) or datetime.now(timezone.utc)  # the store's clock if it told
        return bool((now - modified).total_seconds() > lease_s)

    def _stat_with_store_time(self) -> dict[str, Any]:
        """The lock's metadata, with the store's own time of the answer (`STORE_NOW`, from the
        `Date` header it sent), so that expiry is judged by one clock, the store's. Each
        backend hides that header, so each is asked through its own client."""
        look = {"s3": self._s3_look, "gcs": self._gcs_look, "abfs": self._azure_look}
        info, date = storage.retried(look[self.protocol], self.url, "HEAD")
        if date:
            with suppress(TypeError, ValueError):
                info[STORE_NOW] = parsedate_to_datetime(date)
        return info

    def _s3_look(self) -> tuple[dict[str, Any], str | None]:
        from fsspec.asyn import sync  # noqa: PLC0415  (an extra's dependency, loaded on use)

        bucket, _, key = self.path.partition("/")
        answer = sync(self.fs.loop, self.fs._call_s3, "head_object", Bucket=bucket, Key=key)
        return dict(answer), answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")

    def _gcs_look(self) -> tuple[dict[str, Any], str | None]:
        bucket, _, key = self.path.partition("/")
        headers, body = self.fs.call("GET", "b/{}/o/{}", bucket, key)  # 404: FileNotFoundError
        return dict(json.loads(body)), headers.get("Date")

    def _azure_look(self) -> tuple[dict[str, Any], str | None]:
        from fsspec.asyn import sync  # noqa: PLC0415  (an extra's dependency, loaded on use)

        container, blob, _ = self.fs.split_path(self.path)
        said: dict[str, str | None] = {}

        def keep_date(response: Any) -> None:
            said["date"] = response.http_response.headers.get("Date")

        async def properties() -> Any:
            async with self.fs.service_client.get_blob_client(container, blob) as client:
                return await client.get_blob_properties(raw_response_hook=keep_date)

        try:
            answer = sync(self.fs.loop, properties)
        except Exception as exc:
            if storage.status_of(exc) == 404:
                raise FileNotFoundError(self.url) from exc
            raise
        return {"etag": answer.etag, "last_modified": answer.last_modified}, said.get("date")

    def _take_over(self, info: Mapping[str, Any]) -> bool:
        """Overwrite an expired lock only if it is still the version we saw."""
        sent = time.monotonic()
        try:
            response = self._overwrite_if(str(self._version_in(info)))
        except Exception as exc:
            if storage.is_transient(exc):
                raise
            return False  # another run took it over first (the precondition failed)
        self.version = self._version_in(response) or self._version()
        self.renewed_at = sent
        return True

    def _overwrite_if(self, version: str) -> Any:
        """Replace the lock only while it is still `version` (S3 `If-Match`, GCS
        `ifGenerationMatch`, Azure's etag condition); another version fails the write."""
        if self.protocol == "s3":
            return self.fs.pipe_file(self.path, self._body(), IfMatch=version)
        if self.protocol == "gcs":  # gcsfs's pipe_file can only create: its JSON API call
            bucket, _, key = self.path.partition("/")
            return self.fs.call(
                "POST",
                f"{self.fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
                uploadType="media",
                name=key,
                ifGenerationMatch=version,
                data=self._body(),
                headers={"Content-Type": "application/json"},
                json_out=True,
            )
        from azure.core import MatchConditions  # noqa: PLC0415  (the azure extra's)

        condition = MatchConditions.IfNotModified
        return self.fs.pipe_file(self.path, self._body(), etag=version, match_condition=condition)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / RENEWALS_PER_LEASE):
            self.renew()

    def renew(self) -> None:
        sent = time.monotonic()
        self.renewals += 1
        self._sent_at = {n: t for n, t in self._sent_at.items() if sent - t < self.lease_s}
        self._sent_at[self.renewals] = sent
        try:
            response = self._overwrite_if(str(self.version))
            self.version = self._version_in(response) or self._version()
            self.renewed_at = sent
        except Exception as exc:
            if storage.is_transient(exc):
                return  # tried again at the next renewal, well within the lease
            if not self._adopt_own_write():
                self.lost = "another run took over this run's lock (its lease had expired)"

    def _adopt_own_write(self) -> bool:
        """Whether the lock holds a renewal of this run whose answer was lost on the way (it
        landed, so the next If-Match failed): then the lease counts from when that one was
        sent, and its version is the one to renew."""
        try:
            held = self._held()
        except Exception:
            return False
        if held is None:
            return False
        info, holder = held
        sent = self._sent_at.get(holder.get("renewals", -1))
        version = self._version_in(info)
        if holder.get("token") != self.token or sent is None or not version:
            return False
        self.version, self.renewed_at = version, sent
        return True

    def check(self) -> None:
        """Raise before committing anything once the lock is no longer this run's, or may not
        be: renewals that kept failing for most of a lease (another run may hold it now)."""
        if self.lost is None and time.monotonic() - self.renewed_at > 0.8 * self.lease_s:
            self.lost = "could not renew this run's lock for most of its lease"
        if self.lost is not None:
            raise WriteFailed(f"{redact_url(self.url)}: {self.lost}; nothing more was written")

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.lost is None:
            with suppress(Exception):  # best effort: an unreleased lease expires by itself
                if self._version() == self.version:
                    storage.delete_object(self.url, self.options)


def _pid_namespace() -> str:
    """Which pid namespace this process lives in: two containers may share a hostname, and
    their pids then name different processes."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@contextmanager
def held_lease(
    url: str, options: StorageOptions, *, wait: bool = False, lease_s: float = DEFAULT_LEASE_S
) -> Iterator[Lease]:
    """Hold the lock object at `url` for the run (see the module's docstring)."""
    root = url.rsplit("/", 1)[0]
    storage.check_reachable(root, options)
    lease = Lease(url, options, lease_s)
    try:
        lease.acquire(wait=wait)
    except (LockHeld, OutputError):
        raise
    except Exception as exc:  # the store refused (no write permission...) or is not answering
        shown = redact_url(root)
        raise OutputError(f"cannot take the lock of {shown}: {storage.failure(exc)}") from exc
    try:
        yield lease
    finally:
        lease.release()
