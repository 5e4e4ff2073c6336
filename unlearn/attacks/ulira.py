"""U-LiRA and KLoM: per-example membership questions answered with shadow models (attacks.md §2.2, §2.3;
evals.md §1.7, §1.8).

The question is about the unlearning PROCEDURE, not about one model: for a training example x, can an attacker
tell a model that saw x and then had x unlearned from a model retrained without x? `target.role` names the
procedure attacked: "original" (no unlearning: the model trained on everything keeps x), "retrain" (retraining
without x: the control, indistinguishable by construction) or "unlearned" (the run's method with the run's
hyperparameters, `recipe.build_method().unlearn`). The model handed to `run` is not used.

Recipe (Hayes et al., SaTML 2025, U-LiRA; no official code; our scaled choice):
1. Pool P: a seeded random `pool` examples of the task's forget set (random forgetting: per-example questions);
   base retain set D_r0 = every other training example.
2. For each of `shadows` runs m: draw F_m ⊂ P (each example with probability 0.5, seeded);
   - "in": train θ_m on D_r0 ∪ P and apply the role's procedure to forget F_m → U_m (original: U_m = θ_m;
     retrain: U_m is a second retraining on D_r0 ∪ (P∖F_m) with its own seed; unlearned: the run's method);
   - "out": retrain on D_r0 ∪ (P∖F_m) → R_m.
   Every training is the digits world's recipe (`unlearn.worlds.digits.fit_digits_classifier`: SGD lr 0.05,
   momentum 0.9, weight decay 5e-4, batch 64, cosine) but for `epochs` epochs (default 10, the world's 30 / 3).
   θ_m and R_m are cached in memory per seed and settings: the three roles of one seed share them.
3. For x ∈ F_m record φ = log(p_y / (1 − p_y)) under U_m ("in") and R_m ("out"). (φ equals the KLoM margin
   logit_y − logsumexp_{j≠y} logit_j exactly, so one number serves both.)
4. U-LiRA: cross-fitted in two folds (even / odd runs): on one fold's runs fit per example x a Gaussian to each
   side (per-example means; one variance per side pooled over the examples, LiRA's "fixed variance" variant,
   since with M = 16 runs each example is forgotten in only ~4 runs of a fold); score the other fold's U and R
   observations of x by the log likelihood ratio log N(φ; in) − log N(φ; out), and swap the folds. An example
   never forgotten in the fitting fold gets that fold's mean over all examples.
   `success` = balanced accuracy of the test LR > 0 (in and out observations come in pairs, so it is the plain
   accuracy over all 2N of them: hits / trials); `tpr_at_1fpr` = share of "in" observations above the
   threshold that lets 1 % of the "out" ones through; `auc` of the LR score.
5. KLoM (Georgiev et al., ICLR 2025, App. E.1; binned KL of margins, clipped to ±100, `bins` equal-width bins
   over the joint range, eps 1e-5 on empty bins of q where p > 0, q renormalised as scipy's `entropy` does;
   direction KL(unlearned ‖ oracle)): per example x, the runs that forget x are split alternately into halves A
   and B; KLoM(x) = [KL(U_A ‖ R_B) + KL(U_B ‖ R_A)] / 2 and its noise floor [KL(R_A ‖ R_B) + KL(R_B ‖ R_A)] / 2
   compare the same numbers of models (half the runs each), so the floor is the value Retrain itself would get.
   Reported: mean and 95th percentile of KLoM over the pool, and the mean floor (`klom_floor`).

Departures from the references: M = 16 runs (the paper 32–64; KLoM's N 16–32 per side) and 10-epoch shadow
trainings, to fit a few CPU minutes per role; fixed-variance Gaussians; KLoM on the forget pool only (the paper
also reports retain and validation points); the split-half KLoM (each KL compares ~M/4 against ~M/4 models)
rather than all-against-all, so that the floor is comparable.

Cost, measured on one thread (digits CNN, 10 epochs ≈ 3 s of CPU per training; M = 16, pool = the 144
examples of digits_random10's forget set): "original" trains 2M = 32 models (96 s of CPU), "retrain" M = 16
more (44 s), "unlearned" only runs the method M times once the cache holds θ_m and R_m (5.5 s for
random_label's 1 epoch at lr 1e-3; 44 s for finetune's 10 epochs), or 2M trainings more when it runs alone.
Under the two-core machine's load these took 4, 3.5 and 0.5 min of wall time.

Measured (digits, 10 % random forgetting, seed 1; balanced accuracy %, TPR@1%FPR %, KLoM mean / floor):
original 53.2, 1.7, 7.10 / 7.25; retrain 50.6, 1.1, 7.04; random_label (lr 1e-3, 1 epoch) 71.5, 21.3, 8.13;
finetune 55.8, 2.4, 7.40; grad_ascent 56.4, 12.4, 5.86; salun 57.3, 5.5, 7.21 (seed 0: original 54.5,
retrain 52.1, random_label 69.9). On this world the original barely differs from Retrain on randomly forgotten
examples (the CNN generalises to them), so the residual R on `success` is ill-conditioned; what U-LiRA sees is
over-forgetting: random labels push the forgotten examples' margins below Retrain's. With so few models per
example the binned KL saturates near log(1 / 1e-5) ≈ 11.5 and one outlying margin (grad_ascent) stretches the
joint bin range and shrinks it below the floor: read KLoM against `klom_floor`, and prefer `success`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from ..data import UnlearnData
from ..datasets import ImageTensorDataset
from ..errors import ConfigError
from ..harness.base import MetricInfo
from ..progress import progress
from .base import Attack, Probe, Target, hyperparameter

ROLES = ("original", "retrain", "unlearned")
MARGIN_CLIP = 100.0
KL_EPS = 1e-5

# The shadow models of the latest (seed, settings, task): θ_m's weights and the R_m's logits on the pool. The
# runner attacks the three roles of one seed in a row, so one entry is kept.
_CACHE: dict[tuple, dict] = {}


@dataclass
class ULiRA(Attack):
    """U-LiRA and KLoM: tell the procedure's shadow models from retrained ones, example by example.

    U-LiRA's likelihood-ratio test (balanced accuracy, TPR at 1 % FPR) and KLoM share one set of shadow models."""

    name = "ulira"
    families = ("classifier",)
    success_meaning = (
        "balanced accuracy of a per-example likelihood-ratio test telling the role's unlearned shadow models "
        "from retrained ones (50 = indistinguishable from Retrain)"
    )
    metrics = {
        "tpr_at_1fpr": MetricInfo(
            "U-LiRA TPR@1%FPR",
            "share of unlearned observations flagged at a 1 % false-positive rate",
            "lower",
        ),
        "auc": MetricInfo("U-LiRA AUC", "area under the ROC of the likelihood-ratio score", "lower"),
        "klom_mean": MetricInfo(
            "KLoM mean",
            "mean over the pool of the binned KL between unlearned and retrained margins",
            "lower",
            "",
        ),
        "klom_p95": MetricInfo("KLoM p95", "95th percentile of the per-example KLoM", "lower", ""),
        "klom_floor": MetricInfo(
            "KLoM floor", "mean KLoM between two halves of the retrained ensemble (noise floor)", "lower", ""
        ),
    }

    shadows: int = hyperparameter(
        16, "shadow runs M: each draws F_m from the pool, one 'in' and one 'out' model"
    )
    epochs: int = hyperparameter(
        10, "epochs of each shadow training (the digits world's classifier trains 30)"
    )
    pool: int = hyperparameter(200, "examples of the forget set in the pool P (all of it when it is smaller)")
    bins: int = hyperparameter(10, "histogram bins of KLoM's binned KL divergence")

    def validate(self) -> None:
        self.require_int("shadows", "pool", low=2)
        self.require_int("epochs", "bins")

    def check(self, target: Target) -> None:
        if target.data.forget_classes:
            raise ConfigError(
                "ulira asks per-example questions: it needs random-example forgetting (data.forget_fraction), "
                "not class-wise forgetting"
            )
        if target.harness.recipe.data.dataset != "digits":
            raise ConfigError("ulira trains its shadow models with the digits world's recipe: digits only")
        if target.role not in ROLES:
            raise ConfigError(f"ulira attacks a procedure: role must be one of {', '.join(ROLES)}")
        if len(target.data.forget) < 2:
            raise ConfigError("ulira needs at least 2 forget examples; this task's forget set has fewer")

    def budget(self, target: Target) -> str:
        m = self.shadows
        trainings = {"original": 2 * m, "retrain": 3 * m, "unlearned": 2 * m}[target.role]
        extra = f" and {m} runs of the method" if target.role == "unlearned" else ""
        return (
            f"{trainings} shadow trainings of {self.epochs} epochs ({self.epochs / 30:.0%} of the original's "
            f"training each; {m} retrains shared by every role, {m} full trainings by original and unlearned)"
            f"{extra}; pool of {min(self.pool, len(target.data.forget))} examples"
        )

    def run(self, model, target: Target, seed: int) -> Probe:
        # Under a multi-process launch every process trains the same seeded shadow models (no collective call:
        # the classifier family's judging is not spread). The method's runs (role "unlearned") take the
        # launch's accelerate state, so there they shard their batches like a run's own method does.
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            shadows = self._shadows(target, seed)
            unlearned = self._in_logits(target, seed, shadows)
        labels = shadows["pool"].labels
        forgotten = shadows["forgotten"]
        phi_in, phi_out = margins(unlearned, labels), margins(shadows["out_logits"], labels)
        scores_in, scores_out = cross_fitted_scores(phi_in, phi_out, forgotten)
        correct = int((scores_in > 0).sum() + (scores_out <= 0).sum())
        trials = len(scores_in) + len(scores_out)
        klom, floor = klom_per_example(phi_in, phi_out, forgotten, self.bins)
        metrics = {
            "tpr_at_1fpr": tpr_at_fpr(scores_in, scores_out, 0.01),
            "auc": auc(scores_in, scores_out),
            "klom_mean": float(klom.mean()) if len(klom) else math.nan,
            "klom_p95": float(klom.quantile(0.95)) if len(klom) else math.nan,
            "klom_floor": float(floor.mean()) if len(floor) else math.nan,
        }
        target.log(
            f"ulira ({target.role}): balanced accuracy {100 * correct / trials:.1f} %, "
            f"KLoM {metrics['klom_mean']:.3f} (floor {metrics['klom_floor']:.3f}) "
            f"in {time.perf_counter() - started:.0f} s"
        )
        return Probe(100.0 * correct / trials, correct, trials, metrics)

    # -- shadow models ---------------------------------------------------------------------------------------

    def _shadows(self, target: Target, seed: int) -> dict:
        """The pool, the draws F_m, θ_m's weights and R_m's logits on the pool: cached per seed and settings."""
        data = target.data
        arch = target.harness.recipe.model.arch
        key = (seed, self.shadows, self.epochs, self.pool, arch, _fingerprint(data))
        if key in _CACHE:
            return _CACHE[key]
        _CACHE.clear()
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(data.forget), generator=generator)
        pool_idx, rest_idx = order[: self.pool], order[self.pool :]
        pool = _float(data.forget.subset(pool_idx))
        base = _joined(data.retain, data.forget.subset(rest_idx))
        forgotten = torch.rand(self.shadows, len(pool), generator=generator) < 0.5
        for row in forgotten:  # every run forgets at least one example and keeps at least one (tiny pools)
            if not row.any() or row.all():
                row.copy_(torch.arange(len(pool)) % 2 == torch.randint(0, 2, (1,), generator=generator))
        target.log(
            f"ulira: training {2 * self.shadows} shadow models ({self.epochs} epochs each) on a pool of "
            f"{len(pool)} examples"
        )
        trained, out_logits = [], []
        for m in progress(range(self.shadows), "ulira: shadow pairs", unit="pair"):
            full = fit(_joined(base, pool), arch, _seed(seed, m, 0), self.epochs)
            trained.append({k: v.clone() for k, v in full.state_dict().items()})
            kept = pool.subset((~forgotten[m]).nonzero().flatten())
            out_logits.append(logits(fit(_joined(base, kept), arch, _seed(seed, m, 1), self.epochs), pool))
        entry = {
            "pool": pool,
            "base": base,
            "forgotten": forgotten,
            "trained": trained,
            "out_logits": torch.stack(out_logits),
        }
        _CACHE[key] = entry
        return entry

    def _in_logits(self, target: Target, seed: int, shadows: dict) -> torch.Tensor:
        """The "in" models' logits on the pool (runs × pool × classes) under the role's procedure."""
        from ..models.classifier import build_classifier

        recipe = target.harness.recipe
        pool, base, forgotten = shadows["pool"], shadows["base"], shadows["forgotten"]
        accelerator = _cpu_accelerator(recipe) if target.role == "unlearned" else None
        method = recipe.build_method() if target.role == "unlearned" else None
        outputs = []
        for m in progress(range(self.shadows), f"ulira: {target.role} runs", unit="run"):
            forget = pool.subset(forgotten[m].nonzero().flatten())
            kept = _joined(base, pool.subset((~forgotten[m]).nonzero().flatten()))
            if target.role == "retrain":
                model = fit(kept, recipe.model.arch, _seed(seed, m, 2), self.epochs)
            else:
                model = build_classifier(recipe.model.arch, num_classes=pool.num_classes)
                model.load_state_dict(shadows["trained"][m])
                model.eval()
                if target.role == "unlearned":
                    task = UnlearnData(
                        forget=forget,
                        retain=kept,
                        test=target.data.test,
                        test_forget=target.data.test_forget,
                        num_classes=target.data.num_classes,
                    )
                    torch.manual_seed(_seed(seed, m, 3))
                    model = accelerator.unwrap_model(copy.deepcopy(method).unlearn(model, task, accelerator))
            outputs.append(logits(model, pool))
        return torch.stack(outputs)


# -- training and scoring helpers ----------------------------------------------------------------------------


def fit(dataset: ImageTensorDataset, arch: str, seed: int, epochs: int):
    """One shadow training: the digits world's recipe on `dataset`."""
    from ..worlds.digits import fit_digits_classifier

    return fit_digits_classifier(dataset, arch, seed, epochs)


@torch.no_grad()
def logits(model, dataset: ImageTensorDataset) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return model(dataset.images.to(device)).float().cpu()


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """φ = log(p_y / (1 − p_y)) = logit_y − logsumexp_{j≠y} logit_j, over the last dimension."""
    labels = labels.expand(logits.shape[:-1])
    true = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), -math.inf)
    return true - others.logsumexp(-1)


def cross_fitted_scores(
    phi_in: torch.Tensor, phi_out: torch.Tensor, forgotten: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log likelihood ratios of the "in" and "out" observations (x ∈ F_m) of each fold, with Gaussians fitted
    on the other fold (runs × pool tensors; see the module doc)."""
    runs = torch.arange(len(forgotten))
    scores_in, scores_out = [], []
    for fold in (0, 1):
        fitting, scoring = runs % 2 != fold, runs % 2 == fold
        mask = forgotten[fitting]
        gauss_in = _fixed_variance_gaussians(phi_in[fitting], mask)
        gauss_out = _fixed_variance_gaussians(phi_out[fitting], mask)
        test = forgotten[scoring]
        for phi, scores in ((phi_in[scoring], scores_in), (phi_out[scoring], scores_out)):
            ratio = _log_normal(phi, *gauss_in) - _log_normal(phi, *gauss_out)
            scores.append(ratio[test])
    return torch.cat(scores_in), torch.cat(scores_out)


def _fixed_variance_gaussians(phi: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example means of the observations `mask` selects (the mean over all of them where an example has
    none) and one standard deviation pooled over the examples."""
    counts = mask.sum(0)
    overall = phi[mask].mean() if mask.any() else torch.tensor(0.0)
    means = torch.where(counts > 0, (phi * mask).sum(0) / counts.clamp(min=1), overall)
    residuals = (phi - means)[mask]
    dof = int(mask.sum()) - int((counts > 0).sum())
    if dof > 0:
        variance = residuals.pow(2).sum() / dof
    else:  # one observation per example: the spread of the means
        variance = phi[mask].var() if mask.sum() > 1 else torch.tensor(1.0)
    return means, variance.clamp(min=1e-6).sqrt()


def _log_normal(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mean) / std) ** 2 - std.log()


def tpr_at_fpr(scores_in: torch.Tensor, scores_out: torch.Tensor, fpr: float) -> float:
    """Percent of "in" scores above the threshold that at most `fpr` of the "out" scores exceed."""
    if not len(scores_in) or not len(scores_out):
        return math.nan
    ranked = scores_out.sort(descending=True).values
    threshold = ranked[min(int(fpr * len(ranked)), len(ranked) - 1)]
    return 100.0 * float((scores_in > threshold).float().mean())


def auc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the ROC curve (percent): P(score_in > score_out), ties counted half."""
    if not len(scores_in) or not len(scores_out):
        return math.nan
    above = (scores_in[:, None] > scores_out[None, :]).float().mean()
    ties = (scores_in[:, None] == scores_out[None, :]).float().mean()
    return 100.0 * float(above + 0.5 * ties)


def klom_per_example(
    phi_in: torch.Tensor, phi_out: torch.Tensor, forgotten: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-half KLoM and its noise floor for each pool example forgotten in at least two runs."""
    klom, floor = [], []
    for example in range(forgotten.shape[1]):
        runs = forgotten[:, example].nonzero().flatten()
        if len(runs) < 2:
            continue
        half_a, half_b = runs[0::2], runs[1::2]
        u_a, u_b = phi_in[half_a, example], phi_in[half_b, example]
        r_a, r_b = phi_out[half_a, example], phi_out[half_b, example]
        klom.append((binned_kl(u_a, r_b, bins) + binned_kl(u_b, r_a, bins)) / 2)
        floor.append((binned_kl(r_a, r_b, bins) + binned_kl(r_b, r_a, bins)) / 2)
    return torch.tensor(klom), torch.tensor(floor)


def binned_kl(p_samples: torch.Tensor, q_samples: torch.Tensor, bins: int) -> float:
    """KL(p ‖ q) of two samples' histograms: clipped to ±100, `bins` equal-width bins over the joint range,
    eps on q's empty bins where p has mass, q renormalised (EasyDUB's `compute_binned_KL_div`)."""
    p_samples = p_samples.double().clamp(-MARGIN_CLIP, MARGIN_CLIP)
    q_samples = q_samples.double().clamp(-MARGIN_CLIP, MARGIN_CLIP)
    low = float(torch.minimum(p_samples.min(), q_samples.min()))
    high = float(torch.maximum(p_samples.max(), q_samples.max()))
    if high <= low:
        return 0.0
    p = torch.histc(p_samples, bins, low, high)
    q = torch.histc(q_samples, bins, low, high)
    p, q = p / p.sum(), q / q.sum()
    q = torch.where((p > 0) & (q == 0), torch.full_like(q, KL_EPS), q)
    q = q / q.sum()
    support = p > 0
    return float((p[support] * (p[support] / q[support]).log()).sum())


def _seed(seed: int, run: int, which: int) -> int:
    """A distinct training seed per (attack seed, run, model): 0 θ_m, 1 R_m, 2 Retrain's "in", 3 the method."""
    return 1_000 + 100_000 * seed + 4 * run + which


def _float(dataset: ImageTensorDataset) -> ImageTensorDataset:
    images = dataset.images.float() / 255.0 if dataset.images.dtype == torch.uint8 else dataset.images.float()
    return ImageTensorDataset(images, dataset.labels, dataset.num_classes, dataset.name)


def _joined(*datasets: ImageTensorDataset) -> ImageTensorDataset:
    parts = [_float(d) for d in datasets]
    return ImageTensorDataset(
        torch.cat([d.images for d in parts]),
        torch.cat([d.labels for d in parts]),
        parts[0].num_classes,
        parts[0].name,
    )


def _fingerprint(data: UnlearnData) -> tuple:
    return (
        len(data.forget),
        len(data.retain),
        float(data.forget.images.float().sum()),
        float(data.retain.images.float().sum()),
    )


def _cpu_accelerator(recipe):
    """A plain single-process CPU accelerator with the recipe's `train` section (no run folder: no checkpoints,
    no logs), quiet: the method's loops would otherwise print every epoch of every shadow run."""
    from accelerate import Accelerator

    from ..train import reset_accelerate_state

    reset_accelerate_state("no", True)
    accelerator = Accelerator(cpu=True)
    accelerator.train_spec = recipe.train
    accelerator.log_message = lambda *args, **kwargs: None
    return accelerator
