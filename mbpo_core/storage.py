"""Object storage behind one small interface: a local directory or S3 (the only boto3 user).

Objects are addressed by URI: ``file:///abs/path/key`` or ``s3://bucket/key``. A store is a root
URI plus keys under it. Writes are atomic for readers: a local object is written to a temporary
file and renamed; an S3 PUT (single or multipart) only becomes visible once complete.

S3 settings come from the environment only: credentials through boto3's usual chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a profile, or a pod identity) and the endpoint
through ``MBPO_S3_ENDPOINT_URL`` (or boto3's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``),
so MinIO, SeaweedFS and AWS S3 all work with the same code and nothing secret is a parameter.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def write_atomic(path: Path, *chunks: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StorageError(RuntimeError):
    """An object is missing, unreadable, or the store refused or could not be reached."""


class ObjectStore(ABC):
    """Keys are '/'-separated paths relative to the store's root URI."""

    url: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` atomically; returns the object's URI."""

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (relative to the root), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def uri(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key.lstrip('/')}"

    def child(self, prefix: str) -> ObjectStore:
        return open_store(self.uri(prefix))

    @abstractmethod
    def check(self) -> None:
        """Fail early, with a clear error, if the store cannot be used."""


class LocalStore(ObjectStore):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"key {key!r} escapes the store root {self.url}")
        return path

    def put(self, key: str, data: bytes) -> str:
        write_atomic(self._path(key), data)
        return self.uri(key)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"object {self.uri(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(".part"))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"local store {self.url} cannot be created: {e}") from e
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"local store {self.url} is not writable")


def s3_endpoint_url() -> str | None:
    return (os.environ.get("MBPO_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or None)


def _s3_client(endpoint_url: str | None):  # noqa: ANN202 (boto3 client type)
    # one client per process, endpoint and credential set: credentials may change (rotated
    # secrets), and a client's connection pool must not be shared with a forked child
    return _cached_client(endpoint_url, os.environ.get("AWS_ACCESS_KEY_ID"),
                          os.environ.get("AWS_SECRET_ACCESS_KEY"),
                          int(os.environ.get("AWS_MAX_ATTEMPTS", "8")), os.getpid())


@lru_cache(maxsize=8)
def _cached_client(endpoint_url: str | None, access_key: str | None, secret_key: str | None,
                   max_attempts: int, pid: int):  # noqa: ANN202
    import boto3
    from botocore.config import Config

    # "standard" retries back off exponentially on throttling, 5xx and connection errors
    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, connect_timeout=5,
                    read_timeout=60, signature_version="s3v4", s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=endpoint_url, config=config,
                        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def _s3_error(e: Exception, what: str) -> StorageError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return StorageError(f"{what}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY in the environment")
    if isinstance(e, EndpointConnectionError):
        return StorageError(f"{what}: the S3 endpoint {s3_endpoint_url() or 'AWS'} is unreachable "
                            f"({e}); check MBPO_S3_ENDPOINT_URL")
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StorageError(f"{what}: S3 refused the credentials ({code}); check "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        if code in ("NoSuchKey", "404"):
            return StorageError(f"{what}: the object does not exist")
        if code == "NoSuchBucket":
            return StorageError(f"{what}: the bucket does not exist")
        if code.isdigit() and int(code) >= 500 or code in ("InternalError", "ServiceUnavailable",
                                                             "SlowDown"):
            return StorageError(f"{what}: the S3 server at {s3_endpoint_url() or 'AWS'} failed "
                                f"({code}) on every retry; it may be stopping or overloaded "
                                f"({e})")
        return StorageError(f"{what}: S3 error {code}: {e}")
    return StorageError(f"{what}: {e}")


class S3Store(ObjectStore):
    def __init__(self, bucket: str, prefix: str = "") -> None:
        if not bucket:
            raise StorageError("an s3:// URL needs a bucket, e.g. s3://my-bucket/mbpo")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    @property
    def client(self):  # noqa: ANN201
        return _s3_client(s3_endpoint_url())

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> str:
        try:
            # upload_fileobj switches to multipart for large objects; either way the object
            # appears only when the upload completes.
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key))
        except Exception as e:
            raise _s3_error(e, f"writing {self.uri(key)}") from e
        return self.uri(key)

    def get(self, key: str) -> bytes:
        buf = io.BytesIO()
        try:
            self.client.download_fileobj(self.bucket, self._key(key), buf)
        except Exception as e:
            raise _s3_error(e, f"reading {self.uri(key)}") from e
        return buf.getvalue()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _s3_error(e, f"checking {self.uri(key)}") from e
        except Exception as e:
            raise _s3_error(e, f"checking {self.uri(key)}") from e

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                              Prefix=full):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except Exception as e:
            raise _s3_error(e, f"listing {self.uri(prefix)}") from e
        return sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            raise _s3_error(e, f"deleting {self.uri(key)}") from e

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise _s3_error(e, f"S3 store {self.url}") from e


def open_store(url: str | os.PathLike[str]) -> ObjectStore:
    """``s3://bucket/prefix``, ``file:///abs/dir`` or a plain local path."""
    text = os.fspath(url)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalStore(text)
    raise StorageError(f"store URL {text!r}: scheme {parsed.scheme!r} is not supported; "
                       "use s3://bucket/prefix, file:///path or a local path")


def split_uri(uri: str) -> tuple[ObjectStore, str]:
    """The store holding ``uri`` and the object's key in it."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc), parsed.path.lstrip("/")
    if parsed.scheme in ("file", ""):  # kfp.local names its artifacts by plain paths
        path = Path(parsed.path)
        return LocalStore(path.parent), path.name
    raise StorageError(f"object URI {uri!r} is not an s3://, file:// or local path")


def read_uri(uri: str) -> bytes:
    store, key = split_uri(uri)
    return store.get(key)
