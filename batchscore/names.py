"""File names are bytes on Linux; Parquet strings are UTF-8. How batchscore keeps both.

Inside batchscore a path is a `str` made by `os.fsdecode`: a byte that is not UTF-8 becomes a
lone surrogate (PEP 383), so the string still opens the same file. Such a string cannot be
written to a Parquet string column, so the output holds a path twice:

- `path`: readable text, each byte that is not UTF-8 shown as `\\xNN`;
- `path_bytes`: the exact bytes of the name; `os.fsdecode(path_bytes)` opens the file.

Every other text written to the output (ids, labels, reasons, manifest fields) goes through
`readable` too, so no row can ever make the writer fail.
"""

from __future__ import annotations

import os
import re

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_QUERY_SCHEMES = ("http", "https", "az", "abfs", "abfss")  # where '?' starts a query
_USERINFO_IS_CONTAINER = ("abfs", "abfss")  # abfss://container@account.dfs.core.windows.net/
# Query parameters of a signed URL, by their exact names (any case): the secret itself and
# what changes with each signing (date, expiry), so a URL signed anew each night is written,
# and keyed for --incremental, the same way. Never a pattern: `?assetKey=monday-0001` names an
# image, and dropping it made two images one. Other parameters are part of the identity.
SIGNING_PARAMETERS = frozenset(
    name.lower()
    for name in (
        # AWS Signature Version 4 and 2 (presigned S3 URLs)
        "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
        "X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token",
        "AWSAccessKeyId", "Signature", "Expires",
        # Google Cloud Storage V4 and V2 signed URLs
        "X-Goog-Algorithm", "X-Goog-Credential", "X-Goog-Date", "X-Goog-Expires",
        "X-Goog-SignedHeaders", "X-Goog-Signature", "GoogleAccessId",
        # Azure shared access signatures (account, service and user delegation SAS)
        "sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr", "si", "sdd", "ses",
        "skoid", "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid",
        # CloudFront signed URLs (with Expires and Signature above)
        "Key-Pair-Id", "Policy",
        # bearer credentials some web servers take in the query
        "access_token", "token", "api_key", "apikey", "key", "password",
    )
)  # fmt: skip


def has_surrogates(text: str) -> bool:
    """Whether `text` holds characters that UTF-8 cannot encode (undecoded bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def readable(text: str) -> str:
    """`text` as valid UTF-8: each undecodable byte (or stray surrogate) shown as \\xNN."""
    if not has_surrogates(text):
        return text
    out = []
    for char in text:
        if 0xDC80 <= ord(char) <= 0xDCFF:  # a byte os.fsdecode could not decode
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif 0xD800 <= ord(char) <= 0xDFFF:  # any other lone surrogate (from a JSON escape)
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def readable_or_none(text: str | None) -> str | None:
    return None if text is None else readable(text)


def name_bytes(path: str) -> bytes | None:
    """The exact bytes of a file name (a URL's, redacted), or None when no file can have it."""
    try:
        return os.fsencode(written_name(path))
    except UnicodeEncodeError:
        return None


def path_problem(path: str) -> str | None:
    """Why `path` cannot name a file, or None when it can."""
    if "\x00" in path:
        return "path contains a NUL byte, which no file name can hold"
    if name_bytes(path) is None:
        return f"path {readable(path)!r} holds characters that no file name can hold"
    return None


def is_url(text: str) -> bool:
    """Whether `text` names an object by URL (`s3://`, `gs://`, `https://`...), not a path."""
    return bool(_URL.match(text))


def carries_credentials(url: str) -> bool:
    """Whether a URL's authority holds user info. In `abfs://` and `abfss://` URLs the part
    before '@' is the container (ADLS Gen2's `container@account.dfs.core.windows.net`), not a
    user, unless it holds a ':' (`user:password@`)."""
    scheme, _, rest = url.partition("://")
    user, at, _ = rest.partition("/")[0].partition("?")[0].rpartition("@")
    if not at:
        return False
    return scheme.lower() not in _USERINFO_IS_CONTAINER or ":" in user


def redact_url(url: str) -> str:
    """`url` without what must never be written down: user info (but an `abfss://` URL's
    container), and in a web or Azure URL's query every parameter of a signature
    (`SIGNING_PARAMETERS`: the secret, and the date and expiry that change at each signing).
    Every other character is kept as it is (a tab in an object key included); in `s3://` and
    `gs://` URLs a '?' is part of the key, not a query."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, path = rest[:cut], rest[cut:]
    if carries_credentials(url):
        netloc = netloc.rpartition("@")[2]
    if scheme.lower() in _QUERY_SCHEMES and "?" in path:
        path, _, query = path.partition("?")
        kept = [
            field
            for field in query.split("&")
            if field.partition("=")[0].lower() not in SIGNING_PARAMETERS
        ]
        path = f"{path}?{'&'.join(kept)}" if kept else path
    return f"{scheme}{sep}{netloc}{path}"


def written_name(path: str) -> str:
    """A path as the output records it: a URL with its secrets removed, a file name as is."""
    return redact_url(path) if is_url(path) else path
