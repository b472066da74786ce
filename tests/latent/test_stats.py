"""The class-statistics maths against numpy on random data."""

import numpy as np
from conftest import toy
import pytest

from raylt.latent.stats import class_moments, merge, merge_all


def data(n=600, d=6, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(0, 3, (classes, d))
    x = centres[y] + rng.normal(0, 1, (n, d)) @ rng.normal(0, 1, (d, d))
    return x.astype(np.float32), y


def test_one_shard_matches_numpy():
    x, y = data()
    m = class_moments(x, y, num_classes=5, rank=6)  # rank = D: roots are exact
    for c in range(5):
        xc = x[y == c].astype(np.float64)
        assert m.counts[c] == len(xc)
        assert np.allclose(m.means[c], xc.mean(0))
        assert np.allclose(m.class_covariance(c), np.cov(xc, rowvar=False))
    within = sum(np.cov(x[y == c].astype(np.float64), rowvar=False) * ((y == c).sum() - 1) for c in range(5))
    assert np.allclose(m.pooled_covariance(), within / (len(y) - 5))


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_merged_shards_equal_the_whole(shards):
    x, y = data(seed=shards)
    whole = class_moments(x, y, 5, rank=6)
    cuts = np.array_split(np.random.default_rng(1).permutation(len(y)), shards)
    merged = merge_all([class_moments(x[i], y[i], 5, rank=6) for i in cuts])
    assert np.array_equal(merged.counts, whole.counts)
    assert np.allclose(merged.means, whole.means)
    assert np.allclose(merged.pooled, whole.pooled)
    for c in range(5):
        assert np.allclose(merged.class_covariance(c), whole.class_covariance(c))


def test_classes_missing_from_a_shard_and_single_images():
    x, y = data()
    y = y.copy()
    y[y == 4] = 3
    y[0] = 4  # class 4 has one image, class 2 only in the second shard
    a_idx = np.flatnonzero(y != 2)[:300]
    b_idx = np.setdiff1d(np.arange(len(y)), a_idx)
    merged = merge(class_moments(x[a_idx], y[a_idx], 6, rank=6), class_moments(x[b_idx], y[b_idx], 6, rank=6))
    whole = class_moments(x, y, 6, rank=6)
    assert merged.counts[5] == 0 and not merged.roots[5].any() and not merged.means[5].any()
    assert merged.counts[4] == 1 and not merged.class_covariance(4).any()
    assert np.allclose(merged.means, whole.means) and np.allclose(merged.pooled, whole.pooled)
    assert np.allclose(merged.class_covariance(2), np.cov(x[y == 2].astype(np.float64), rowvar=False))


def test_low_rank_roots_keep_the_top_directions():
    x, y = data(n=400, d=12, classes=2)
    m = class_moments(x, y, 2, rank=3)
    xc = x[y == 0].astype(np.float64)
    exact = np.linalg.eigvalsh(np.cov(xc, rowvar=False))[::-1]
    approx = np.linalg.eigvalsh(m.class_covariance(0))[::-1]
    assert np.allclose(approx[:3], exact[:3]) and np.allclose(approx[3:], 0, atol=1e-9)
    # merged roots stay a best rank-3 approximation of the stacked Gram: top directions agree closely
    halves = np.array_split(np.arange(len(y)), 2)
    merged = merge(class_moments(x[halves[0]], y[halves[0]], 2, 3), class_moments(x[halves[1]], y[halves[1]], 2, 3))
    top = np.linalg.eigvalsh(merged.class_covariance(0))[::-1][:3]
    assert np.all(top <= exact[:3] + 1e-9) and top[0] > 0.95 * exact[0]


def test_inaturalist_scale_fits_in_memory():
    # 8,142 classes at D = 768, rank 16: roots dominate, well under the 24 GB machine
    bytes_needed = 8142 * 16 * 768 * 8 + 8142 * 768 * 8 + 768 * 768 * 8
    assert bytes_needed < 1.0e9
    m = class_moments(np.zeros((2, 4)), np.array([0, 1]), 3, rank=2)
    assert m.nbytes() == 3 * 8 + 3 * 4 * 8 + 4 * 4 * 8 + 3 * 2 * 4 * 8 + 3 * 8  # + traces


def test_merge_rejects_mismatched_shapes():
    a = class_moments(np.zeros((2, 4)), np.array([0, 1]), 3, rank=2)
    b = class_moments(np.zeros((2, 4)), np.array([0, 1]), 3, rank=3)
    with pytest.raises(ValueError, match="cannot merge"):
        merge(a, b)


def test_class_sums_match_a_scatter_add_and_leave_absent_classes_at_zero():
    from raylt.latent.stats import class_sums

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(500, 6)).astype(np.float32), rng.integers(0, 8, 500)
    y[y == 3] = 4
    ref = np.zeros((9, 6))
    np.add.at(ref, y, x.astype(np.float64))
    got = class_sums(x, y, 9)
    assert got.dtype == np.float64 and np.allclose(got, ref, atol=1e-12)
    assert not got[3].any() and not got[8].any()


def test_traces_merge_exactly():
    x, y = toy([40, 3, 1, 25], d=6)
    parts = np.array_split(np.random.default_rng(0).permutation(len(y)), 3)
    m = merge_all([class_moments(x[i], y[i], 4, rank=2) for i in parts])
    for c in range(4):
        xc = x[y == c] - x[y == c].mean(0)
        assert np.isclose(m.traces[c], (xc**2).sum())
    # rank 2 < D: classes 0 and 3 leave scatter out of their roots; 1 (3 images) and 2 do not
    assert m.residuals()[0] > 0 and m.residuals()[3] > 0 and np.allclose(m.residuals()[[1, 2]], 0)


def test_range_finder_roots_are_exact_for_low_rank_classes_and_near_optimal_otherwise():
    rng = np.random.default_rng(3)
    d, n = 120, 600  # both sides above 3 (rank + oversample): the range finder's regime
    low = rng.normal(size=(n, 20)) @ rng.normal(size=(20, d))  # rank 20 <= 16 + 10: exact
    full = rng.normal(size=(n, d)) * np.geomspace(1, 0.05, d)
    x = np.vstack([low, full])
    y = np.repeat([0, 1], n)
    fast, exact = class_moments(x, y, 2, rank=16), class_moments(x, y, 2, rank=16, exact_roots=True)
    gram = lambda r: r.T @ r  # noqa: E731
    np.testing.assert_allclose(gram(fast.roots[0]), gram(exact.roots[0]), atol=1e-6 * np.abs(gram(exact.roots[0])).max())
    kept = (fast.roots[1] ** 2).sum() / (exact.roots[1] ** 2).sum()
    assert 0.96 < kept <= 1.0 + 1e-9  # one power step: 0.97 of the optimal energy on this decaying spectrum
    np.testing.assert_array_equal(fast.roots, class_moments(x, y, 2, rank=16).roots)  # seeded: deterministic


def test_merge_into_a_running_total_equals_the_copying_merge():
    x, y = data(seed=4)
    half = np.arange(len(y)) % 2 == 0
    a, b = class_moments(x[half], y[half], 5, rank=6), class_moments(x[~half], y[~half], 5, rank=6)
    copied = merge(a, b)
    assert not np.shares_memory(copied.roots, a.roots)
    total = merge(a, b, into_a=True)
    assert total.roots is a.roots  # no second C x r x D array
    for field in ("counts", "means", "pooled", "roots", "traces"):
        assert np.allclose(getattr(total, field), getattr(copied, field)), field


@pytest.mark.parametrize("files,tasks,size", [(8, 2, 4), (7, 2, 4), (9, 2, 8), (3, 8, 1), (5, 5, 1), (1, 2, 1)])
def test_files_per_task_is_a_power_of_two_giving_at_most_a_group_per_cpu(files, tasks, size):
    from raylt.latent.stats_ray import group_size

    assert group_size(files, tasks) == size


def test_aligned_blocks_follow_the_binary_digits_of_the_count():
    from raylt.latent.stats import aligned_blocks

    assert aligned_blocks(11) == [(0, 8), (8, 10), (10, 11)]
    assert aligned_blocks(8) == [(0, 8)] and aligned_blocks(0) == []


def test_grouped_streamed_merges_form_the_tree_of_a_task_per_file():
    """The roots' truncation depends on the order of merges: grouping by the cluster's CPUs, or
    taking blocks from kept ones, must not change it, or one node and two, or a grown store and
    a fresh one, would give different moments."""
    from raylt.latent.stats import block_tree, fold_right, tree_reduce

    def fn(a, b):
        return f"({a} {b})"

    # Pairs level by level, an odd last item passed up.
    assert tree_reduce(iter("0123456"), fn) == "(((0 1) (2 3)) ((4 5) 6))"
    assert tree_reduce(iter("01234"), fn) == "(((0 1) (2 3)) 4)"
    for n in range(1, 14):
        names = [str(i) for i in range(n)]
        whole = tree_reduce(iter(names), fn)

        def leaf(lo, hi):
            return tree_reduce(names[lo:hi], fn)

        for size in (1, 2, 4, 8, 16):
            parts = block_tree(n, leaf, fn, size)
            assert fold_right([p[2] for p in parts], fn) == whole, (n, size)
            assert not any(p[3] for p in parts)
        # Kept blocks of a shorter prefix (its aligned blocks, as a smaller store keeps them).
        for m in range(1, n):
            had = {(lo, hi): tree_reduce(names[lo:hi], fn) for lo, hi, _, _ in block_tree(m, leaf, fn)}
            used = []

            def kept(lo, hi):
                used.append((lo, hi)) if (lo, hi) in had else None
                return had.get((lo, hi))

            parts = block_tree(n, leaf, fn, 4, kept, frozenset(had))
            assert fold_right([p[2] for p in parts], fn) == whole, (n, m)
            assert (0, 1 << (m.bit_length() - 1)) in used  # the prefix's largest block is taken, not formed
