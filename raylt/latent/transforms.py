"""Feature transforms the class statistics can be taken in: name -> (forward on numpy arrays,
inverse on torch tensors).

Apart from the sampler so that the Ray tasks of the class-statistics reduce, which apply the
forward map, import numpy only.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# Tukey's ladder of powers with lambda = 1/2 on signed features (Yang et al. 2021 used ReLU
# features, which are non-negative): sign(x) |x|^1/2, inverted by sign(t) t^2.
TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "identity": (lambda x: x, lambda x: x),
    "tukey": (lambda x: np.sign(x) * np.sqrt(np.abs(x)), lambda t: t.sign() * t.square()),
}
