"""The readers of embedding inputs: a train worker's rows straight from the Parquet files."""

import numpy as np
import pytest

from raylt.embed.inputs import open_embeddings, read_rows, read_split
from raylt.head.rows import cuts
from raylt.testing.simulate import write_parquet


@pytest.fixture
def three_files(tmp_path):
    """Three files of interleaved train / val / test rows (one without train rows), D = 6."""
    rng = np.random.default_rng(0)
    for i, splits in enumerate([["train", "val", "test"] * 7, ["test"] * 5, ["val", "train", "train"] * 9]):
        n = len(splits)
        x = rng.normal(size=(n, 6)).astype(np.float32)
        write_parquet(x, rng.integers(0, 4, n), np.array(splits), tmp_path / f"part-{i}.parquet")
    return open_embeddings(tmp_path)


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_worker_slices_of_the_files_are_the_split_cut_in_file_order(three_files, workers):
    es = three_files
    x, y = read_split(es, "train")
    c = cuts(len(y), workers)
    parts = [read_rows(es.files, es.dim, "train", c[w], c[w + 1]) for w in range(workers)]
    assert [len(p[1]) for p in parts] == np.diff(c).tolist()
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    assert all(p[0].dtype == np.float32 and p[0].flags.writeable for p in parts)


def test_a_whole_split_and_an_empty_slice(three_files):
    es = three_files
    x, y = read_rows(es.files, es.dim, "val")
    ex, ey = read_split(es, "val")
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
    assert len(y) == es.counts["val"].sum() == 7 + 9
    x, y = read_rows(es.files, es.dim, "train", 5, 5)
    assert x.shape == (0, 6) and len(y) == 0
