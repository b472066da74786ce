"""Generated embeddings: the iNaturalist-sized long tail."""

import numpy as np


def test_inat_like_profile_has_inaturalist_2018_size_and_groups():
    from raylt.testing.simulate import inat_like_profile

    p = inat_like_profile()
    assert (len(p), p.sum(), p.max(), p.min()) == (8142, 437_513, 1000, 2)
    assert ((p > 100).sum(), ((p >= 20) & (p <= 100)).sum(), (p < 20).sum()) == (842, 4076, 3224)
    assert np.all(np.diff(p) <= 0)  # ranked, head first
    quarter = inat_like_profile(2036)
    assert quarter.max() == 1000 and quarter.min() == 2 and abs(quarter.sum() - 437_513 / 4) < 500
