"""What every module raylt trains shares: AdamW with a per-epoch cosine schedule, and the
random generator of an epoch.

The schedule steps once per epoch, so a checkpoint taken between epochs holds it whole, and
a resumed run continues the same curve. The generator is a function of (seed, epoch, worker
rank) only: a resumed or re-run epoch draws the same batches and the same synthetic rows.
"""

from __future__ import annotations

import numpy as np
import torch


def adamw_cosine(params, lr: float, weight_decay: float, epochs: int):
    """(AdamW, cosine schedule over `epochs` epochs) for `params`."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)


def epoch_generator(seed: int, epoch: int, rank: int, device="cpu") -> torch.Generator:
    """The epoch's generator: a function of (seed, epoch, worker rank) only."""
    mixed = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(mixed)
