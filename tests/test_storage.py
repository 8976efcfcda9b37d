"""Object stores (local folder, and S3 against a real SeaweedFS server), shards and manifests."""

import numpy as np
import pytest
import torch

from mbpo_core.buffer import ReplayBuffer
from mbpo_core.shards import ChecksumError, ShardCache, ShardManifest, write_shard
from mbpo_core.storage import LocalStore, S3Store, StorageError, open_store, read_uri


def _exercise(store) -> None:
    uri = store.put("a/b.bin", b"hello")
    assert uri == store.uri("a/b.bin")
    assert store.get("a/b.bin") == b"hello" and read_uri(uri) == b"hello"
    store.put("a/c.bin", b"x" * 10_000_000)  # large enough for a multipart upload on S3
    assert store.get("a/c.bin") == b"x" * 10_000_000
    assert store.exists("a/b.bin") and not store.exists("a/missing")
    assert store.list("a/") == ["a/b.bin", "a/c.bin"]
    assert store.list("nothing/") == []
    with pytest.raises(StorageError, match="a/missing"):
        store.get("a/missing")
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")


def test_local_store(tmp_path):
    store = open_store(tmp_path / "s")
    assert isinstance(store, LocalStore)
    store.check()
    _exercise(store)
    assert not list((tmp_path / "s").rglob("*.part")), "temporary files must not remain"
    with pytest.raises(StorageError, match="escapes"):
        store.put("../outside", b"x")


def test_open_store_rejects_unknown_scheme():
    with pytest.raises(StorageError, match="'gs' is not supported"):
        open_store("gs://bucket/x")


def test_s3_store_against_seaweedfs(s3_env):
    store = open_store(f"s3://{s3_env}/some/prefix")
    assert isinstance(store, S3Store)
    store.check()
    _exercise(store)
    # keys are relative to the prefix, and objects really live under it in the bucket
    assert store.uri("a/c.bin") == f"s3://{s3_env}/some/prefix/a/c.bin"
    assert open_store(f"s3://{s3_env}").list("some/") == ["some/prefix/a/c.bin"]


def test_s3_wrong_credentials_are_refused_clearly(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(f"s3://{s3_env}/p")
    with pytest.raises(StorageError, match="refused the credentials"):
        store.put("x", b"1")
    with pytest.raises(StorageError, match="refused the credentials"):
        store.check()


def test_s3_missing_bucket_and_unreachable_endpoint(s3_env, monkeypatch):
    with pytest.raises(StorageError, match="does not exist|S3 error"):
        open_store("s3://no-such-bucket-mbpo/p").check()
    monkeypatch.setenv("MBPO_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match="unreachable"):
        open_store(f"s3://{s3_env}/p").check()


def _rows(n: int, seed: int, width: int = 2 * 3 + 2 + 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def test_manifest_follows_replay_buffer_fifo(tmp_path):
    """Random adds and resizes: the buffer rebuilt from the manifest equals the live buffer."""
    store = open_store(tmp_path)
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(50, 3, 2)
    manifest = ShardManifest(3, 2, 50)
    for i in range(40):
        if rng.random() < 0.3:
            cap = int(rng.integers(5, 120))
            buf.resize(cap)
            manifest.resize(cap)
        rows = _rows(int(rng.integers(0, 70)), i)
        buf.add_rows(torch.from_numpy(rows))
        manifest.add(write_shard(store, "real", i, rows))
        rebuilt = manifest.to_buffer(cache=ShardCache(tmp_path / "cache"))
        assert len(rebuilt) == len(buf) == manifest.size
        assert torch.equal(rebuilt.rows(), buf.rows())
    # and it samples exactly like the live buffer
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(rebuilt.sample_rows(64, g1), buf.sample_rows(64, g2))
    # a JSON round trip keeps everything
    assert ShardManifest.from_json(manifest.to_json()) == manifest


def test_shards_are_content_addressed(tmp_path):
    store = open_store(tmp_path)
    a = write_shard(store, "real", 3, _rows(10, 1))
    b = write_shard(store, "real", 3, _rows(10, 1))
    c = write_shard(store, "real", 3, _rows(10, 2))
    assert a == b and a.uri != c.uri
    assert len(store.list("real/")) == 2


def test_corrupt_or_truncated_shard_fails_its_checksum(tmp_path):
    store = open_store(tmp_path / "s")
    shard = write_shard(store, "real", 0, _rows(100, 0))
    key = shard.uri.split("/s/", 1)[1]
    good = store.get(key)
    cache = ShardCache(tmp_path / "cache")
    store.put(key, good[:-40])  # truncated
    with pytest.raises(ChecksumError, match=key):
        cache.read(shard)
    store.put(key, good[:100] + bytes([good[100] ^ 1]) + good[101:])  # one flipped bit
    with pytest.raises(ChecksumError, match="fails its checksum"):
        cache.read(shard)


def test_s3_shards_are_cached_and_verified(s3_env, tmp_path):
    store = open_store(f"s3://{s3_env}/run")
    rows = _rows(500, 3)
    shard = write_shard(store, "model", 7, rows)
    cache = ShardCache(tmp_path / "cache")
    assert np.array_equal(cache.read(shard), rows)
    cached = tmp_path / "cache" / f"{shard.sha256}.npz"
    assert cached.is_file()
    # a corrupted cached copy is detected and fetched again, not used
    cached.write_bytes(b"garbage")
    assert np.array_equal(cache.read(shard), rows)
    # a corrupted remote object (and no cached copy) fails with the object's URI
    key = shard.uri.split("/run/", 1)[1]
    store.put(key, store.get(key)[:-10])
    cached.unlink()
    with pytest.raises(ChecksumError, match=shard.uri):
        cache.read(shard)


def _writer(args):
    """One training run's writes (shards + records), as a separate process would do them."""
    bucket, name, seed = args
    from mbpo_core.runstore import RunStore

    run = RunStore(f"s3://{bucket}/runs/{name}")
    refs = []
    for r in range(4):
        refs.append(write_shard(run.store, "real", r, _rows(64, seed * 100 + r)))
        run.write_record(r, "collect", 64 * (r + 1), {"seed": float(seed)}, {"x": refs[-1].uri})
    return [ref.uri for ref in refs]


def test_concurrent_runs_in_one_bucket_stay_apart(s3_env):
    from concurrent.futures import ProcessPoolExecutor

    from mbpo_core.runstore import RunStore

    names = [f"run-{i}" for i in range(4)]
    with ProcessPoolExecutor(4) as pool:
        uris = dict(zip(names, pool.map(_writer, [(s3_env, n, i) for i, n in enumerate(names)])))
    bucket = open_store(f"s3://{s3_env}")
    for i, name in enumerate(names):
        keys = bucket.list(f"runs/{name}/")
        assert len(keys) == 8  # 4 shards + 4 records, nobody else's
        assert all(u.startswith(f"s3://{s3_env}/runs/{name}/real/") for u in uris[name])
        run = RunStore(f"s3://{s3_env}/runs/{name}")
        assert [run.read_record(r, "collect")["metrics"]["seed"] for r in range(4)] == [i] * 4
        cache = ShardCache()
        for r, uri in enumerate(uris[name]):
            sha = uri.rsplit("-", 1)[1].removesuffix(".npz")
            shard = write_shard(run.store, "real", r, _rows(64, i * 100 + r))  # idempotent
            assert shard.uri == uri and shard.sha256.startswith(sha)
            assert np.array_equal(cache.read(shard), _rows(64, i * 100 + r))
