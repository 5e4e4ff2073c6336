"""`unlearn bench SUITE`: every method of a suite over several seeds, with Retrain and the original model."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .checkpoints import write_json, write_text
from .errors import CheckpointNotFoundError, ConfigError
from .metrics import gap
from .recipe import apply_override, find_path, from_dict

MAIN_KEYS = ("UA", "RA", "TA", "MIA", "RTE_s")
# Representation columns ("Are We Truly Forgetting?"): CKA of forget / test features to the original and to
# Retrain, and how well a linear probe still reads the forgotten data out of the frozen features.
REPRESENTATION_KEYS = ("CKA_forget_original", "CKA_forget_retrain", "CKA_test_retrain", "probe_forget")
# Generative suites (concept / class erasure from diffusion models): judged generations and FID.
GENERATIVE_KEYS = (
    "erasure_rate",
    "erasure_rate_paraphrase",
    "retain_accuracy",
    "neighbor_accuracy",
    "unrelated_accuracy",
    "fid",
    "clip_score",
)
# GAN suites (class erasure from an unconditional generator): the judged share of the class, its reduction,
# judge confidence, FID to real retained images and to the original generator's retained-class samples.
GAN_KEYS = ("erasure_reduction", "confident", "fid_original")


@dataclass
class Suite:
    name: str
    recipes: str  # folder holding <method>.yaml
    methods: list
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    reference: str = "retrain"
    overrides: list = field(default_factory=list)
    method_overrides: dict = field(default_factory=dict)  # {method: [overrides]}, the task's own settings
    description: str = ""
    source: str = ""


def load_suite(path: str | Path) -> Suite:
    path = find_path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"suite {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"suite {str(path)!r} is not readable YAML") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"suite {str(path)!r} must be a YAML mapping")
    known = set(Suite.__dataclass_fields__) - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in suite {str(path)!r}; known: {', '.join(sorted(known))}"
        )
    try:
        suite = Suite(**raw, source=str(path))
    except TypeError as err:
        raise ConfigError(f"suite {str(path)!r}: {err}") from err
    if suite.reference in suite.methods:
        suite.methods = [m for m in suite.methods if m != suite.reference]
    return suite


def suite_recipe(suite: Suite, method: str, seed: int):
    """The recipe of one (method, seed) cell: `<recipes>/<method>.yaml`, the suite's overrides, then the
    method's own (`method_overrides`: e.g. the learning rate a method needs for random forgetting)."""
    path = find_path(Path(suite.recipes) / f"{method}.yaml")
    if not path.exists():
        raise CheckpointNotFoundError(f"suite {suite.name!r}: recipe {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text())
    for item in [*suite.overrides, *suite.method_overrides.get(method, [])]:
        apply_override(raw, item)
    raw["seed"] = seed
    raw.setdefault("eval", {})["reference"] = None
    return from_dict(raw, source=str(path))


def check_suite(suite: Suite) -> None:
    unknown = sorted(set(suite.method_overrides) - {suite.reference, *suite.methods})
    if unknown:
        raise ConfigError(
            f"suite {suite.name!r}: method_overrides names {unknown[0]!r}, which the suite does not run"
        )
    for method in [suite.reference, *suite.methods]:
        suite_recipe(suite, method, suite.seeds[0])


def bench(suite_path: str | Path, output: str | Path | None = None, log=print) -> dict:
    """Run the suite; write `results.json` and `results.md` into `output`; return the results."""
    from .pipeline import run

    suite = load_suite(suite_path)
    check_suite(suite)
    output = Path(output or Path("runs") / "bench" / suite.name)
    rows = []
    for seed in suite.seeds:
        ref_dir = output / "runs" / suite.reference / f"seed{seed}"
        reference = run(suite_recipe(suite, suite.reference, seed), ref_dir, log=log)
        original = {k[len("original_") :]: v for k, v in reference.items() if k.startswith("original_")}
        original = {
            **_main(original),
            **_gap(original, reference),
            "RTE_s": 0.0,
            **_self_cka(reference, "original"),
        }
        rows.append({"method": "original", "seed": seed, **original})
        retrain = {**_main(reference), **_gap(reference, reference), **_self_cka(reference, "retrain")}
        rows.append({"method": suite.reference, "seed": seed, **retrain})
        for method in suite.methods:
            recipe = suite_recipe(suite, method, seed)
            recipe.eval.reference = str(ref_dir)
            metrics = run(recipe, output / "runs" / method / f"seed{seed}", log=log)
            rows.append({"method": method, "seed": seed, **_main(metrics), **_gap(metrics, reference)})
    order = ["original", suite.reference, *suite.methods]
    summary = {m: _summarize([r for r in rows if r["method"] == m]) for m in order}
    results = {
        "suite": suite.name,
        "description": suite.description,
        "seeds": suite.seeds,
        "reference": suite.reference,
        "rows": rows,
        "summary": summary,
    }
    write_json(results, output / "results.json")
    table = results_table(results)
    write_text(table, output / "results.md")
    log(table)
    return results


def _main(metrics: dict) -> dict:
    keys = (*MAIN_KEYS, *REPRESENTATION_KEYS, *GENERATIVE_KEYS, *GAN_KEYS)
    # several concepts erased together add one erasure column per concept (erasure_rate:<concept>)
    keys += tuple(k for k in metrics if ":" in k and k.split(":")[0] in GENERATIVE_KEYS)
    return {k: metrics[k] for k in keys if k in metrics}


def _gap(metrics: dict, reference: dict) -> dict:
    """SalUn's Avg. Gap for classifier rows; generative rows are compared column by column instead."""
    return gap(metrics, reference) if "UA" in metrics else {}


def _self_cka(reference: dict, row: str) -> dict:
    """CKA columns of the `original` and Retrain rows, from the Retrain run's CKA to the original (CKA is
    symmetric) and 100 for a model against itself."""
    if "CKA_forget_original" not in reference:
        return {}
    between = {"forget": reference["CKA_forget_original"], "test": reference["CKA_test_original"]}
    other = "retrain" if row == "original" else "original"
    out = {f"CKA_{part}_{row}": 100.0 for part in between}
    out.update({f"CKA_{part}_{other}": value for part, value in between.items()})
    return out


def _summarize(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        if key in ("method", "seed"):
            continue
        values = np.array([r[key] for r in rows], dtype=float)
        out[key] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        }
    return out


CLASSIFIER_TABLE = (
    ("UA", "UA"),
    ("RA", "RA"),
    ("TA", "TA"),
    ("MIA", "MIA"),
    ("avg_gap", "Avg. Gap"),
    ("CKA_forget_original", "CKA forget→orig"),
    ("CKA_forget_retrain", "CKA forget→Retrain"),
    ("CKA_test_retrain", "CKA test→Retrain"),
    ("probe_forget", "probe forget"),
    ("RTE_s", "RTE (s)"),
)
CLASSIFIER_LEGEND = (
    "UA, RA, TA, MIA in percent (mean ± std over seeds); Avg. Gap = mean |metric − Retrain| over "
    "UA, RA, TA, MIA, per seed; CKA = linear CKA (percent) of penultimate features on the forget / test "
    "set to the original model and to Retrain; probe forget = accuracy of a linear probe on frozen features "
    "on the forgotten data; `original` is the model before unlearning."
)
GENERATIVE_TABLE = (
    ("erasure_rate", "erasure (exact)"),
    ("erasure_rate_paraphrase", "erasure (paraphrase)"),
    ("retain_accuracy", "retained acc."),
    ("neighbor_accuracy", "neighbours acc."),
    ("unrelated_accuracy", "others acc."),
    ("fid", "FID (retained)"),
    ("RTE_s", "RTE (s)"),
)
_TITLES = dict(GENERATIVE_TABLE)
GENERATIVE_LEGEND = (
    "Erasure = share (percent) of generations from the erased concept's prompts (exact / paraphrases no "
    "method saw) that the judge classifies as the concept (several concepts: the mean, and each concept's "
    "own column); retained acc. = the judge's accuracy on generations of the kept classes, split into the "
    "neighbours of the erased concepts (the digits next to them) and the others; FID between those generations and real images of the kept classes "
    "(judge features); mean ± std over seeds; `original` is the model before unlearning."
)

GAN_TABLE = (
    ("erasure_rate", "erased class (%)"),
    ("erasure_reduction", "reduction (%)"),
    ("fid", "FID vs real (retained)"),
    ("fid_original", "FID vs original (retained)"),
    ("confident", "confident (%)"),
    ("RTE_s", "RTE (s)"),
)
GAN_LEGEND = (
    "Erased class = share (percent) of the generator's samples the judge classifies as the erased class; "
    "reduction = 100·(1 − that share / the original's); FID (judge features) of the samples judged as retained "
    "classes against real retained images and against the original generator's retained-class samples (the "
    "original row's value is the sampling noise floor); confident = samples judged with probability ≥ 0.9; "
    "mean ± std over seeds; `original` is the generator before unlearning; the RTE ratio is relative to the "
    "suite's reference row."
)


def results_table(results: dict) -> str:
    """The table a paper would print: mean ± std over seeds, and RTE relative to the reference. Classifier
    suites show UA / RA / TA / MIA / Avg. Gap and the representation columns; generative suites the judged
    erasure rates, retained accuracy and FID."""
    summary = results["summary"]
    ref_time = summary[results["reference"]]["RTE_s"]["mean"]
    columns, legend = (
        (CLASSIFIER_TABLE, CLASSIFIER_LEGEND)
        if "UA" in summary[results["reference"]]
        else (GENERATIVE_TABLE, GENERATIVE_LEGEND)
    )
    if (
        "fid_original" in summary[results["reference"]]
        or "erasure_reduction" in summary[results["reference"]]
    ):
        columns, legend = GAN_TABLE, GAN_LEGEND
    if columns is GENERATIVE_TABLE:  # one exact and one paraphrase column per concept erased together
        per_concept = [k for k in summary[results["reference"]] if ":" in k]
        columns = (
            columns[:2]
            + tuple((k, f"{_TITLES[k.split(':')[0]]}: {k.split(':')[1]}") for k in per_concept)
            + columns[2:]
        )
    reference = "Retrain" if results["reference"] == "retrain" else results["reference"]
    lines = [
        f"## {results['suite']} ({len(results['seeds'])} seed{'s' if len(results['seeds']) > 1 else ''})",
        "",
        "| method | " + " | ".join(title for _, title in columns) + f" | RTE / {reference} |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for method, stats in summary.items():
        cells = [_pm(stats.get(key)) for key, _ in columns]
        ratio = stats["RTE_s"]["mean"] / ref_time if ref_time and method != "original" else math.nan
        cells.append("–" if math.isnan(ratio) else f"{ratio:.2f}×")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", legend, ""]
    return "\n".join(lines)


def _pm(stat) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def load_results(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
