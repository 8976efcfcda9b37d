"""Replay data as immutable shards plus a manifest, so a round writes only its new rows.

A shard is an ``.npz`` (no pickle) holding one float32 array of replay rows, stored under a
content-addressed key (``<kind>/<round>-<sha256 prefix>.npz``): rewriting a round gives the same
key for the same rows and a new key for different rows, so no reader ever sees a shard change.

A manifest lists the shards a replay buffer holds, oldest first, and how many of the oldest
shard's rows have dropped out. Its ``add`` and ``resize`` follow :class:`ReplayBuffer`'s FIFO
rules exactly, so the buffer rebuilt from a manifest equals the in-memory one row for row.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .buffer import ReplayBuffer
from .storage import ObjectStore, StorageError, read_uri

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1


class ChecksumError(StorageError):
    """An object's bytes do not match the checksum recorded for it."""


@dataclass
class ShardRef:
    uri: str
    rows: int
    sha256: str
    start: int = 0  # rows before this index have dropped out of the buffer (FIFO)

    @property
    def live(self) -> int:
        return self.rows - self.start


@dataclass
class ShardManifest:
    obs_dim: int
    act_dim: int
    capacity: int
    shards: list[ShardRef] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(s.live for s in self.shards)

    @property
    def width(self) -> int:
        return 2 * self.obs_dim + self.act_dim + 2

    def _trim(self) -> None:
        excess = self.size - self.capacity
        while excess > 0:
            first = self.shards[0]
            if first.live <= excess:
                excess -= first.live
                self.shards.pop(0)
            else:
                first.start += excess
                excess = 0

    def add(self, shard: ShardRef) -> None:
        if shard.rows:
            self.shards.append(shard)
            self._trim()

    def resize(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"manifest capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._trim()

    # -- serialization ----------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": MANIFEST_FORMAT, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ShardManifest:
        try:
            d = json.loads(text)
            if d.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"manifest format {d.get('format')!r}, expected {MANIFEST_FORMAT}")
            return cls(int(d["obs_dim"]), int(d["act_dim"]), int(d["capacity"]),
                       [ShardRef(**s) for s in d["shards"]])
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError(f"not a valid shard manifest: {e}") from e

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ShardManifest:
        return cls.from_json(Path(path).read_text())

    # -- data ----------------------------------------------------------------------------------
    def read_rows(self, cache: ShardCache | None = None) -> np.ndarray:
        """The live rows, oldest first, every shard checked against its checksum."""
        cache = cache or ShardCache()
        parts = [cache.read(s)[s.start:] for s in self.shards]
        if not parts:
            return np.empty((0, self.width), np.float32)
        return np.concatenate(parts)

    def to_buffer(self, device: str | torch.device = "cpu", cache: ShardCache | None = None
                  ) -> ReplayBuffer:
        buf = ReplayBuffer(self.capacity, self.obs_dim, self.act_dim, device)
        rows = self.read_rows(cache)
        if len(rows):
            buf.add_rows(torch.from_numpy(rows).to(device))
        return buf


def encode_rows(rows: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, rows=np.ascontiguousarray(rows, dtype=np.float32))
    return buf.getvalue()


def decode_rows(data: bytes, uri: str) -> np.ndarray:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return npz["rows"]
    except Exception as e:
        raise StorageError(f"shard {uri} is not a readable npz of rows: {e}") from e


def write_shard(store: ObjectStore, kind: str, round_index: int, rows: torch.Tensor | np.ndarray
                ) -> ShardRef:
    """Store ``rows`` as a new immutable shard; an identical shard already stored is reused."""
    array = rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    data = encode_rows(array)
    digest = hashlib.sha256(data).hexdigest()
    key = f"{kind}/{round_index:06d}-{digest[:16]}.npz"
    if not store.exists(key):
        store.put(key, data)
    return ShardRef(store.uri(key), int(array.shape[0]), digest)


def _default_cache_dir() -> Path:
    root = os.environ.get("MBPO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mbpo")
    return Path(root) / "shards"


class ShardCache:
    """Remote shards are downloaded once per machine, kept by checksum, and verified on use."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root else _default_cache_dir()

    def read(self, shard: ShardRef) -> np.ndarray:
        if shard.uri.startswith("file://"):
            data = read_uri(shard.uri)
            _verify(data, shard)
            return decode_rows(data, shard.uri)
        path = self.root / f"{shard.sha256}.npz"
        if path.is_file():
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() == shard.sha256:
                return decode_rows(data, shard.uri)
            log.warning("cached copy of %s is corrupt; fetching it again", shard.uri)
            path.unlink(missing_ok=True)
        data = read_uri(shard.uri)
        _verify(data, shard)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return decode_rows(data, shard.uri)


def _verify(data: bytes, shard: ShardRef) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise ChecksumError(f"shard {shard.uri} fails its checksum: sha256 {digest[:16]}..., "
                            f"manifest says {shard.sha256[:16]}... (corrupt or truncated object)")
