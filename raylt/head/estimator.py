"""The head's recipe as one scikit-learn estimator, `LongTailHead` (pure core: arrays in, no Ray,
no files, no MLflow).

`fit` runs the recipe's pieces (raylt.head.recipe's `HeadRecipe`, the one implementation, which
the pipeline's Ray Train stage runs apart) in this process: class statistics of X, the plan,
the epochs, then the post-hoc offsets and the temperature chosen on (X_val, y_val). Tune
trials, ablations and benchmarks fit through it.

Inputs are L2-normalised embeddings (CLIP's are): the sampler draws on the unit sphere, so with
a sampler on, rows that are not unit-norm are refused (`sampler="none"` takes any rows).
Deterministic for a `seed` on CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from raylt.head.artifact import softmax
from raylt.head.recipe import HeadPlan, HeadRecipe

_UNIT_NORM_TOL = 1e-3


class LongTailHead(ClassifierMixin, BaseEstimator, HeadRecipe):
    """A linear (or cosine) head for long-tailed classes of L2-normalised embeddings: the
    recipe (`HeadRecipe`) as a scikit-learn classifier.

    Parameters are the recipe's config keys (`PARAMS`; `raylt config --reference` explains
    each); the defaults are raylt's default recipe. `device`: the torch device of training.
    """

    def fit(self, X, y, X_val=None, y_val=None, on_epoch=None, class_text=None):
        """Fit on embeddings X [N, D] with labels y [N] (any hashable labels); the offsets'
        tau, the zero-shot ensemble's weight and the temperature are chosen on (X_val, y_val)
        when given, else on a fit that holds out `holdout` of each class with 5+ rows (then
        the head is refitted on all of X), else switched off. `class_text`: the classes' CLIP text embeddings, [C, D]
        in the order of `classes_` (the sorted labels) or a mapping label -> vector; with it the
        text prior (`text_prior`) and the zero-shot ensemble (`text_ensemble`) are used, and
        `text_init` starts the head's weights at them.
        `on_epoch(epoch, module, stats)` is called after each epoch (a sweep logs there)."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        cfg = self.config()  # every parameter validated before any work
        self.classes_, yi = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"LongTailHead needs at least 2 classes in y; got 1 class ({self.classes_[0]!r})")
        self._check_unit_norm(X, cfg, "X")
        val = self._val(X_val, y_val, cfg)
        text = self._class_text(class_text, X.shape[1])
        chosen = None
        held = self.held_out(yi, len(self.classes_)) if val is None and self.chooses(text) else None
        if held is not None:  # choose on a fit of the rest, then refit on every row
            _, info = self._fit_rows(X[~held], yi[~held], cfg, text, (X[held], yi[held]), val_name="the holdout")
            chosen = {**self.held_choices(info), "holdout_rows": int(held.sum())}
        self.artifact_, self.fit_info_ = self._fit_rows(X, yi, cfg, text, val, on_epoch, chosen)
        return self

    def _fit_rows(self, X, yi, cfg, text, val, on_epoch=None, chosen=None, val_name="the val split"):
        c = len(self.classes_)
        counts = np.bincount(yi, minlength=c)
        moments = self.moments_of(X, yi, c)
        x, yr, keep, steps = X, yi, None, None
        if cfg.selection.name != "none":
            x, yr, keep, steps = self._selected(X, yi, cfg)
        real = np.bincount(yr[(keep & 1) == 1] if keep is not None else yr, minlength=c)
        init = text if text is not None and cfg.head.text_init else None  # the head starts at the text classifier
        plan = self.plan(moments, counts, X.shape[1], real, init, text=text)
        del moments
        return self._train(plan, x, yr, keep, steps, val, on_epoch, chosen, val_name)

    def _class_text(self, class_text, dim: int):
        if class_text is None:
            return None
        if isinstance(class_text, Mapping):
            missing = [c.item() if isinstance(c, np.generic) else c for c in self.classes_ if c not in class_text]
            if missing:
                raise ValueError(f"class_text has no vector for class {missing[0]!r} ({len(missing)} missing); "
                                 "give one per class of y")
            class_text = [class_text[c] for c in self.classes_]
        t = np.asarray(class_text, np.float32)
        if t.ndim != 2 or len(t) != len(self.classes_) or t.shape[1] != dim:
            raise ValueError(f"class_text has shape {t.shape}; expected ({len(self.classes_)}, {dim}): one row per "
                             "class of y, in the order of classes_, as long as the embeddings")
        if not np.isfinite(t).all() or (np.linalg.norm(t, axis=1) == 0).any():
            raise ValueError("class_text has a zero or non-finite row; every class needs a text embedding")
        return t

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

    def _train(self, plan: HeadPlan, x, y, keep, steps, val, on_epoch=None, chosen=None, val_name="the val split"):
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
        return self.finish(training.module.state_dict(), plan, val, chosen=chosen, val_name=val_name)

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
