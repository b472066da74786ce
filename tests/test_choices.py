"""Every config-named registry: unknown names fail before any work."""

import pytest

from raylt.config import load_config
from raylt.errors import ConfigError


@pytest.mark.parametrize("override, match", [
    ("selection.name=dpp", "unknown selector 'dpp'"),
    ("adapter.name=bnss", "did you mean 'bns'"),
    ("auxiliary.match=names", "unknown auxiliary matcher 'names'"),
    ("adapter.batches=uniform", "unknown adapter batch sampler 'uniform'"),
])
def test_unknown_method_names_fail_before_any_work(override, match):
    from raylt.choices import check_names

    with pytest.raises(ConfigError, match=match):
        check_names(load_config(None, [override]))
