"""`unlearn bench SUITE`: every method of a suite over several seeds, with Retrain and the original model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .checkpoints import write_json, write_text
from .errors import CheckpointNotFoundError, ConfigError
from .harness import HARNESSES
from .recipe import apply_override, find_path, from_dict


@dataclass
class Suite:
    name: str
    recipes: str  # folder holding <method>.yaml
    methods: list
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    reference: str = "retrain"
    overrides: list = field(default_factory=list)
    method_overrides: dict = field(default_factory=dict)  # {method: [overrides]}, the task's own settings
    attacks: list = field(default_factory=list)  # eval.attacks of every method's run (not the reference's)
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
    # The reference run is not attacked itself: each method's run attacks it (and the original) as its control,
    # once per seed (the results are cached in the reference's folder).
    if suite.attacks and method != suite.reference:
        raw["eval"]["attacks"] = suite.attacks
    return from_dict(raw, source=str(path))


def check_suite(suite: Suite) -> str:
    """Validate every recipe of the suite; returns the model family they share."""
    unknown = sorted(set(suite.method_overrides) - {suite.reference, *suite.methods})
    if unknown:
        raise ConfigError(
            f"suite {suite.name!r}: method_overrides names {unknown[0]!r}, which the suite does not run"
        )
    families = {
        m: suite_recipe(suite, m, suite.seeds[0]).model.family for m in [suite.reference, *suite.methods]
    }
    if len(set(families.values())) > 1:
        raise ConfigError(f"suite {suite.name!r} mixes model families: {families}")
    return families[suite.reference]


def bench(suite_path: str | Path, output: str | Path | None = None, log=print) -> dict:
    """Run the suite; write `results.json` and `results.md` into `output`; return the results."""
    from .pipeline import run

    suite = load_suite(suite_path)
    family = check_suite(suite)
    harness = HARNESSES[family]
    output = Path(output or Path("runs") / "bench" / suite.name)
    rows = []
    for seed in suite.seeds:
        ref_dir = output / "runs" / suite.reference / f"seed{seed}"
        reference = run(suite_recipe(suite, suite.reference, seed), ref_dir, log=log)
        original, retrain = harness.reference_rows(reference)
        original = {"method": "original", "seed": seed, **original}
        retrain = {"method": suite.reference, "seed": seed, **retrain}
        rows += [original, retrain]
        for method in suite.methods:
            recipe = suite_recipe(suite, method, seed)
            recipe.eval.reference = str(ref_dir)
            metrics = run(recipe, output / "runs" / method / f"seed{seed}", log=log)
            rows.append({"method": method, "seed": seed, **harness.bench_row(metrics, reference)})
            if suite.attacks:
                from .attacks.run import attack_columns

                unlearned, original_row, retrain_row = attack_columns(metrics)
                rows[-1].update(unlearned)
                original.update(original_row)  # the same for every method: the first one's
                retrain.update(retrain_row)
    order = ["original", suite.reference, *suite.methods]
    summary = {m: _summarize([r for r in rows if r["method"] == m]) for m in order}
    results = {
        "suite": suite.name,
        "family": family,
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


def results_table(results: dict) -> str:
    """The table a paper would print: the family's columns (mean ± std over seeds; several concepts erased
    together add one column per concept after the columns they split), and RTE relative to the reference."""
    if "family" not in results:
        raise ConfigError(
            "these bench results name no model family (written by an older version); rerun the suite"
        )
    harness = HARNESSES[results["family"]]
    summary = results["summary"]
    ref_time = summary[results["reference"]]["RTE_s"]["mean"]
    present = list(summary[results["reference"]])
    split = [k for k in harness.columns if any(p.startswith(f"{k}:") for p in present)]
    columns: list[tuple[str, str]] = []
    for key in harness.columns:
        columns.append((key, harness.info(key).title))
        if split and key == split[-1]:
            columns += [(p, f"{harness.info(p).title}: {p.split(':', 1)[1]}") for p in present if ":" in p]
    legend = [harness.legend]
    attacked = [k for k in dict.fromkeys(k for stats in summary.values() for k in stats) if "." in k]
    if attacked:
        from .attacks.run import attack_info, attack_legend

        columns[-1:-1] = [(k, attack_info(k).title) for k in attacked]  # before RTE
        legend.append(attack_legend(attacked))
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
    lines += ["", *legend, ""]
    return "\n".join(lines)


def _pm(stat) -> str:
    if stat is None:
        return "–"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"
