"""Generated embeddings: the iNaturalist-sized long tail, the two generators and the balanced twin."""

import hashlib

import numpy as np
import pytest

from raylt.testing.simulate import (
    GENERATORS, LatentSpec, balanced_counts, balanced_twin, clip_like, generate, inat_like_profile,
)


def test_inat_like_profile_has_inaturalist_2018_size_and_groups():
    p = inat_like_profile()
    assert len(p) == 8142 and abs(int(p.sum()) - 437_513) < 200 and p.max() == 1000 and p.min() == 2
    assert ((p > 100).sum(), ((p >= 20) & (p <= 100)).sum(), (p < 20).sum()) == (842, 4076, 3224)


def test_clip_like_draws_the_embeddings_it_always_drew():
    """Benchmarks and accuracy tests are measured on these exact arrays: a change of the
    generator must be a choice, not a side effect."""
    x, y, s = clip_like([30, 12, 5, 2, 9, 3, 1, 7, 4, 6], 7, LatentSpec(dim=32, seed=3), splits=("val", "test"))
    digest = hashlib.sha256(x.tobytes() + y.tobytes() + "|".join(s).encode()).hexdigest()[:16]
    assert x.shape == (219, 32) and digest == "efdb7d9dec090a36"


@pytest.mark.parametrize("generator", GENERATORS.names())
def test_generators_give_unit_rows_in_the_requested_splits(generator):
    (x, y, s), twin = generate(generator, [20, 5, 1], 4, LatentSpec(dim=48, seed=0), splits=("val", "test"))
    assert twin is None and x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert np.bincount(y[s == "train"]).tolist() == [20, 5, 1]
    assert np.bincount(y[s == "val"]).tolist() == [4, 4, 4] and np.bincount(y[s == "test"]).tolist() == [4, 4, 4]


def test_heavy_tailed_classes_have_far_outliers_that_clip_like_ones_do_not():
    def tail_ratio(generator):  # 99th percentile over median distance to the class mean
        (x, y, _), _ = generate(generator, [400] * 6, 0, LatentSpec(dim=64, seed=0), splits=())
        d = np.concatenate([np.linalg.norm(x[y == c] - x[y == c].mean(0), axis=1) for c in range(6)])
        return np.percentile(d, 99) / np.median(d)

    assert tail_ratio("heavy_tailed") > 1.6 > 1.3 > tail_ratio("clip_like")


@pytest.mark.parametrize("generator", GENERATORS.names())
def test_the_balanced_twin_has_the_same_test_set_and_class_distributions(generator):
    counts, spec = [400, 300, 10, 3], LatentSpec(dim=64, seed=1)
    (x, y, s), (xb, yb) = balanced_twin(generator, counts, 50, spec)
    (x0, y0, s0), _ = generate(generator, counts, 50, spec)
    assert np.array_equal(x, x0) and np.array_equal(y, y0)  # the long-tail set is untouched by its twin
    assert np.bincount(yb).tolist() == balanced_counts(713, 4).tolist() == [179, 178, 178, 178]
    test = s == "test"
    means = np.stack([x[test][y[test] == c].mean(0) for c in range(4)])
    for c in range(4):  # the twin's class c, even where the long tail had 3 images, is nearest to test class c
        d = np.linalg.norm(means - xb[yb == c].mean(0), axis=1)
        assert d.argmin() == c


@pytest.mark.parametrize("generator", GENERATORS.names())
def test_text_views_leave_the_images_alone_and_name_classes_as_well_as_their_setting_says(generator):
    counts, spec = [60] * 48, LatentSpec(dim=96, seed=2, classes_per_group=6)
    (x0, y0, _), _ = generate(generator, counts, 30, spec)
    (x, y, s), _, scenes = generate(generator, counts, 30, spec, text="scenes")
    *_, species = generate(generator, counts, 30, spec, text="species")
    assert np.array_equal(x, x0) and np.array_equal(y, y0)  # asking for names never moves an image
    assert scenes.shape == (48, 96) and np.allclose(np.linalg.norm(scenes, axis=1), 1, atol=1e-5)
    test = s == "test"
    top1 = lambda t: float(((x[test] @ t.T).argmax(1) == y[test]).mean())  # noqa: E731  zero-shot
    assert top1(scenes) > 0.2 and top1(species) < 0.08  # chance: 1/48
    # The modality gap: the names' centroid is far from the images'.
    cos = x.mean(0) @ scenes.mean(0) / np.linalg.norm(x.mean(0)) / np.linalg.norm(scenes.mean(0))
    assert cos < 0.3
