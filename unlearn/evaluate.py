"""The evaluation harness: run a model over the forget / retain / test sets and score it."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .data import UnlearnData
from .errors import ConfigError
from .metrics import METRICS, gap

CLASSIFIER_METRICS = ("UA", "RA", "TA", "MIA", "per_class")

__all__ = ["evaluate", "gap", "CLASSIFIER_METRICS"]


@torch.no_grad()
def _logits(model, dataset, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    outputs, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        outputs.append(model(images.to(device)).float().cpu())
        labels.append(targets)
    if not outputs:
        return torch.zeros(0, model.num_classes), torch.zeros(0, dtype=torch.long)
    return torch.cat(outputs), torch.cat(labels)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return math.nan
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


@torch.no_grad()
def evaluate(model, data: UnlearnData, names=CLASSIFIER_METRICS, batch_size: int = 256) -> dict[str, float]:
    """Score a classifier on an unlearning task.

    Args:
        model: a `Classifier` adapter.
        data: the task's forget / retain / test sets.
        names: which metrics to compute (see `unlearn.metrics.METRICS`).

    Returns:
        A flat dict: `UA`, `RA`, `TA`, `MIA` in percent, `forget_test_acc` (test accuracy on the forgotten
        classes, class-wise tasks) and `acc_class_<c>` per class.
    """
    from .metrics.classification import MEMBER, NONMEMBER, TARGET, MIAEfficacy, PerClassAccuracy

    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; known metrics: {', '.join(METRICS)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    forget = _logits(model, data.forget, batch_size, device)
    retain = _logits(model, data.retain, batch_size, device)
    test = _logits(model, data.test, batch_size, device)
    test_forget = _logits(model, data.test_forget, batch_size, device)
    results: dict[str, float] = {}
    if "UA" in names:
        results["UA"] = 100.0 - _accuracy(*forget)
    if "RA" in names:
        results["RA"] = _accuracy(*retain)
    if "TA" in names:
        results["TA"] = _accuracy(*test)
    if data.forget_classes:
        results["forget_test_acc"] = _accuracy(*test_forget)
    if "MIA" in names:
        # Members: the first |D_test| retain examples in dataset order (as the reference code takes them).
        members = min(len(data.test), len(data.retain))
        # No sync across processes: evaluate() sees the whole sets in one process (the pipeline scores on the
        # main process only), and a sync would wait forever for processes that are not computing.
        mia = MIAEfficacy(sync_on_compute=False)
        mia.update(retain[0][:members], retain[1][:members], MEMBER)
        mia.update(*test, NONMEMBER)
        mia.update(*forget, TARGET)
        results["MIA"] = float(mia.compute())
    if "per_class" in names:
        per_class = PerClassAccuracy(data.num_classes, sync_on_compute=False)
        per_class.update(torch.cat([test[0], test_forget[0]]), torch.cat([test[1], test_forget[1]]))
        for c, value in enumerate(per_class.compute().tolist()):
            results[f"acc_class_{c}"] = value
    model.train(was_training)
    return results


@torch.no_grad()
def evaluate_generation(
    model,
    data: UnlearnData,
    names=("erasure_rate", "erasure_rate_paraphrase", "retain_accuracy", "fid"),
    judge=None,
    samples: int = 100,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    batch_size: int = 256,
    fid_features: str = "judge",
    fid_cache=None,
    clip_model: str | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Score a diffusion model on a concept-erasure task by generating and judging (reference/evals.md §2).

    Every set is generated from fixed seeds (image i of a set always starts from the same noise), so scores
    and sample grids before and after unlearning compare the same draws.

    - `erasure_rate`: share (percent) of `samples` generations from the forget conditions (the exact prompts,
      or the class) that the judge classifies as the concept;
    - `erasure_rate_paraphrase`: the same on the paraphrases no method saw;
    - several concepts erased together (`prompts.parts`): `samples` generations per concept, scored against
      that concept's label (`erasure_rate:<concept>`, `erasure_rate_paraphrase:<concept>`); the plain keys
      are then the mean over concepts;
    - `retain_accuracy`: the judge's accuracy on `samples` generations per retained class (text models: spread
      over that class's prompts), and apart from it `neighbor_accuracy` on the classes next to the erased one
      (`prompts.neighbor_labels`: over-erasure shows there first) and `unrelated_accuracy` on the others;
    - `fid`: Fréchet distance between the retained generations and the real retained images (the retain
      set), on the judge's penultimate features (`fid_features: judge`, offline) or clean-fid's Inception;
    - `clip_score`: CLIP score of forget and retain generations against their prompts, with a local CLIP.

    Returns:
        The metrics and the generated images by set ("forget", "paraphrase", "retain"), for sample grids.
    """
    from .metrics.generation import clip_score, fid, judge_labels

    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric {unknown[0]!r}; known metrics: {', '.join(METRICS)}")
    prompts = data.prompts
    parts = prompts.split()
    needs_judge = {"erasure_rate", "erasure_rate_paraphrase", "retain_accuracy"} & set(names)
    if needs_judge and (judge is None or any(p.concept_label is None for p in parts)):
        raise ConfigError(
            f"metrics {sorted(needs_judge)} need a judge that knows the concept: set eval.judge and "
            "eval.concept_label (or drop them from eval.metrics)"
        )
    results: dict[str, float] = {}
    images: dict[str, torch.Tensor] = {}

    def draw(conditions: list, offset: int) -> torch.Tensor:
        return model.generate(
            model.as_conditions(conditions),
            steps=steps,
            guidance=guidance,
            seed=seed + offset,
            batch_size=batch_size,
        )

    def erasure(key: str, kind: str, offset: int) -> list:
        """`samples` generations per concept from its conditions of `kind`, and the share judged as the
        concept; returns the conditions."""
        conditions, labels, spans = [], [], []
        for part in parts:
            own = getattr(part, kind)
            if own:
                spans.append((part.concept, len(conditions), len(conditions) + samples))
                conditions += [own[i % len(own)] for i in range(samples)]
                labels += [part.concept_label] * samples
        metric = "erasure_rate" if key == "forget" else "erasure_rate_paraphrase"
        if not conditions:
            return conditions
        images[key] = draw(conditions, offset)
        if metric not in names:
            return conditions
        hits = judge_labels(judge, images[key]) == torch.tensor(labels)
        results[metric] = _share(hits)
        if len(parts) > 1:
            for concept, start, stop in spans:
                results[f"{metric}:{concept}"] = _share(hits[start:stop])
        return conditions

    forget = erasure("forget", "forget", 0)
    erasure("paraphrase", "paraphrases", 1)
    retain, labels = _per_label(prompts.retain, prompts.retain_labels, samples)
    if retain:
        images["retain"] = draw(retain, 2)
    if "retain_accuracy" in names and labels:
        labels = torch.tensor(labels)
        correct = judge_labels(judge, images["retain"]) == labels
        results["retain_accuracy"] = _share(correct)
        if prompts.neighbor_labels:
            near = torch.isin(labels, torch.tensor(prompts.neighbor_labels))
            results["neighbor_accuracy"] = _share(correct[near])
            results["unrelated_accuracy"] = _share(correct[~near])
    if "fid" in names and retain:
        cached = fid_cache is not None and Path(fid_cache).exists()  # real statistics computed once
        real = None if cached else torch.stack([data.retain[i][0] for i in range(len(data.retain))])
        extractor = "inception" if fid_features == "inception" else _features_of(judge)
        results["fid"] = fid(real, images["retain"], extractor, device=model.device, cache=fid_cache)
    if "clip_score" in names or clip_model:
        if clip_model is None:
            raise ConfigError("clip_score needs a local CLIP model folder: set eval.clip_model")
        if model.conditioning == "text":
            results["clip_score_forget"] = clip_score(
                images["forget"], forget, clip_model, device=model.device
            )
            if retain:
                results["clip_score"] = clip_score(images["retain"], retain, clip_model, device=model.device)
    return results, images


def _per_label(conditions: list, labels: list, per_label: int) -> tuple[list, list]:
    """`per_label` conditions for each judge label, cycling through that label's conditions in order."""
    if not labels:
        return [conditions[i % len(conditions)] for i in range(per_label)] if conditions else [], []
    by_label: dict = {}
    for condition, label in zip(conditions, labels):
        by_label.setdefault(label, []).append(condition)
    chosen, chosen_labels = [], []
    for label, group in by_label.items():
        chosen += [group[i % len(group)] for i in range(per_label)]
        chosen_labels += [label] * per_label
    return chosen, chosen_labels


def _features_of(judge):
    """The judge's penultimate features (a `Classifier`), else its logits, as FID's feature extractor."""
    return getattr(judge, "features", judge)


def _share(hits: torch.Tensor) -> float:
    return 100.0 * float(hits.float().mean()) if len(hits) else math.nan


# --------------------------------------------------------------------------------------------------------
# GANs (unconditional generators): judged samples


@torch.no_grad()
def evaluate_gan(
    model,
    label: int,
    names=("erasure_rate", "class_histogram", "confident", "fid", "fid_original"),
    judge=None,
    samples: int = 2000,
    seed: int = 0,
    real_retained: torch.Tensor | None = None,
    original_retained: torch.Tensor | None = None,
    fid_cache=None,
    batch_size: int = 256,
    confidence: float = 0.9,
) -> tuple[dict[str, float], torch.Tensor]:
    """Score an unconditional generator on erasing the judge's class `label` (reference/methods.md §4.5).

    `samples` images are drawn with `seed` (the same latents before and after unlearning) and judged:

    - `erasure_rate`: share (percent) of samples the judge classifies as `label` (lower is better);
    - `class_histogram`: the share of every judge class (keys `class_share_<c>`);
    - `confident`: share of samples the judge classifies with probability >= `confidence` (a quality proxy);
    - `fid`: Fréchet distance, on the judge's penultimate features, between the samples judged as a retained
      class and `real_retained` (real images of the retained classes; skipped when None);
    - `fid_original`: the same against `original_retained`, the original generator's samples judged as a
      retained class (drawn once, from other latents, so the original model's own value is the noise floor).

    Returns:
        The metrics and the samples (for sample grids).
    """
    from .metrics.generation import fid, judge_logits

    if judge is None:
        raise ConfigError("scoring a GAN needs a judge classifier: set eval.judge (or use the digits world)")
    images = model.sample(samples, seed=seed, batch_size=batch_size)
    probs = torch.softmax(judge_logits(judge, images, batch_size), dim=1)
    labels = probs.argmax(1)
    results: dict[str, float] = {}
    if "erasure_rate" in names:
        results["erasure_rate"] = _share(labels == label)
    if "class_histogram" in names:
        for c in range(probs.shape[1]):
            results[f"class_share_{c}"] = _share(labels == c)
    if "confident" in names:
        results["confident"] = _share(probs.max(1).values >= confidence)
    kept = images[labels != label]
    extractor = _features_of(judge)
    device = model.device
    if "fid" in names and real_retained is not None and len(kept) >= 2:
        results["fid"] = fid(real_retained, kept, extractor, device=device, cache=fid_cache)
    if "fid_original" in names and original_retained is not None and len(kept) >= 2:
        results["fid_original"] = fid(original_retained, kept, extractor, device=device)
    return results, images
