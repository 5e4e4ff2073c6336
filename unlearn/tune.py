"""`method.lr: auto` (and `method.epochs: auto`): pick a classifier method's learning rate and epochs by a small,
budgeted search, so that a recipe tuned for one model can erase from an unfamiliar architecture.

Why: the recipes are tuned for the digits CNN and ResNet-18; on another model (a transformers ViT, say) the same
learning rate can erase the class and half the model with it. The search never looks at the test set:

1. A seeded `HELD_OUT_SHARE` of the retain set and `FORGET_HELD_OUT_SHARE` of the forget set are held out
   (at most `MAX_HELD` examples each); the rest (at most `MAX_FIT` examples each) is what each candidate
   unlearns.
2. Each candidate (a log grid of learning rates around the method's default, `LR_FACTORS`, and a few epoch
   counts, `EPOCH_CHOICES`, for the fields set to `auto`) runs the method from the original model with the
   run's seed, and is scored by its accuracy on the forget examples it unlearned (what UA measures) and on the
   held-out retain examples (what it kept). A second round tries the learning rates halfway (geometrically)
   between the best candidate and its grid neighbours (`refinements`).
3. The criterion: the forget accuracy lies within `FORGET_TOLERANCE` points of the target (Retrain's forget
   accuracy when the run has a Retrain reference, else 0 for class-wise forgetting), and the held-out retain
   accuracy stays within `eval.utility_margin` points of the original model's. Among the candidates that meet
   it, the one with the highest held-out retain accuracy wins (then the forget accuracy closest to the target,
   then fewer epochs, then the smaller learning rate); when none meets it, the one that misses it by the fewest
   points, and the log says so.

The search, its criterion and every candidate's scores go to `tune.json` in the run folder; a rerun of the same
folder (a resumed run) reads the chosen values back instead of searching again, so it trains the same method.
The recipe keeps `auto` (its fingerprint does not change); the metrics record `tuned_lr` / `tuned_epochs`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from .checkpoints import write_json
from .errors import ConfigError

AUTO = "auto"
AUTO_FIELDS = ("lr", "epochs")  # the method fields that may be `auto`
LR_FACTORS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # candidate learning rates: the method's default lr times these
EPOCH_CHOICES = (2, 5, 10)  # candidate epochs for `epochs: auto`
HELD_OUT_SHARE = 0.2  # of the retain set, held out to score the candidates
# of the forget set, held out (a class-wise task's forgetting should reach examples it did not see). Small: the
# candidates should make as many forget steps as the run will (a tenth fewer forget examples at batch 64 turned
# 3 random-label batches into 2 on the digits, and the chosen lr then broke the run's ViT).
FORGET_HELD_OUT_SHARE = 0.1
MAX_HELD = 1000  # held-out examples per set, at most
MAX_FIT = 5000  # examples per set a candidate unlearns, at most (the search's budget on large datasets)
FORGET_TOLERANCE = 5.0  # points of forget accuracy around the target that count as reached
SEARCH_FILE = "tune.json"


def auto_fields(recipe) -> list[str]:
    """The method fields the recipe sets to `auto`, in `AUTO_FIELDS` order."""
    return [name for name in AUTO_FIELDS if recipe.method_args.get(name) == AUTO]


def check_auto(recipe) -> None:
    """Refuse `auto` where the search cannot run, in one sentence (recipe validation, before anything loads):
    on a field other than lr / epochs, on a family other than classifiers, on a method without the field, and
    on random forgetting without a Retrain reference (nothing would say how much forgetting is enough)."""
    from .methods import get_method

    autos = [key for key, value in recipe.method_args.items() if value == AUTO]
    if not autos:
        return
    wrong = [key for key in autos if key not in AUTO_FIELDS]
    if wrong:
        raise ConfigError(
            f"method.{wrong[0]} cannot be auto: only method.lr and method.epochs are searched; give a value"
        )
    if recipe.model.family != "classifier":
        raise ConfigError(
            f"method.{autos[0]}: auto searches classifier methods only, and this recipe's model is a "
            f"{recipe.model.family}; give a value"
        )
    fields = {f.name: f for f in dataclasses.fields(get_method(recipe.method, recipe.model.family))}
    missing = [key for key in autos if key not in fields]
    if missing:
        raise ConfigError(
            f"method {recipe.method!r} has no {missing[0]} setting to search; drop method.{missing[0]}"
        )
    if recipe.data.forget_fraction is not None and not recipe.eval.reference:
        raise ConfigError(
            "method.lr / method.epochs: auto on random forgetting needs eval.reference (a Retrain recipe or run "
            "folder): Retrain's forget accuracy is the target the search aims for"
        )
    try:  # the method is built with `auto` in place (the resolved recipe, the run folder's fingerprint)
        get_method(recipe.method, recipe.model.family)(**recipe.method_args)
    except TypeError:
        raise ConfigError(
            f"method {recipe.method!r} cannot take {autos[0]}: auto (its other settings are checked against it); "
            "give a value"
        ) from None


def candidates(recipe) -> list[dict]:
    """The settings the search tries: the grid over the `auto` fields, the other fields as the recipe says."""
    from .methods import get_method

    fields = {f.name: f for f in dataclasses.fields(get_method(recipe.method, recipe.model.family))}
    autos = auto_fields(recipe)
    lrs = [float(f"{_default(fields['lr']) * f:.3g}") for f in LR_FACTORS] if "lr" in autos else [None]
    epochs = list(EPOCH_CHOICES) if "epochs" in autos else [None]
    return [{k: v for k, v in (("lr", lr), ("epochs", e)) if v is not None} for e in epochs for lr in lrs]


def tune_method(recipe, model, data, accelerator, reference: dict | None, output: Path, log=print):
    """The recipe's method with its `auto` fields chosen by the search (see the module's docstring), the
    search written to `output/tune.json` (main process); a `tune.json` of the same search is reused.

    Args:
        recipe: the run's `Recipe` (some method fields `auto`).
        model: the original model (left as it is: every candidate trains a copy).
        data: the run's `UnlearnData` (its test sets are never used).
        accelerator: the run's accelerator (its checkpoints and training log are switched off meanwhile).
        reference: the Retrain reference's metrics, or None.
        output: the run folder.
        log: where the search says what it chose.

    Returns:
        (method, chosen): the method instance to run, and {field: value} for the tuned fields.
    """
    grid = candidates(recipe)
    file = Path(output) / SEARCH_FILE
    earlier = _earlier_search(file, recipe, grid)
    if earlier is not None:
        log(f"tune: reusing the search in {file}: {_settings_text(earlier['chosen'])}")
        return _with_values(recipe, earlier["chosen"]), earlier["chosen"]
    search = search_settings(recipe, model, data, accelerator, reference, grid, log)
    if accelerator.is_main_process:
        write_json(search, file)
    chosen = search["chosen"]
    verdict = "meets the criterion" if search["met_criterion"] else "is the closest (none met the criterion)"
    log(
        f"tune: {_settings_text(chosen)} {verdict}; {len(search['candidates'])} candidates in "
        f"{search['seconds']:.0f} s ({file})"
    )
    return _with_values(recipe, chosen), chosen


def search_settings(recipe, model, data, accelerator, reference, grid: list[dict], log=print) -> dict:
    """Run every candidate of `grid` and pick one by the criterion; returns what `tune.json` holds."""
    from accelerate.utils import set_seed

    started = time.perf_counter()
    fit, held_forget, held_retain = split_for_search(data, recipe.seed)
    target, target_from = _target(data, reference)
    margin = recipe.eval.utility_margin
    batch = recipe.eval.batch_size
    original_retain = _accuracy(model, held_retain, batch)
    criterion = (
        f"forget accuracy on the unlearned forget examples within {FORGET_TOLERANCE:g} points of "
        f"{target:.1f} % ({target_from}), and held-out retain accuracy at least the original's "
        f"({original_retain:.1f} %) minus eval.utility_margin ({margin:g} points); among those, the highest "
        "held-out retain accuracy (then forget accuracy closest to the target, fewer epochs, smaller lr); when "
        "none meets it, the one that misses it by the fewest points"
    )
    tried: list[dict] = []
    rows: list[dict] = []

    def run_candidate(settings: dict) -> None:
        method = _with_values(recipe, settings)
        trial = copy.deepcopy(model)
        set_seed(recipe.seed)
        begun = time.perf_counter()
        trial = accelerator.unwrap_model(method.unlearn(trial, fit, accelerator))
        row = {
            **{k: getattr(method, k) for k in AUTO_FIELDS if hasattr(method, k)},
            "forget_acc": _accuracy(trial, fit.forget, batch),
            "held_forget_acc": _accuracy(trial, held_forget, batch),
            "held_retain_acc": _accuracy(trial, held_retain, batch),
            "seconds": round(time.perf_counter() - begun, 2),
        }
        row["miss"] = _miss(row, target, original_retain, margin)
        row["meets"] = row["miss"] == 0.0
        tried.append(settings)
        rows.append(row)
        log(
            f"tune: {_settings_text(settings)}: forget acc. {_pct(row['forget_acc'])}, held-out retain acc. "
            f"{_pct(row['held_retain_acc'])}{'' if row['meets'] else ' (misses the criterion)'}"
        )
        accelerator.free_memory()  # the candidate's prepared model and optimizer

    def best() -> int:
        return min(range(len(rows)), key=lambda i: _rank(rows[i], tried[i], target))

    project, message = (
        accelerator.project_configuration.project_dir,
        getattr(accelerator, "log_message", None),
    )
    accelerator.project_configuration.project_dir = None  # no checkpoints or train.jsonl of the candidates
    accelerator.log_message = lambda text: None
    try:
        for settings in grid:
            run_candidate(settings)
        for settings in refinements(tried, tried[best()]):
            run_candidate(settings)
    finally:
        accelerator.project_configuration.project_dir = project
        accelerator.log_message = message
    chosen = best()
    return {
        "method": recipe.method,
        "auto": auto_fields(recipe),
        "grid": grid,
        "criterion": criterion,
        "target_forget_acc": target,
        "target_from": target_from,
        "forget_tolerance": FORGET_TOLERANCE,
        "utility_margin": margin,
        "original_held_retain_acc": original_retain,
        "examples": {
            "forget_unlearned": len(fit.forget),
            "retain_unlearned": len(fit.retain),
            "forget_held_out": len(held_forget),
            "retain_held_out": len(held_retain),
            "seed": recipe.seed,
        },
        "candidates": rows,
        "chosen": tried[chosen],
        "met_criterion": rows[chosen]["meets"],
        "seconds": round(time.perf_counter() - started, 2),
    }


def refinements(tried: list[dict], best: dict) -> list[dict]:
    """The second round of the search: the learning rates halfway (geometrically) between the best candidate
    and its neighbours on the grid at the same epochs. Why: a learning rate that erases without harm often
    lies in a narrow band between one that forgets too little and one that breaks the model."""
    if "lr" not in best:
        return []
    lrs = sorted(s["lr"] for s in tried if s.get("epochs") == best.get("epochs"))
    at = lrs.index(best["lr"])
    neighbours = [lrs[i] for i in (at - 1, at + 1) if 0 <= i < len(lrs)]
    out = []
    for lr in neighbours:
        middle = {**best, "lr": float(f"{math.sqrt(lr * best['lr']):.3g}")}
        if middle not in tried:
            out.append(middle)
    return out


def split_for_search(data, seed: int):
    """(fit, held-out forget, held-out retain): `fit` is an `UnlearnData` of the forget and retain examples
    the candidates unlearn; the held-out parts score them. Its test sets are held-out retain / forget examples,
    never the run's test set (a method that looked at `data.test` would see held-out training data)."""
    from .data import UnlearnData

    generator = torch.Generator().manual_seed(seed)

    def split(dataset, share: float):
        order = torch.randperm(len(dataset), generator=generator)
        held = min(MAX_HELD, int(share * len(dataset)))
        return _subset(dataset, order[held : held + MAX_FIT].sort()[0]), _subset(
            dataset, order[:held].sort()[0]
        )

    forget_fit, forget_held = split(data.forget, FORGET_HELD_OUT_SHARE)
    retain_fit, retain_held = split(data.retain, HELD_OUT_SHARE)
    fit = UnlearnData(
        forget=forget_fit,
        retain=retain_fit,
        test=retain_held,
        test_forget=forget_held,
        num_classes=data.num_classes,
        forget_classes=data.forget_classes,
    )
    return fit, forget_held, retain_held


def _subset(dataset, indices: torch.Tensor):
    if hasattr(dataset, "subset"):
        return dataset.subset(indices)
    return torch.utils.data.Subset(dataset, indices.tolist())


def _target(data, reference: dict | None) -> tuple[float, str]:
    """The forget accuracy the search aims for, and where it comes from."""
    if reference is not None and isinstance(reference.get("UA"), (int, float)):
        return 100.0 - float(reference["UA"]), "Retrain's forget accuracy, 100 − its UA"
    if data.forget_classes:
        return 0.0, "class-wise forgetting: Retrain never saw the class"
    raise ConfigError(
        "method.lr / method.epochs: auto on random forgetting needs a Retrain reference with UA (eval.reference)"
    )


def _miss(row: dict, target: float, original_retain: float, margin: float) -> float:
    """Points by which a candidate misses the criterion (0: it meets it)."""
    forget = row["forget_acc"]
    retain = row["held_retain_acc"]
    if math.isnan(forget) or math.isnan(retain):
        return math.inf
    off_target = max(0.0, abs(forget - target) - FORGET_TOLERANCE)
    lost = max(0.0, original_retain - margin - retain)
    return round(off_target + lost, 4)


def _rank(row: dict, settings: dict, target: float) -> tuple:
    return (
        row["miss"],
        -row["held_retain_acc"],
        abs(row["forget_acc"] - target),
        settings.get("epochs", 0),
        settings.get("lr", 0.0),
    )


def _accuracy(model, dataset, batch_size: int) -> float:
    """Percent of `dataset` the model classifies correctly, to four decimals (NaN for an empty set)."""
    from .metrics.classification import dataset_accuracy

    return round(dataset_accuracy(model, dataset, batch_size), 4)


def _with_values(recipe, values: dict):
    """The recipe's method with `values` in place of its `auto` fields."""
    from .methods import get_method

    args = {**recipe.method_args, **values}
    return get_method(recipe.method, recipe.model.family)(**args)


def _default(field: dataclasses.Field):
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def _earlier_search(file: Path, recipe, grid: list[dict]) -> dict | None:
    """The search a previous segment of this run wrote (same method, fields and grid), or None."""
    if not file.is_file():
        return None
    try:
        earlier = json.loads(file.read_text())
    except (OSError, ValueError):
        return None  # a damaged file: search again
    same = (
        isinstance(earlier, dict)
        and earlier.get("method") == recipe.method
        and earlier.get("auto") == auto_fields(recipe)
        and earlier.get("grid") == grid
        and isinstance(earlier.get("chosen"), dict)
        and set(earlier["chosen"]) == set(grid[0])
    )
    return earlier if same else None


def _settings_text(settings: dict) -> str:
    return ", ".join(f"method.{k}={v:g}" for k, v in settings.items())


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.1f} %"


def tune_report_line(metrics: dict) -> list[str]:
    """report.md's line about the search, when the run tuned its method (`tuned_*` keys)."""
    tuned = {k[len("tuned_") :]: v for k, v in metrics.items() if k.startswith("tuned_")}
    if not tuned:
        return []
    return [
        "",
        f"Tuned by `auto` (search on held-out retain and forget examples, never the test set): "
        f"{_settings_text(tuned)}; the criterion, the candidates and their scores are in `{SEARCH_FILE}`.",
    ]
