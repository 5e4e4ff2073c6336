"""`unlearn bench SUITE`: every method of a suite over several seeds, with Retrain and the original model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoints import write_json, write_text
from .errors import CheckpointNotFoundError, ConfigError
from .harness import HARNESSES
from .recipe import apply_override, find_path, from_dict, read_yaml


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
    if not path.exists() and not path.is_symlink():
        raise CheckpointNotFoundError(f"suite {str(path)!r} does not exist")
    raw = read_yaml(path, "suite")
    if not isinstance(raw, dict):
        raise ConfigError(f"suite {str(path)!r} must be a YAML mapping")
    known = set(Suite.__dataclass_fields__) - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in suite {str(path)!r}; known: {', '.join(sorted(known))}"
        )
    missing = sorted({"name", "recipes", "methods"} - set(raw))
    if missing:
        raise ConfigError(f"suite {str(path)!r} needs {', '.join(map(repr, missing))}; add it (see evals/)")
    suite = Suite(**raw, source=str(path))
    _check_fields(suite, f"suite {str(path)!r}")
    if suite.reference in suite.methods:
        suite.methods = [m for m in suite.methods if m != suite.reference]
    return suite


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(suite: Suite, where: str) -> None:
    """Each setting of a suite, its type and range, in one sentence (before any recipe is read)."""

    def names(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value)

    if (
        not isinstance(suite.name, str)
        or not suite.name.strip()
        or "/" in suite.name
        or suite.name in (".", "..")
    ):
        raise ConfigError(f"{where}: name must be a non-empty name without '/', got {suite.name!r}")
    if not isinstance(suite.recipes, str) or not suite.recipes.strip():
        raise ConfigError(f"{where}: recipes must be the folder holding <method>.yaml, got {suite.recipes!r}")
    if not names(suite.methods) or not suite.methods:
        raise ConfigError(f"{where}: methods must list at least one method name, got {suite.methods!r}")
    twice = sorted({m for m in suite.methods if suite.methods.count(m) > 1})
    if twice:
        raise ConfigError(f"{where}: method {twice[0]!r} is listed twice in methods; list each once")
    bad = [m for m in suite.methods if "/" in m or m.startswith(".")]
    if bad:
        raise ConfigError(f"{where}: methods names recipe files <method>.yaml, not paths; got {bad[0]!r}")
    if not isinstance(suite.seeds, list) or not suite.seeds:
        raise ConfigError(
            f"{where}: seeds must list at least one seed (e.g. seeds: [0, 1, 2]), got {suite.seeds!r}"
        )
    if not all(_is_int(seed) and 0 <= seed < 2**32 for seed in suite.seeds):
        raise ConfigError(f"{where}: seeds must be integers in 0..{2**32 - 1}, got {suite.seeds!r}")
    if len(set(suite.seeds)) < len(suite.seeds):
        raise ConfigError(f"{where}: seeds lists a seed twice ({suite.seeds}); list each once")
    if not isinstance(suite.reference, str) or not suite.reference.strip() or "/" in suite.reference:
        raise ConfigError(f"{where}: reference must be a method name (e.g. retrain), got {suite.reference!r}")
    if not names(suite.overrides):
        raise ConfigError(f"{where}: overrides must list section.key=value strings, got {suite.overrides!r}")
    if not isinstance(suite.method_overrides, dict) or not all(
        isinstance(k, str) and names(v) for k, v in suite.method_overrides.items()
    ):
        raise ConfigError(
            f"{where}: method_overrides must map a method to a list of section.key=value strings, got "
            f"{suite.method_overrides!r}"
        )
    if not isinstance(suite.attacks, list):
        raise ConfigError(f"{where}: attacks must list attack names or mappings, got {suite.attacks!r}")
    if not isinstance(suite.description, str):
        raise ConfigError(f"{where}: description must be text, got {suite.description!r}")


def suite_recipe(suite: Suite, method: str, seed: int):
    """The recipe of one (method, seed) cell: `<recipes>/<method>.yaml`, the suite's overrides, then the
    method's own (`method_overrides`: e.g. the learning rate a method needs for random forgetting)."""
    path = find_path(Path(suite.recipes) / f"{method}.yaml")
    if not path.exists():
        raise CheckpointNotFoundError(f"suite {suite.name!r}: recipe {str(path)!r} does not exist")
    raw = read_yaml(path, "recipe")
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping with at least a 'method' section")
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
    _check_fields(suite, f"suite {suite.name!r}")
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
    if not output:
        from .pipeline import _file_name

        output = Path("runs") / "bench" / _file_name(str(suite.name))  # one folder, whatever the name holds
    output = bench_folder(Path(output))
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


_BENCH_FILES = ("runs", "results.json", "results.md")


def bench_folder(output: Path) -> Path:
    """Create the bench's output folder, refusing before any run one that cannot be written or that holds
    anything but a bench's own files (`runs/`, `results.json`, `results.md`)."""
    from .paths import make_folder, output_error, shown

    make_folder(output)
    try:
        foreign = sorted(
            entry.name
            for entry in output.iterdir()
            if entry.name not in _BENCH_FILES
            and not any(entry.name.startswith(f".{own}.") for own in _BENCH_FILES)
        )
    except OSError as err:
        raise output_error(output, err) from None
    if foreign:
        raise ConfigError(
            f"{shown(output)} is not empty and holds no bench results (it is not a bench folder: "
            f"{', '.join(foreign[:3])}); choose another -o"
        )
    return output


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
