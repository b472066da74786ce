"""The head's recipe as one scikit-learn estimator, `LongTailHead` (pure core: arrays in, no Ray,
no files, no MLflow).

The recipe: class statistics of the train embeddings -> calibrated class Gaussians (the
sampler, raylt.latent.sampling) and the whitening (raylt.head.whiten) -> the head trained on
real rows mixed with fresh synthetic rows every epoch, with the long-tail loss
(raylt.head.loop, raylt.head.modules) -> post-hoc offsets tau f(n_c) chosen on the val rows
(raylt.head.posthoc) -> a temperature fitted on them (raylt.head.calibration). The result is a
`HeadArtifact`: what `head.npz` holds and the logged model serves.

It is the one implementation of the recipe. `fit` runs it in this process; the Ray Train
adapter (raylt.head.fit_ray) runs the same pieces apart: `plan` on the driver from the
distributed class statistics, `start` and `epochs` in each worker, `finish` on the driver. Tune
trials, ablations and benchmarks call `fit` or the same pieces.

Inputs are L2-normalised embeddings (CLIP's are): the sampler draws on the unit sphere, so with
a sampler on, rows that are not unit-norm are refused (`sampler="none"` takes any rows).
Deterministic for a `seed` on CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from raylt.config import RayltConfig, override
from raylt.config.schema import HeadConfig, SamplerConfig, SelectionConfig, StatsConfig, TrainConfig
from raylt.head.artifact import HeadArtifact, softmax
from raylt.head.calibration import fit_temperature, mean_nll
from raylt.head.posthoc import balanced_accuracy, choose_tau, offsets

log = logging.getLogger(__name__)

# Estimator parameter -> the config key it is (one name space: scikit-learn's get_params is flat).
PARAMS: dict[str, str] = {
    "sampler": "sampler.name", "target": "sampler.target", "kappa": "sampler.kappa",
    "neighbours": "sampler.neighbours", "eps": "sampler.eps", "base_min": "sampler.base_min",
    "rank": "stats.rank",
    "selection": "selection.name", "selection_k": "selection.k", "selection_every": "selection.every",
    "head": "head.name", "whiten_ridge": "head.whiten_ridge", "scale": "head.scale", "loss": "head.loss",
    "tau": "head.tau", "posthoc": "head.posthoc", "posthoc_tau": "head.posthoc_tau", "calibrate": "head.calibrate",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
    "weight_decay": "train.weight_decay", "precision": "train.precision",
    "seed": "seed",
}
_UNIT_NORM_TOL = 1e-3


@dataclass(frozen=True)
class HeadPlan:
    """What training needs besides the rows, fixed before the first epoch (the driver builds it
    once and every worker gets it): the head's classes, the real rows per class and epoch, the
    synthetic budget, the calibrated Gaussians, the whitening and optional initial weights."""

    dim: int
    num_targets: int  # the first classes are targets; the rest are auxiliary (training only)
    data_counts: np.ndarray  # [num_targets] real train rows per target class: the n_c of the offsets
    real_counts: np.ndarray  # [num_classes] real rows per class and epoch (selection round 0)
    syn_counts: np.ndarray  # [num_classes] synthetic rows per class and epoch
    gaussians: object = None  # raylt.latent.calibrate.Gaussians (or an object ref of them), None: no sampler
    whiten: object = None  # raylt.head.whiten.Whitening of a whitened head
    init: np.ndarray | None = None  # [num_classes, D] initial weights (text embeddings of the names)
    neighbours: np.ndarray | None = None  # [num_classes, num_classes] bool: auxiliary classes' silencing mask

    @property
    def num_classes(self) -> int:
        return len(self.real_counts)


@dataclass
class Training:
    """The torch objects of one fit in progress (made by `LongTailHead.start`)."""

    module: object
    loss: object
    opt: object
    sched: object
    sampler: object


class LongTailHead(ClassifierMixin, BaseEstimator):
    """A linear (or cosine) head for long-tailed classes of L2-normalised embeddings.

    Parameters are the recipe's config keys (`PARAMS`; `raylt config --reference` explains
    each); the defaults are raylt's default recipe. `device`: the torch device of training.
    """

    def __init__(self, sampler: str = SamplerConfig.name, target: int = SamplerConfig.target,
                 kappa: float = SamplerConfig.kappa, neighbours: int = SamplerConfig.neighbours,
                 eps: float = SamplerConfig.eps, base_min: int = SamplerConfig.base_min,
                 rank: int = StatsConfig.rank, selection: str = SelectionConfig.name,
                 selection_k: int = SelectionConfig.k, selection_every: int = SelectionConfig.every,
                 head: str = HeadConfig.name, whiten_ridge: float = HeadConfig.whiten_ridge,
                 scale: float = HeadConfig.scale, loss: str = HeadConfig.loss, tau: float = HeadConfig.tau,
                 posthoc: str = HeadConfig.posthoc, posthoc_tau: float | None = HeadConfig.posthoc_tau,
                 calibrate: bool = HeadConfig.calibrate, epochs: int = TrainConfig.epochs,
                 batch_size: int = TrainConfig.batch_size, lr: float = TrainConfig.lr,
                 weight_decay: float = TrainConfig.weight_decay, precision: str = TrainConfig.precision,
                 seed: int = 0, device: str = "cpu"):
        self.sampler, self.target, self.kappa, self.neighbours = sampler, target, kappa, neighbours
        self.eps, self.base_min, self.rank = eps, base_min, rank
        self.selection, self.selection_k, self.selection_every = selection, selection_k, selection_every
        self.head, self.whiten_ridge, self.scale, self.loss, self.tau = head, whiten_ridge, scale, loss, tau
        self.posthoc, self.posthoc_tau, self.calibrate = posthoc, posthoc_tau, calibrate
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.precision, self.seed, self.device = precision, seed, device

    # -- configuration ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: RayltConfig, device: str = "cpu") -> "LongTailHead":
        """The estimator of a config's recipe (its sampler, stats, selection, head and train sections)."""
        def value(key: str):
            section, _, field = key.rpartition(".")
            return getattr(getattr(cfg, section) if section else cfg, field)

        return cls(**{p: value(k) for p, k in PARAMS.items()}, device=device)

    def config(self, base: RayltConfig | None = None) -> RayltConfig:
        """`base` (default: the defaults) with this estimator's parameters, validated like a
        config file: a bad value is a one-line ConfigError naming the parameter's key."""
        return override(base or RayltConfig(), {k: getattr(self, p) for p, k in PARAMS.items()},
                        "LongTailHead's parameters")

    # -- the recipe's pieces (the Ray Train adapter calls these too) -----------------------
    def statistics(self, cfg: RayltConfig | None = None) -> list[str]:
        """The feature transforms whose class moments `plan` needs (the sampler's space, and
        the raw space for a whitened head), in a fixed order."""
        from raylt.head.modules import HEADS
        from raylt.latent.sampling import SAMPLERS

        cfg = cfg or self.config()
        wanted = [SAMPLERS.get(cfg.sampler.name).transform, "identity" if HEADS.get(cfg.head.name).whitened else None]
        return [t for t in dict.fromkeys(wanted) if t]

    def plan(self, moments: Mapping, data_counts: np.ndarray, dim: int, real_counts: np.ndarray | None = None,
             init: np.ndarray | None = None, neighbours: np.ndarray | None = None) -> HeadPlan:
        """The plan of a fit from the class moments (`statistics()` transform -> ClassMoments
        of the train rows), the real train rows per target class, the embeddings' dimension,
        and optionally the real rows
        per class and epoch (auxiliary classes appended, selection applied; default
        `data_counts`), initial weights and the auxiliary silencing mask."""
        from raylt.head.whiten import head_whitening
        from raylt.latent.sampling import SAMPLERS, synthetic_counts

        cfg = self.config()
        spec = SAMPLERS.get(cfg.sampler.name)
        data_counts = np.asarray(data_counts, np.int64)
        real = data_counts if real_counts is None else np.asarray(real_counts, np.int64)
        gaussians = spec.build(moments[spec.transform], cfg.sampler) if spec.transform else None
        whiten = head_whitening(cfg.head, moments["identity"]) if "identity" in moments else None
        c = len(data_counts)
        syn = np.zeros(len(real), np.int64)
        if gaussians is not None:
            syn[:c] = synthetic_counts(real[:c], cfg.sampler.target, gaussians.valid)
        return HeadPlan(dim, c, data_counts, real, syn, gaussians, whiten, init, neighbours)

    def start(self, plan: HeadPlan, device="cpu", gaussians=None) -> Training:
        """A new head (the same on every rank: seeded), its loss, optimiser, schedule and
        sampler on `device`; `gaussians` replaces the plan's (a worker's copy of them)."""
        import torch

        from raylt.head.loop import make_optimizer
        from raylt.head.modules import build_head, build_loss
        from raylt.latent.sampling import GaussianSampler
        from raylt.methods.auxiliary import silenced, silencing_mask

        cfg = self.config()
        torch.manual_seed(cfg.seed)
        module = build_head(cfg.head.name, plan.dim, plan.num_classes, cfg.head.scale, plan.init, plan.whiten).to(device)
        loss = build_loss(cfg.head.loss, plan.real_counts + plan.syn_counts, cfg.head.tau)
        if plan.neighbours is not None:  # auxiliary classes: the neighbour-silencing loss
            loss = silenced(loss, silencing_mask(np.asarray(plan.neighbours, bool)))
        opt, sched = make_optimizer(module, cfg.train)
        g = plan.gaussians if gaussians is None else gaussians
        sampler = GaussianSampler(g, device) if g is not None else None
        return Training(module, loss, opt, sched, sampler)

    def run_epochs(self, training: Training, plan: HeadPlan, x, y, epochs: range, rank: int = 0, world: int = 1,
                   steps=None, keep=None, module=None) -> Iterator:
        """(epoch, EpochStats) after each of `epochs` over this rank's real rows (x, y tensors;
        `keep`: selection bits); `module` the wrapped head a worker steps (DDP), default the plain one."""
        from raylt.head.loop import train_epochs

        cfg = self.config()
        return train_epochs(module or training.module, training.loss, training.opt, training.sched, x, y,
                            training.sampler, plan.syn_counts, cfg.seed, cfg.train, epochs, rank, world, steps, keep,
                            cfg.selection.every)

    def finish(self, state: dict, plan: HeadPlan, val=None, adapter: dict | None = None,
               no_val: str = "off: no val rows") -> tuple[HeadArtifact, dict]:
        """(the served head, what was chosen) from the trained head's state dict: its target
        rows, then the post-hoc offsets and the temperature chosen on `val` = (embeddings,
        labels), or switched off for the reason `no_val` when `val` is None."""
        cfg = self.config()
        art = HeadArtifact.from_state(state, cfg.head.name, cfg.head.scale, plan.num_targets, adapter)
        info: dict = {}
        z = art.logits(val[0]) if val is not None else None
        f = offsets(cfg.head.posthoc, plan.data_counts)
        if f is not None:
            tau, source = cfg.head.posthoc_tau, "config"
            if tau is None and val is None:
                tau, source = 0.0, no_val
                log.info("post-hoc %s offsets off: no val split to choose tau on apart from the evaluation split; "
                         "set head.posthoc_tau, or add a val split", cfg.head.posthoc)
            elif tau is None:
                tau, scores = choose_tau(z, val[1], f)
                source = "val"
                log.info("post-hoc %s offsets: tau %g on the val split (balanced top-1 %.4f, %.4f without)",
                         cfg.head.posthoc, tau, scores[tau], scores[0.0])
            art = art.add_to_bias(tau * f)
            z = z + tau * f if z is not None else None
            info.update(posthoc=cfg.head.posthoc, posthoc_tau=float(tau), posthoc_from=source)
        if cfg.head.calibrate:
            if val is None:
                log.info("temperature off: no val split to fit it on apart from the evaluation split")
                info.update(temperature=1.0, temperature_from=no_val)
            else:
                t = fit_temperature(z, val[1])
                art, z = art.divide_logits(t), z / t
                log.info("temperature %.3f fitted on the val split", t)
                info.update(temperature=t, temperature_from="val")
        if val is not None and len(val[1]):
            info.update(val_balanced=balanced_accuracy(z.argmax(1), val[1], plan.num_targets),
                        val_top1=float((z.argmax(1) == val[1]).mean()), val_nll=mean_nll(z, val[1], 1.0))
        return art, info

    # -- scikit-learn ----------------------------------------------------------------------
    def fit(self, X, y, X_val=None, y_val=None, on_epoch=None):
        """Fit on embeddings X [N, D] with labels y [N] (any hashable labels); the offsets'
        tau and the temperature are chosen on (X_val, y_val) when given, else switched off.
        `on_epoch(epoch, module, stats)` is called after each epoch (a sweep logs there)."""
        from raylt.latent.stats import class_moments
        from raylt.latent.transforms import TRANSFORMS

        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        cfg = self.config()  # every parameter validated before any work
        self.classes_, yi = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"LongTailHead needs at least 2 classes in y; got 1 class ({self.classes_[0]!r})")
        self._check_unit_norm(X, cfg, "X")
        c = len(self.classes_)
        counts = np.bincount(yi, minlength=c)
        moments = {t: class_moments(TRANSFORMS[t][0](X), yi, c, cfg.stats.rank) for t in self.statistics(cfg)}
        val = self._val(X_val, y_val, cfg)
        x, yr, keep, steps = X, yi, None, None
        if cfg.selection.name != "none":
            x, yr, keep, steps = self._selected(X, yi, cfg)
        plan = self.plan(moments, counts, X.shape[1], np.bincount(yr[(keep & 1) == 1] if keep is not None else yr, minlength=c))
        del moments
        self.artifact_, self.fit_info_ = self._train(plan, x, yr, keep, steps, val, on_epoch)
        return self

    def _val(self, X_val, y_val, cfg):
        if X_val is None:
            return None
        X_val = validate_data(self, X_val, reset=False, dtype=np.float32)
        self._check_unit_norm(X_val, cfg, "X_val")
        known = np.isin(y_val, self.classes_)
        if not known.all():
            raise ValueError(f"y_val holds labels absent from y, e.g. {np.asarray(y_val)[~known][0]!r}; "
                             "drop those rows or add the class to the train rows")
        return X_val, np.searchsorted(self.classes_, y_val)

    def _selected(self, X, yi, cfg):
        from raylt.methods.selection import num_rounds, round_steps, train_rows

        rounds = num_rounds(cfg.selection.every, cfg.train.epochs)
        rows = train_rows(X, yi, cfg.selection.name, cfg.selection.k, rounds, cfg.seed)
        return rows.x, rows.y, rows.keep, round_steps(rows, 1, cfg.train.batch_size)

    def _train(self, plan: HeadPlan, x, y, keep, steps, val, on_epoch=None):
        import torch

        from raylt.latent.sampling import shared_tensor

        dev = torch.device(self.device)
        training = self.start(plan, dev)
        xd, yd = shared_tensor(x, dev), torch.as_tensor(y, device=dev)
        kd = torch.as_tensor(keep, device=dev) if keep is not None else None
        self.history_ = []
        for epoch, st in self.run_epochs(training, plan, xd, yd, range(self.epochs), steps=steps, keep=kd):
            self.history_.append(dataclasses.asdict(st))
            if on_epoch is not None:
                on_epoch(epoch, training.module, st)
        return self.finish(training.module.state_dict(), plan, val)

    def _check_unit_norm(self, X, cfg, name: str) -> None:
        if cfg.sampler.name == "none" or not len(X):
            return
        norms = np.linalg.norm(X, axis=1)
        bad = np.abs(norms - 1) > _UNIT_NORM_TOL
        if bad.any():
            raise ValueError(f"{name} row {int(np.argmax(bad))} has norm {norms[bad][0]:.4g}: the sampler draws "
                             "unit-norm embeddings, so rows must be L2-normalised (X / ||X||, as CLIP embeddings "
                             "are), or use sampler='none'")

    def decision_function(self, X) -> np.ndarray:
        """Logits [N, C] (for two classes, the second's minus the first's [N], as scikit-learn's
        binary classifiers give)."""
        z = self._logits(X)
        return z[:, 1] - z[:, 0] if z.shape[1] == 2 else z

    def predict_proba(self, X) -> np.ndarray:
        return softmax(self._logits(X))

    def predict(self, X) -> np.ndarray:
        z = self._logits(X)
        return self.classes_[z.argmax(1)]

    def _logits(self, X) -> np.ndarray:
        check_is_fitted(self, "artifact_")
        X = validate_data(self, X, reset=False, dtype=np.float32)
        return self.artifact_.logits(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags
