"""`unlearn bench SUITE`: every method of a suite over several seeds, with Retrain and the original model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoints import atomic_path, write_json, write_text
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
    """The suite at `path`, or the shipped suite of that short name (`digits_classwise`), checked field by
    field."""
    path = find_path(path, "suite")
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
    path = _suite_recipe_path(suite, method)
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


def _suite_recipe_path(suite: Suite, method: str) -> Path:
    """`<recipes>/<method>.yaml` of a suite: from the working directory, beside the suite file, or among the
    shipped recipes (`recipes/classifier/digits` or `classifier/digits`)."""
    relative = Path(suite.recipes) / f"{method}.yaml"
    beside = Path(suite.source).parent / relative if suite.source else None
    if not relative.exists() and beside is not None and beside.is_file():
        return beside
    try:
        return find_path(relative, "recipe")
    except CheckpointNotFoundError as err:
        raise CheckpointNotFoundError(f"suite {suite.name!r}: {err}") from None


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


def bench(suite_path: str | Path, output: str | Path | None = None, log=print, seeds=None) -> dict:
    """Run the suite; write `results.json` and `results.md` into `output`; return the results.

    `seeds`: run only these of the suite's seeds, so that several processes or machines can share a suite's
    seeds over one folder. Such a bench returns its seeds' results and writes no results files; the bench over
    every seed writes them, reusing the finished runs."""
    from .pipeline import run

    suite = load_suite(suite_path)
    family = check_suite(suite)
    if seeds is not None and (not seeds or set(seeds) - set(suite.seeds)):
        raise ConfigError(f"choose seeds among the suite's seeds {suite.seeds}, got {list(seeds)}")
    chosen = [s for s in suite.seeds if seeds is None or s in seeds]
    harness = HARNESSES[family]
    if not output:
        from .pipeline import _file_name

        output = Path("runs") / "bench" / _file_name(str(suite.name))  # one folder, whatever the name holds
    output = bench_folder(Path(output))
    rows = []
    for seed in chosen:
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
        "seeds": chosen,
        "reference": suite.reference,
        "overrides": list(suite.overrides),  # what the suite changed in every method's recipe
        "method_overrides": {m: list(v) for m, v in suite.method_overrides.items()},  # then in one method's
        "rows": rows,
        "summary": summary,
    }
    if chosen != suite.seeds:
        log(results_table(results))
        log(
            f"ran seeds {chosen} of {suite.seeds} into {output}; `unlearn bench` over every seed writes the results"
        )
        return results
    write_json(results, output / "results.json")
    chart = bench_chart(results, output / CHART_FILE)
    table = results_table(results, chart=chart.name if chart else None)
    write_text(table, output / "results.md")
    log(table)
    log(f"wrote {output / 'results.json'}, results.md" + (f" and {chart.name}" if chart else "") + " there")
    return results


CHART_FILE = "bench.png"
_BENCH_FILES = ("runs", "results.json", "results.md", CHART_FILE)


def bench_folder(output: Path) -> Path:
    """Create the bench's output folder, refusing before any run one that cannot be written or that holds
    anything but a bench's own files (`runs/`, `results.json`, `results.md`, `bench.png`)."""
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
    """Mean, sample standard deviation and number of seeds `n` of every metric of one method's rows; with one
    seed there is no spread, and `std` is None rather than a 0 that reads as one."""
    out = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        if key in ("method", "seed"):
            continue
        values = np.array([r[key] for r in rows if key in r], dtype=float)
        out[key] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values),
        }
    return out


def results_table(results: dict, chart: str | None = None) -> str:
    """The table a paper would print: the family's columns that the runs measured (mean ± std over the n
    seeds; with one seed, that seed's value and no spread; several concepts erased together add one column per
    concept after the columns they split), RTE relative to the reference, the overrides the suite applied, and
    a link to `chart` (a file beside results.md) when there is one."""
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
    columns = [(key, title) for key, title in columns if any(key in stats for stats in summary.values())]
    legend = [harness.legend]
    attacked = [k for k in dict.fromkeys(k for stats in summary.values() for k in stats) if "." in k]
    if attacked:
        from .attacks.run import attack_info, attack_legend

        columns[-1:-1] = [(k, attack_info(k).title) for k in attacked]  # before RTE
        legend.append(attack_legend(attacked))
    reference = "Retrain" if results["reference"] == "retrain" else results["reference"]
    seeds = len(results["seeds"])
    lines = [
        f"## {results['suite']} ({seeds} seed{'s' if seeds > 1 else ''}, n={seeds})",
        "",
        "| method | " + " | ".join(title for _, title in columns) + f" | RTE / {reference} |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for method, stats in summary.items():
        # the original model took no unlearning time: its RTE is no measurement
        cells = [
            _pm(stats.get(key), seeds) if (method, key) != ("original", "RTE_s") else "–"
            for key, _ in columns
        ]
        ratio = stats["RTE_s"]["mean"] / ref_time if ref_time and method != "original" else math.nan
        cells.append("–" if math.isnan(ratio) else f"{ratio:.2f}×")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if seeds == 1:
        legend.append("n=1: one seed, so each cell is that seed's value; there is no spread to show.")
    lines += ["", *legend, *_overrides_lines(results)]
    if chart:
        lines += ["", f"![each method's {_chart_title(results)} against its run time]({chart})"]
    lines.append("")
    return "\n".join(lines)


def _overrides_lines(results: dict) -> list[str]:
    """What the suite changed in the recipes, so a table is read with the settings that made it."""
    every, per_method = results.get("overrides", []), results.get("method_overrides", {})
    if not every and not per_method:
        return []
    lines = ["", "Overrides the suite applied to the recipes:"]
    if every:
        lines.append("- every method: " + ", ".join(f"`{item}`" for item in every))
    lines += [
        f"- {m}: " + ", ".join(f"`{item}`" for item in items) for m, items in per_method.items() if items
    ]
    return lines


def _pm(stat, seeds: int) -> str:
    """`mean ± std`, or the value alone where one seed gave it (no spread to show; results written before `n`
    was recorded have one per seed)."""
    if stat is None:
        return "–"
    if stat.get("std") is None or stat.get("n", seeds) < 2:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


# -- the chart ---------------------------------------------------------------------------------------------------


def _chart_keys(results: dict) -> list[str]:
    """What the chart plots against run time: the classifier's Avg. Gap to the reference; for generative
    families the erasure and what is kept (retained accuracy, else FID of the retained classes)."""
    present = {k for stats in results["summary"].values() for k in stats}
    if "avg_gap" in present:
        return ["avg_gap"]
    kept = next((k for k in ("retain_accuracy", "fid") if k in present), None)
    return [k for k in ("erasure_rate", kept) if k in present]


def _chart_title(results: dict) -> str:
    harness = HARNESSES[results["family"]]
    return " and ".join(harness.info(k).title for k in _chart_keys(results)) or "result"


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _error_bar(mean: float, std: float | None, low: float, high: float):
    """matplotlib's (below, above) error bar lengths for mean ± std, cut at the values a metric can take (a
    percentage stays within 0–100, a time above 0: std over a few seeds is no bound), or None for no spread."""
    if std is None or not math.isfinite(std):
        return None
    below = min(std, mean - low) if mean > low else 0.0
    return [[max(below, 0.0)], [max(min(std, high - mean), 0.0)]]


def bench_chart(results: dict, path: str | Path) -> Path | None:
    """Write a PNG of each method's result (`_chart_keys`, one panel each) against its run time, with error
    bars of one standard deviation over seeds on both axes; the reference is a star, the original model (which
    took no time) a dotted line. Returns `path`, or None when the results hold nothing to plot."""
    from matplotlib.figure import Figure  # heavy: only when a bench ends (no pyplot: no global state)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from .harness.base import better_text

    keys = _chart_keys(results)
    summary = results["summary"]
    if not keys or not any("RTE_s" in stats for stats in summary.values()):
        return None
    harness = HARNESSES[results["family"]]
    seeds = len(results["seeds"])
    figure = Figure(figsize=(5.6 * len(keys) + 1.8, 4.6), layout="constrained")
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    timed = [(m, s) for m, s in summary.items() if m != "original" and "RTE_s" in s]
    positive = [s["RTE_s"]["mean"] for _, s in timed if s["RTE_s"]["mean"] > 0]
    for axis, key in zip(axes, keys):
        info = harness.info(key)
        for index, (method, stats) in enumerate(summary.items()):
            if key not in stats:
                continue
            y, y_err = stats[key]["mean"], stats[key].get("std")
            if method == "original":
                axis.axhline(y, color="0.5", linestyle=":", label="original (no unlearning)")
                continue
            x, x_err = stats["RTE_s"]["mean"], stats["RTE_s"].get("std")
            reference = method == results["reference"]
            axis.errorbar(
                x,
                y,
                xerr=_error_bar(x, x_err, 0.0, math.inf),  # a time is positive
                yerr=_error_bar(y, y_err, 0.0, 100.0 if info.unit == "%" else math.inf),
                fmt="*" if reference else _MARKERS[index % len(_MARKERS)],
                markersize=13 if reference else 7,
                capsize=3,
                color="black" if reference else f"C{index % 10}",
                label=f"{method} (reference)" if reference else method,
            )
        if positive and max(positive) / min(positive) > 20:
            axis.set_xscale("log")
            axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.xaxis.set_minor_formatter(NullFormatter())
        else:
            right = max((s["RTE_s"]["mean"] + (s["RTE_s"].get("std") or 0) for _, s in timed), default=0)
            axis.set_xlim(0, 1.1 * right if right > 0 else 1)  # times read as ratios from a zero origin
        axis.set_xlabel("run time, RTE (s)")
        unit = f" ({info.unit})" if info.unit and info.unit not in info.title else ""
        axis.set_ylabel(f"{info.title}{unit}, {better_text(info.better)}")
        axis.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize=8)
    spread = f"mean ± std over n={seeds} seeds" if seeds > 1 else "n=1 seed (no spread)"
    figure.suptitle(f"{results['suite']}: {spread}")
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return path
