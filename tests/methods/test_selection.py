"""Selection of real embeddings: fast greedy DPP MAP against determinant search, and the selectors."""

import itertools

import numpy as np
import pytest

from raylt.errors import ConfigError
from raylt.methods.selection import SELECTORS, greedy_map, informativeness


def naive_greedy(f: np.ndarray, k: int) -> list[int]:
    """Each step adds the item that maximises det(L_Y) of the grown set, by determinants."""
    lk = f @ f.T
    picked: list[int] = []
    for _ in range(k):
        rest = [i for i in range(len(f)) if i not in picked]
        dets = [np.linalg.det(lk[np.ix_(picked + [i], picked + [i])]) for i in rest]
        picked.append(rest[int(np.argmax(dets))])
    return picked


@pytest.mark.parametrize("seed", range(5))
def test_fast_greedy_map_agrees_with_determinant_search(seed):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(12, 6)) * rng.uniform(0.2, 1.5, (12, 1))
    assert list(greedy_map(f, 5)) == naive_greedy(f, 5)


def test_greedy_map_is_close_to_the_exact_map_on_small_kernels():
    ratios = []
    for seed in range(20):
        f = np.random.default_rng(seed).normal(size=(10, 5))
        lk = f @ f.T
        exact = max(np.linalg.det(lk[np.ix_(s, s)]) for s in itertools.combinations(range(10), 4))
        g = list(greedy_map(f, 4))
        ratios.append(np.linalg.det(lk[np.ix_(g, g)]) / exact)
    assert min(ratios) > 0.4 and np.median(ratios) > 0.9, ratios


def test_greedy_map_stops_at_the_kernel_rank():
    f = np.random.default_rng(0).normal(size=(30, 3))
    assert len(greedy_map(f, 10)) == 3


def test_informativeness_is_high_near_another_class():
    rng = np.random.default_rng(0)
    a, b = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    x = np.vstack([a + rng.normal(0, 0.05, (50, 3)), b + rng.normal(0, 0.05, (50, 3)), [(a + b) / 2 + [0, 0, 0.1]]])
    y = np.array([0] * 50 + [1] * 50 + [0])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = informativeness(x, y, 2)
    assert q[-1] > 0.3 > np.median(q[:50])


def test_selectors_cap_large_classes_and_keep_small_ones():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], [300, 40, 5])
    x = rng.normal(size=(len(y), 16)) + np.eye(16)[y] * 3
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for name in ("ip_dpp", "random_cap"):
        keep = SELECTORS.get(name)(x, y, k=50, seed=0)
        assert list(np.bincount(y[keep])) == [50, 40, 5] and len(set(keep)) == len(keep)
    assert len(SELECTORS.get("none")(x, y, k=50)) == len(y)
    with pytest.raises(ConfigError, match="did you mean 'ip_dpp'"):
        SELECTORS.get("ipdpp")


def test_ip_dpp_keeps_a_more_diverse_subset_than_random():
    rng = np.random.default_rng(2)
    # one class: a dense core and a few spread-out examples; a DPP should not spend its
    # budget on near-duplicates of the core
    core = np.array([1.0] + [0] * 31) + rng.normal(0, 0.05, (900, 32))
    spread = rng.normal(size=(100, 32))
    x = np.vstack([core, spread])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.zeros(len(x), dtype=np.int64)

    def mean_cos(idx):
        g = x[idx] @ x[idx].T
        return (g.sum() - len(idx)) / (len(idx) * (len(idx) - 1))

    dpp = SELECTORS.get("ip_dpp")(x, y, k=40)
    rnd = SELECTORS.get("random_cap")(x, y, k=40)
    assert mean_cos(dpp) < mean_cos(rnd) - 0.2


def test_ip_dpp_handles_a_large_class():
    x = np.random.default_rng(3).normal(size=(5000, 512)).astype(np.float32)  # CLIP-sized: rank > k
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keep = SELECTORS.get("ip_dpp")(x, np.zeros(5000, dtype=np.int64), k=500)
    assert len(np.unique(keep)) == 500
