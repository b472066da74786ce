import numpy as np

from raylt import longtail


def test_groups_boundaries():
    counts = np.array([101, 100, 20, 19, 1])
    assert list(longtail.group_of(counts)) == ["many", "medium", "medium", "few", "few"]
    assert longtail.group_sizes(counts) == {"many": 1, "medium": 2, "few": 2}


def test_exponential_profile_ends():
    p = longtail.exponential_profile(500, 100, 100)
    assert p[0] == 500 and p[-1] == 5 and np.all(np.diff(p) <= 0)
    assert list(longtail.exponential_profile(10, 1, 5)) == [10]


def test_subsample_keeps_requested_counts_deterministically():
    labels = np.repeat(np.arange(3), 10)
    idx = longtail.subsample(labels, np.array([10, 4, 1]), seed=3)
    assert list(np.bincount(labels[idx])) == [10, 4, 1]
    assert np.array_equal(idx, longtail.subsample(labels, np.array([10, 4, 1]), seed=3))
    assert not np.array_equal(idx, longtail.subsample(labels, np.array([10, 4, 1]), seed=4))


def test_describe():
    assert longtail.describe(np.array([200, 50, 5])) == (
        "3 classes, 255 images, 200 down to 5 per class, many/medium/few 1/1/1"
    )
