"""Feature probe: is the forgotten class still written in the representation? A fresh linear head on the frozen
penultimate features, fitted on the retained training data plus k examples of the forgotten class, classifies
the forgotten class's held-out test examples.

The attacker of "An Illusion of Unlearning?" and "Are We Truly Forgetting?" (reference/evals.md §1.6,
attacks.md §2.4) reads the forgotten data out of frozen features: an unlearning that only changed the head
(a masked or pushed-down logit) leaves the features, and so this attack's success, exactly the original's (R = 1),
whatever the head now says. Retrain's features never learned the class, but features of the other digits still
separate it partly: its success is the floor, and R compares with it.

1. Features of the retain set and of the first k forget training examples (a shuffle seeded by the attack's
   seed, the same k on every model), from `model.features` in eval mode.
2. A standardised multinomial logistic regression (scikit-learn, lbfgs, C = 1) fitted on them: the retained
   classes from every retained example, the forgotten class from its k examples (each k example weighted so
   that the class counts as much as an average retained class: with k = 5 the probe would otherwise learn to
   never predict it).
3. `success` = its accuracy on the held-out test examples of the forgotten class (all ten classes may be
   predicted); `retained` = its accuracy on the test examples of the kept classes.

Departure: UUEF transfers with 5-NN and the harness's `probe_forget` fits on 80 % of each class; this attack
gives the probe only k examples of the forgotten class, as an attacker holding a handful would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..harness.base import MetricInfo
from .base import Attack, Probe, Target, hyperparameter


@dataclass
class FeatureProbe(Attack):
    """A fresh linear head on frozen features, given k forgotten examples: is the class still in the features?"""

    name = "feature_probe"
    families = ("classifier",)
    success_meaning = (
        "accuracy of a linear probe on frozen features (fitted on retain data + k forgotten examples) on the "
        "forgotten class's held-out test examples"
    )
    metrics = {
        "retained": MetricInfo(
            "probe retained acc.", "the probe's accuracy on the kept classes' test examples", "higher"
        ),
    }

    shots: int = hyperparameter(5, "k: examples of the forgotten class the probe is fitted on")
    batch_size: int = hyperparameter(256, "images per forward pass when extracting features")

    def validate(self) -> None:
        self.require_int("shots", "batch_size")  # shots >= 1: a probe cannot predict a class it never saw

    def check(self, target: Target) -> None:
        if not target.data.forget_classes or not len(target.data.test_forget):
            raise ConfigError(
                "feature_probe needs a class-wise task (data.forget_class) with held-out test examples"
            )

    def budget(self, target: Target) -> str:
        return (
            f"{self.shots} forgotten training examples and all {len(target.data.retain)} retained ones; one "
            "logistic-regression fit, no gradient step on the model"
        )

    def run(self, model, target: Target, seed: int) -> Probe:
        # Under a multi-process launch every process fits the same seeded probe (no collective call).
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        from ..metrics.representation import _features

        data = target.data
        order = torch.randperm(len(data.forget), generator=torch.Generator().manual_seed(seed))
        shots = torch.utils.data.Subset(data.forget, order[: self.shots].tolist())
        retain_x, retain_y = _features(model, data.retain, self.batch_size)
        shot_x, shot_y = _features(model, shots, self.batch_size)
        x = torch.cat([retain_x, shot_x]).numpy()
        y = torch.cat([retain_y, shot_y]).numpy()
        weights = np.ones(len(y))
        average = len(retain_y) / max(1, len(np.unique(retain_y.numpy())))
        weights[len(retain_y) :] = average / self.shots
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
        probe.fit(x, y, logisticregression__sample_weight=weights)
        forget_x, forget_y = _features(model, data.test_forget, self.batch_size)
        test_x, test_y = _features(model, data.test, self.batch_size)
        hits = probe.predict(forget_x.numpy()) == forget_y.numpy()
        retained = 100.0 * float(np.mean(probe.predict(test_x.numpy()) == test_y.numpy()))
        return Probe(100.0 * float(hits.mean()), int(hits.sum()), len(hits), {"retained": retained})
