import json

import numpy as np
import pyarrow as pa
import pytest

from raylt.embed.store import EmbeddingStore, fingerprint, read_store
from raylt.errors import DataError

INPUTS = {"backbone": {"backbone": "pixels", "size": 4}, "precision": "fp32", "data": "abc", "shard_size": 4}


def batch(rows, dim=3, bad=()):
    rows = np.asarray(rows)
    emb = np.stack([np.full(dim, r, np.float32) for r in rows])
    ok = np.array([r not in bad for r in rows])
    ids = np.array([f"img{r}" for r in rows], dtype=object)
    return dict(rows=rows, emb=emb, ok=ok, labels=rows % 2, splits=np.array(["train"] * len(rows), dtype=object),
                ids=ids, errors=np.array(["broken" if r in bad else "" for r in rows], dtype=object))


def test_fingerprint_depends_on_every_input():
    base = fingerprint(INPUTS)
    assert base == fingerprint(dict(reversed(list(INPUTS.items()))))
    for key, value in [("precision", "bf16"), ("data", "abd"), ("shard_size", 5), ("backbone", {"backbone": "pixels", "size": 5})]:
        assert fingerprint({**INPUTS, key: value}) != base


def test_shards_write_when_complete_in_any_order(tmp_path):
    store = EmbeddingStore.open(tmp_path, INPUTS, num_rows=10)
    assert store.num_shards == 3 and store.pending_shards() == [0, 1, 2]
    assert store.add(**batch([9, 1, 0])) == []  # shard 2 (rows 8-9) still lacks row 8
    assert store.add(**batch([4, 5, 6, 7, 3, 2])) == [0, 1]
    assert store.pending_shards() == [2]
    with pytest.raises(RuntimeError, match="shards \\[2\\] are missing"):
        store.finalize(3, {})


def test_full_cycle_and_read_back(tmp_path):
    store = EmbeddingStore.open(tmp_path, INPUTS, num_rows=10)
    store.add(**batch([9, 8, 1, 0, 4, 5, 6, 7, 3, 2]))
    man = store.finalize(3, {"class_names": ["a", "b"]})
    assert man["status"] == "complete" and man["embedded"] == 10 and man["dim"] == 3
    assert man["split_rows"] == {"train": 10} and man["class_names"] == ["a", "b"]
    t = read_store(store.path)
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 3)
    assert t["id"].to_pylist() == [f"img{i}" for i in range(10)]
    assert np.array_equal(np.stack(t["embedding"].to_numpy(zero_copy_only=False))[:, 0], np.arange(10))
    assert EmbeddingStore.open(tmp_path, INPUTS, 10).pending_shards() == []


def test_skipped_rows_are_listed_and_retried_until_complete(tmp_path):
    store = EmbeddingStore.open(tmp_path, INPUTS, num_rows=8)
    store.add(**batch(range(8), bad={5}))
    assert store.pending_shards() == [1]  # the shard with an unread image is tried again
    assert store.skipped() == [{"id": "img5", "error": "broken"}]
    store.add(**batch(range(4, 8)))  # the image was fixed
    assert store.pending_shards() == []
    man = store.finalize(3, {})
    assert man["skipped"] == 0 and man["embedded"] == 8


def test_other_inputs_never_share_a_folder(tmp_path):
    a = EmbeddingStore.open(tmp_path, INPUTS, 4)
    b = EmbeddingStore.open(tmp_path, {**INPUTS, "precision": "bf16"}, 4)
    assert a.path != b.path
    man = json.loads((a.path / "manifest.json").read_text())
    man["inputs"]["data"] = "tampered"
    (a.path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="was made from other inputs"):
        EmbeddingStore.open(tmp_path, INPUTS, 4)


def test_reading_an_unfinished_store_is_an_error(tmp_path):
    store = EmbeddingStore.open(tmp_path, INPUTS, 4)
    with pytest.raises(DataError, match="is not a finished embedding store"):
        read_store(store.path)


def test_half_written_files_of_an_interrupted_run_are_cleared(tmp_path):
    store = EmbeddingStore.open(tmp_path, INPUTS, num_rows=8)
    (store.path / ".part-00000.parquet.tmp-123").write_bytes(b"PAR1 half")
    store = EmbeddingStore.open(tmp_path, INPUTS, num_rows=8)
    with store.writing():
        assert not list(store.path.glob(".*.tmp-*")) and store.pending_shards() == [0, 1]


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete", "marker"])
def test_damaged_shards_are_found_by_checksum_and_never_read(tmp_path, damage):
    from raylt.embed.inputs import open_embeddings

    store = EmbeddingStore.open(tmp_path, INPUTS, num_rows=8)
    store.add(**batch(range(8)))
    man = store.finalize(3, {})
    assert set(man["checksums"]) == {"part-00000.parquet", "part-00001.parquet"} and store.verify() == {}
    shard = store.path / "part-00001.parquet"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "alter":  # same size, one byte changed inside the data pages
        shard.write_bytes(data[:40] + bytes([data[40] ^ 0xFF]) + data[41:])
    elif damage == "delete":
        shard.unlink()
    else:  # a marker cut short by a crash: the manifest's checksum still vouches for the shard
        (store.path / "part-00001.json").write_text('{"rows": 4, "emb')
    if damage == "marker":
        assert store.verify() == {} and read_store(store.path).num_rows == 8
        return
    why = {"truncate": "checksum mismatch", "alter": "checksum mismatch", "delete": "missing"}[damage]
    assert store.verify() == {1: why}
    for read in (read_store, open_embeddings):
        with pytest.raises(DataError, match="is damaged: part-00001.parquet .*rebuild"):
            read(store.path)
    store.drop([1])
    assert not store.is_complete() and store.pending_shards() == [1]
    store.add(**batch(range(4, 8)))
    store.finalize(3, {})
    assert store.verify() == {} and read_store(store.path)["id"].to_pylist() == [f"img{i}" for i in range(8)]


def test_a_second_writer_waits_for_the_first(tmp_path):
    import threading

    store = EmbeddingStore.open(tmp_path, INPUTS, num_rows=4)
    order = []

    def second():
        with EmbeddingStore.open(tmp_path, INPUTS, num_rows=4).writing():
            order.append("second")

    with store.writing():
        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        assert t.is_alive()  # blocked while the first holds the lock
        order.append("first")
    t.join(5)
    assert order == ["first", "second"]


def test_a_full_disk_while_writing_a_shard_is_one_line_and_leaves_nothing_half_written(tmp_path):
    """A file-size limit on the process (what a full disk or a quota does to a write: EFBIG,
    as ENOSPC): one line naming the folder and the bytes, no file left that a later run would
    read, and the same write succeeds once there is room."""
    import subprocess
    import sys

    code = """if True:
        import resource, signal, sys
        import numpy as np
        from pathlib import Path
        from raylt.embed.store import atomic_write_table, embedding_table
        from raylt.errors import DataError
        table = embedding_table(np.random.default_rng(0).normal(size=(64, 32)), [0] * 64, ["train"] * 64,
                                [str(i) for i in range(64)])
        if sys.argv[2] == "full":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            atomic_write_table(table, Path(sys.argv[1]) / "part-00000.parquet")
        except DataError as e:
            print(e)
    """
    full = subprocess.run([sys.executable, "-c", code, str(tmp_path), "full"], capture_output=True, text=True, timeout=60)
    assert full.returncode == 0, full.stderr[-2000:]
    line = full.stdout.strip()
    assert line.startswith(f"no room in {tmp_path} to write part-00000.parquet (") and "File too large" in line
    assert "\n" not in line and "run the same command again" in line
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temporary file
    room = subprocess.run([sys.executable, "-c", code, str(tmp_path), "room"], capture_output=True, text=True, timeout=60)
    assert room.returncode == 0 and room.stdout == "" and [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]
