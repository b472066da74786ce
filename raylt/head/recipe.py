"""The head's recipe, `HeadRecipe`: its parameters and its pieces (pure core: arrays in, no Ray,
no files, no MLflow, no scikit-learn).

The recipe: class statistics of the train embeddings -> calibrated class Gaussians (the
sampler, raylt.latent.sampling) and the whitening (raylt.head.whiten) -> the head trained on
real rows mixed with fresh synthetic rows every epoch, with the long-tail loss
(raylt.head.loop, raylt.head.modules) -> post-hoc offsets tau f(n_c) chosen on the val rows
(raylt.head.posthoc) -> a temperature fitted on them (raylt.head.calibration). Without val
rows, those are chosen on a fit that holds out part of the train rows (`held_out`,
`held_choices`), and the head is fitted again on all of them. The result is a
`HeadArtifact`: what `head.npz` holds and the logged model serves.

It is the one implementation of the recipe. `raylt.LongTailHead` (raylt.head.estimator) is
this recipe as a scikit-learn estimator, whose `fit` runs the pieces in this process; the Ray
Train adapter (raylt.head.fit_ray) runs them apart: `plan` on the driver from the distributed
class statistics, `start` and `run_epochs` in each worker, `finish` on the driver. The
pipeline and its workers use this class, which does not import scikit-learn (0.7 s of a
seconds-long fit).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np

from raylt.config import RayltConfig, override
from raylt.config.schema import HeadConfig, SamplerConfig, SelectionConfig, StatsConfig, TrainConfig
from raylt.head.artifact import HeadArtifact
from raylt.head.calibration import fit_temperature, mean_nll
from raylt.head.posthoc import TAUS, balanced_accuracy, best_tau, choose_tau, offsets, row_blocks, tau_hits
from raylt.head.text import ensemble_weights, fold_ensemble, text_prior_moments, zero_shot_logits

log = logging.getLogger(__name__)

# Estimator parameter -> the config key it is (one name space: scikit-learn's get_params is flat).
PARAMS: dict[str, str] = {
    "sampler": "sampler.name", "target": "sampler.target", "kappa": "sampler.kappa",
    "neighbours": "sampler.neighbours", "eps": "sampler.eps", "base_min": "sampler.base_min",
    "rank": "stats.rank",
    "selection": "selection.name", "selection_k": "selection.k", "selection_every": "selection.every",
    "head": "head.name", "whiten_ridge": "head.whiten_ridge", "scale": "head.scale", "text_init": "head.text_init",
    "loss": "head.loss",
    "tau": "head.tau", "text_prior": "head.text_prior", "text_ensemble": "head.text_ensemble",
    "posthoc": "head.posthoc", "posthoc_tau": "head.posthoc_tau", "calibrate": "head.calibrate",
    "holdout": "head.holdout",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr",
    "weight_decay": "train.weight_decay", "precision": "train.precision",
    "seed": "seed",
}


# What `finish` chooses on held-out rows -> the metric that says where it came from.
_CHOICES = {"text_ensemble_weight": "text_ensemble", "posthoc_tau": "posthoc_from", "temperature": "temperature_from"}


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
    text: np.ndarray | None = None  # [num_targets, D] class text embeddings (raylt.head.text), None: none
    prior: dict | None = None  # what the text prior of the class means was (metrics)
    center: np.ndarray | None = None  # [D] mean of the raw class means: where zero-shot logits are centred

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


class HeadRecipe:
    """The recipe of a linear (or cosine) head for long-tailed classes of L2-normalised
    embeddings, as its pieces.

    Parameters are the recipe's config keys (`PARAMS`; `raylt config --reference` explains
    each); the defaults are raylt's default recipe. `device`: the torch device of training.
    """

    def __init__(self, sampler: str = SamplerConfig.name, target: int = SamplerConfig.target,
                 kappa: float = SamplerConfig.kappa, neighbours: int = SamplerConfig.neighbours,
                 eps: float = SamplerConfig.eps, base_min: int = SamplerConfig.base_min,
                 rank: int = StatsConfig.rank, selection: str = SelectionConfig.name,
                 selection_k: int = SelectionConfig.k, selection_every: int = SelectionConfig.every,
                 head: str = HeadConfig.name, whiten_ridge: float = HeadConfig.whiten_ridge,
                 scale: float = HeadConfig.scale, text_init: bool = HeadConfig.text_init, loss: str = HeadConfig.loss, tau: float = HeadConfig.tau,
                 text_prior: bool = HeadConfig.text_prior, text_ensemble: bool = HeadConfig.text_ensemble,
                 posthoc: str = HeadConfig.posthoc, posthoc_tau: float | None = HeadConfig.posthoc_tau,
                 calibrate: bool = HeadConfig.calibrate, holdout: float = HeadConfig.holdout, epochs: int = TrainConfig.epochs,
                 batch_size: int = TrainConfig.batch_size, lr: float = TrainConfig.lr,
                 weight_decay: float = TrainConfig.weight_decay, precision: str = TrainConfig.precision,
                 seed: int = 0, device: str = "cpu"):
        self.sampler, self.target, self.kappa, self.neighbours = sampler, target, kappa, neighbours
        self.eps, self.base_min, self.rank = eps, base_min, rank
        self.selection, self.selection_k, self.selection_every = selection, selection_k, selection_every
        self.head, self.whiten_ridge, self.scale, self.loss, self.tau = head, whiten_ridge, scale, loss, tau
        self.text_init = text_init
        self.text_prior, self.text_ensemble = text_prior, text_ensemble
        self.posthoc, self.posthoc_tau, self.calibrate, self.holdout = posthoc, posthoc_tau, calibrate, holdout
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.precision, self.seed, self.device = precision, seed, device

    # -- configuration ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: RayltConfig, device: str = "cpu"):
        """The estimator of a config's recipe (its sampler, stats, selection, head and train sections)."""
        def value(key: str):
            section, _, field = key.rpartition(".")
            return getattr(getattr(cfg, section) if section else cfg, field)

        return cls(**{p: value(k) for p, k in PARAMS.items()}, device=device)

    def get_params(self, deep: bool = True) -> dict:
        """The parameters, as scikit-learn's `get_params` gives them (what a worker is built from)."""
        return {**{p: getattr(self, p) for p in PARAMS}, "device": self.device}

    def config(self, base: RayltConfig | None = None) -> RayltConfig:
        """`base` (default: the defaults) with this estimator's parameters, validated like a
        config file: a bad value is a one-line ConfigError naming the parameter's key."""
        return override(base or RayltConfig(), {k: getattr(self, p) for p, k in PARAMS.items()},
                        "LongTailHead's parameters")

    # -- the recipe's pieces ---------------------------------------------------------------
    def statistics(self, cfg: RayltConfig | None = None) -> list[str]:
        """The feature transforms whose class moments `plan` needs (the sampler's space, and
        the raw space for a whitened head), in a fixed order."""
        from raylt.head.modules import HEADS
        from raylt.latent.sampling import SAMPLERS

        cfg = cfg or self.config()
        wanted = [SAMPLERS.get(cfg.sampler.name).transform, "identity" if HEADS.get(cfg.head.name).whitened else None]
        return [t for t in dict.fromkeys(wanted) if t]

    def moments_of(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
        """{transform: class moments} that `plan` needs, of rows held in memory."""
        from raylt.latent.stats import class_moments
        from raylt.latent.transforms import TRANSFORMS

        cfg = self.config()
        return {t: class_moments(TRANSFORMS[t][0](x), y, num_classes, cfg.stats.rank) for t in self.statistics(cfg)}

    def plan(self, moments: Mapping, data_counts: np.ndarray, dim: int, real_counts: np.ndarray | None = None,
             init: np.ndarray | None = None, neighbours: np.ndarray | None = None,
             text: np.ndarray | None = None) -> HeadPlan:
        """The plan of a fit from the class moments (`statistics()` transform -> ClassMoments
        of the train rows), the real train rows per target class, the embeddings' dimension,
        and optionally the real rows per class and epoch (auxiliary classes appended, selection
        applied; default `data_counts`), initial weights, the auxiliary silencing mask and the
        target classes' text embeddings [C, D] (the sampler's class means then take the text
        prior, `head.text_prior`, and `finish` the zero-shot ensemble, `head.text_ensemble`)."""
        from raylt.head.whiten import head_whitening
        from raylt.latent.sampling import SAMPLERS, synthetic_counts

        cfg = self.config()
        spec = SAMPLERS.get(cfg.sampler.name)
        data_counts = np.asarray(data_counts, np.int64)
        real = data_counts if real_counts is None else np.asarray(real_counts, np.int64)
        prior = None
        if text is not None and spec.transform and cfg.head.text_prior:
            shrunk, prior = text_prior_moments(moments[spec.transform], text)
            moments = {**moments, spec.transform: shrunk}
        gaussians = spec.build(moments[spec.transform], cfg.sampler) if spec.transform else None
        whiten = head_whitening(cfg.head, moments["identity"]) if "identity" in moments else None
        c = len(data_counts)
        syn = np.zeros(len(real), np.int64)
        if gaussians is not None:
            syn[:c] = synthetic_counts(real[:c], cfg.sampler.target, gaussians.valid)
        text = None if text is None else np.asarray(text, np.float32)
        center = None
        if text is not None and "identity" in moments:  # the raw space's moments (a whitened head, the Gaussian sampler)
            raw = moments["identity"]
            center = raw.means[: c][raw.counts[: c] > 0].mean(0)
        return HeadPlan(dim, c, data_counts, real, syn, gaussians, whiten, init, neighbours, text, prior, center)

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

    def chooses(self, text=None) -> bool:
        """Whether `finish` chooses anything on held-out rows (post-hoc tau, temperature, the
        ensemble's weight with class `text`): without a val split, a holdout fit is worth it."""
        h = self.config().head
        return ((h.posthoc != "none" and h.posthoc_tau is None) or h.calibrate
                or (text is not None and h.text_ensemble))

    def held_out(self, y: np.ndarray, num_classes: int) -> np.ndarray | None:
        """The train rows a holdout fit holds out (`head.holdout` of each class with 5+ rows,
        seeded), or None when it is off or no class has enough rows."""
        from raylt.head.posthoc import holdout

        cfg = self.config()
        held = holdout(y, num_classes, cfg.seed, cfg.head.holdout)
        return held if held.any() else None

    @staticmethod
    def held_choices(info: dict) -> dict:
        """What a holdout fit's `finish` chose, for the full fit's `finish(chosen=...)`, and
        its holdout scores as `holdout_*` metrics."""
        keep = {k: info[k] for k, source in _CHOICES.items() if info.get(source) == "val"}
        return {**keep, **{f"holdout_{k[4:]}": v for k, v in info.items() if k.startswith("val_")}}

    @staticmethod
    def _ensemble(art: HeadArtifact, z, plan: HeadPlan, val, f, chosen: dict, val_name: str):
        """(head, its val logits, what was chosen) with zero-shot CLIP's logits added at the
        weight (and post-hoc tau) of the best balanced accuracy on `val`, or at the weight a
        holdout fit chose (`chosen`), folded into W."""
        why = ("off: a cosine head" if art.kind != "linear" else
               "off: an adapter comes first" if art.adapter else
               None if val is not None or "text_ensemble_weight" in chosen else
               "off: no val rows to choose its weight on")
        if why:
            log.info("zero-shot ensemble %s", why.removeprefix("off: "))
            return art, z, {"text_ensemble": why}
        if val is None:
            alpha = float(chosen["text_ensemble_weight"])
            w, b = fold_ensemble(art.weight, art.bias, plan.text, alpha, center=plan.center)
            log.info("zero-shot ensemble: weight %.3g, as the holdout fit chose", alpha)
            return (dataclasses.replace(art, weight=w.astype(np.float32), bias=b.astype(np.float32)), None,
                    {"text_ensemble": "holdout", "text_ensemble_weight": alpha})
        c = plan.num_targets
        alphas = ensemble_weights(z, val[0], plan.text, plan.center)
        taus = TAUS if f is not None else (0.0,)
        # Every weight and tau scored in one pass over row blocks: [alphas, taus, classes] right rows.
        hits = np.zeros((len(alphas), len(taus), c))
        for b in row_blocks(len(val[1])):
            zs = zero_shot_logits(val[0][b], plan.text, center=plan.center).astype(np.float32)
            for i, a in enumerate(alphas):
                tau_hits(z[b] + np.float32(a) * zs, val[1][b], f, taus, hits[i])
        scores = [max(best_tau(h, val[1], taus)[1].values()) for h in hits]
        plain = balanced_accuracy(zero_shot_logits(val[0], plan.text).argmax(1), val[1], c)  # the floor, uncentred
        best = int(np.argmax(scores))  # the first best: the smallest weight among ties
        alpha = float(alphas[best])
        w, b = fold_ensemble(art.weight, art.bias, plan.text, alpha, center=plan.center)
        art = dataclasses.replace(art, weight=w.astype(np.float32), bias=b.astype(np.float32))
        log.info("zero-shot ensemble: weight %.3g on %s (balanced top-1 %.4f; head alone %.4f, "
                 "zero-shot alone %.4f)", alpha, val_name, scores[best], scores[0], plain)
        return art, art.logits(val[0]), {"text_ensemble": "val", "text_ensemble_weight": alpha,
                                         "val_balanced_zero_shot": plain}

    def finish(self, state: dict, plan: HeadPlan, val=None, adapter: dict | None = None,
               no_val: str = "off: no val rows", chosen: dict | None = None,
               val_name: str = "the val split") -> tuple[HeadArtifact, dict]:
        """(the served head, what was chosen) from the trained head's state dict: its target
        rows, then the zero-shot ensemble, the post-hoc offsets and the temperature chosen on
        `val` = (embeddings, labels); when `val` is None, taken from `chosen` (`held_choices` of
        a holdout fit), else switched off for the reason `no_val`. `val_name`: what the logs call `val`."""
        cfg = self.config()
        chosen = chosen or {}
        art = HeadArtifact.from_state(state, cfg.head.name, cfg.head.scale, plan.num_targets, adapter)
        info: dict = dict(plan.prior or {})
        z = art.logits(val[0]) if val is not None else None
        f = offsets(cfg.head.posthoc, plan.data_counts)
        if plan.text is not None and cfg.head.text_ensemble:
            art, z, picked = self._ensemble(art, z, plan, val, f, chosen, val_name)
            info.update(picked)
        if f is not None:
            tau, source = cfg.head.posthoc_tau, "config"
            if tau is None and val is None and "posthoc_tau" in chosen:
                tau, source = chosen["posthoc_tau"], "holdout"
                log.info("post-hoc %s offsets: tau %g, as the holdout fit chose", cfg.head.posthoc, tau)
            elif tau is None and val is None:
                tau, source = 0.0, no_val
                log.info("post-hoc %s offsets off: no val split to choose tau on apart from the evaluation split, "
                         "and no holdout; set head.posthoc_tau or head.holdout, or add a val split", cfg.head.posthoc)
            elif tau is None:
                tau, scores = choose_tau(z, val[1], f)
                source = "val"
                log.info("post-hoc %s offsets: tau %g on %s (balanced top-1 %.4f, %.4f without)",
                         cfg.head.posthoc, tau, val_name, scores[tau], scores[0.0])
            art = art.add_to_bias(tau * f)
            if z is not None:  # in place: an 8,142-class holdout's logits are gigabytes
                z += (tau * f).astype(z.dtype)
            info.update(posthoc=cfg.head.posthoc, posthoc_tau=float(tau), posthoc_from=source)
        if cfg.head.calibrate:
            if val is None and "temperature" in chosen:
                t = chosen["temperature"]
                art = art.divide_logits(t)
                log.info("temperature %.3f, as the holdout fit chose", t)
                info.update(temperature=t, temperature_from="holdout")
            elif val is None:
                log.info("temperature off: no val split to fit it on apart from the evaluation split")
                info.update(temperature=1.0, temperature_from=no_val)
            else:
                t = fit_temperature(z, val[1])
                art = art.divide_logits(t)
                z /= t
                log.info("temperature %.3f fitted on %s", t, val_name)
                info.update(temperature=t, temperature_from="val")
        info.update({k: v for k, v in chosen.items() if k.startswith("holdout_")})
        if val is not None and len(val[1]):
            info.update(val_balanced=balanced_accuracy(z.argmax(1), val[1], plan.num_targets),
                        val_top1=float((z.argmax(1) == val[1]).mean()), val_nll=mean_nll(z, val[1], 1.0))
        return art, info
