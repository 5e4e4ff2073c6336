"""Attacks on a finished run, with the rules that make their numbers honest (reference/attacks.md §0):

- the same attack, same settings and seeds, runs on the original model, on Retrain and on the unlearned model;
  the residual R = (m_unlearned − m_retrain) / (m_original − m_retrain) says how much of the concept the
  unlearned model still holds against a model that never learned it (0: as gone as Retrain; 1: as present as
  in the original);
- every search attack has its same-budget baselines beside it;
- rates carry Wilson intervals, R its spread over seeds.

The original's and Retrain's results are cached in the Retrain run folder (`<reference>/attacks/`), so a bench
attacks them once per seed, not once per method. Everything is seeded: a rerun gives the same numbers.

Under a multi-process launch every process attacks inside `unlearn.spread.spread_over` (`unlearn eval`, `unlearn
erase`): the attacks' generation and judging are spread over the processes, batch by batch, and every process
ends with the results of one process. The searches stop on judged results, which every process holds alike; the
attacks that train (relearn, concept inversion, the optimized prompts and latents, U-LiRA's shadows) run the same
seeded computation in every process. Only the main process takes the run lock and writes the cache entries,
`attacks.json`, the curves and the images; a cache entry is used only when every process finds it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import require_file, write_json, write_text
from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError
from ..harness.base import MetricInfo
from ..spread import everywhere, is_main_process
from . import get_attack
from .base import Attack, Probe, Target, residual, wilson

ROLES = ("original", "retrain", "unlearned")
PREFIX = {"original": "original_", "retrain": "retrain_", "unlearned": ""}
SECTION = "## Is it really gone? Attacks, with Retrain as the control"


def attack_run(run_dir: str | Path, specs: list | None = None, log=print) -> tuple[dict, dict]:
    """Run the attacks `specs` (default: the run's `eval.attacks`) on a finished run folder; returns the metrics
    (keys `<attack>.<metric>`, `original_<attack>.<metric>`, `retrain_<attack>.<metric>`, `<attack>.R`, ...) and
    what the report shows ({attack: {"budget", "seeds", "curve", "images", ...}})."""
    from ..harness import HARNESSES
    from ..paths import existing_path, shown
    from ..recipe import load_recipe
    from ..runfolder import reference_folder

    run_dir = existing_path(run_dir)  # a finished run's, or one whose run attacks it before it says complete
    if not (run_dir / "model").is_dir() or not (run_dir / "recipe.yaml").is_file():
        raise CheckpointNotFoundError(
            f"{shown(run_dir)} is not a run folder (no model/ or recipe.yaml in it); give a folder `unlearn erase` "
            "wrote"
        )
    recipe = load_recipe(run_dir / "recipe.yaml")
    if specs is None and not recipe.eval.attacks:
        raise ConfigError(
            f"run {str(run_dir)!r} names no attacks (its recipe has no eval.attacks); name one with --attack NAME "
            "(`unlearn ls attacks` lists them)"
        )
    attacks = recipe.build_attacks(specs)
    if not attacks:
        raise ConfigError("no attack to run: name one with --attack NAME or list them in eval.attacks")
    if recipe.method == "retrain":
        reference_dir = run_dir
    else:
        reference_dir, _ = reference_folder(recipe, run_dir)
        if reference_dir is not None and not (reference_dir / "model").exists():
            raise CheckpointNotFoundError(
                f"the Retrain reference {str(reference_dir)!r}, the attacks' control, has no model/; restore it, "
                "or run the run again into a fresh folder"
            )
        if reference_dir is None:
            raise ConfigError(
                "attacks need the Retrain reference as their control: this run names none with a model "
                "(set eval.reference to a Retrain recipe or run folder and rerun)"
            )
    cuda = torch.cuda.is_available() and not recipe.train.cpu
    harness = HARNESSES[recipe.model.family](recipe, "cuda" if cuda else "cpu", log)
    original, data = harness.setup()
    if (run_dir / "pruned").exists():  # the run unlearned the pruned model: that is its original
        original = harness.load_output(run_dir / "pruned", data)
    harness.before(original, data, reference_dir)
    retrain = harness.load_output(reference_dir / "model", data)
    models = {"original": original, "retrain": retrain}
    models["unlearned"] = (
        retrain if reference_dir == run_dir else harness.load_output(run_dir / "model", data)
    )
    identity = {
        "original": {"model": dataclasses.asdict(recipe.model)},
        "retrain": {"run": _read(reference_dir / "run.json")},
    }
    seeds = [1000 * recipe.seed + i for i in range(recipe.eval.attack_seeds)]
    # attacks.json, the curves and images go into the run folder, written by the main process alone
    with run_lock(run_dir) if is_main_process() else contextlib.nullcontext():
        return attack_models(
            attacks,
            harness,
            data,
            models,
            seeds,
            cache=reference_dir / "attacks",
            identity=identity,
            output=run_dir,
        )


_HELD: set[Path] = set()  # run folders whose lock this process holds


@contextlib.contextmanager
def run_lock(run_dir: str | Path):
    """Hold `run_dir/.lock` (the lock a run takes, `unlearn.runfolder.RunFolder`) while attacks write into the
    folder: a second process writing there (an attack, a resumed run) is refused in one sentence instead of
    interleaving its writes with ours. Re-entrant within a process (a run of this process holding the folder,
    as `unlearn erase` does when it attacks, is no other writer); a folder that does not exist is not locked
    (nothing will be written there)."""
    from ..runfolder import take_lock

    path = Path(run_dir).resolve()
    if path in _HELD or not path.is_dir():
        yield
        return
    lock = path / ".lock"
    fd = take_lock(path, "remove it and rerun")
    if isinstance(fd, str):
        if fd == f"pid {os.getpid()}":  # this process's own run holds it (`unlearn erase` attacking)
            yield
            return
        raise ConfigError(
            f"another process ({fd}) is writing to run folder {str(run_dir)!r}; wait for it to finish and rerun"
        )
    _HELD.add(path)
    try:
        yield
    finally:
        _HELD.discard(path)
        try:  # still held: no other process has it; unlinked only if it is still our file
            if os.path.samestat(os.lstat(lock), os.fstat(fd)):
                os.unlink(lock)
        except OSError:
            pass  # gone already, or the folder went away
        os.close(fd)


def attack_models(
    attacks: list[Attack],
    harness,
    data,
    models: dict,
    seeds: list[int],
    *,
    cache: Path | None = None,
    identity: dict | None = None,
    output: Path | None = None,
) -> tuple[dict, dict]:
    """Run each attack, and its same-budget baselines, with every seed on `models` ({"original", "retrain",
    "unlearned"}: the same object twice when Retrain is the model judged); returns the metrics and what the
    report shows. The library's entry point: `harness` has run `before(models["original"], data, ...)`.
    Inside `unlearn.spread.spread_over` every process of the launch calls it alike and gets the same metrics;
    the main process alone writes the cache and `output`.

    Args:
        cache: a folder where the original's and Retrain's results are kept, keyed by `identity` ({role:
            what identifies that model}), so that other runs against the same Retrain reuse them.
        output: where the curves, images and `attacks.json` go (None: nowhere).
    """
    identity = identity or {}
    log = harness.log
    _ = harness.second_judge  # loaded now, not inside a seeded attack: building it draws from the global RNG
    metrics: dict = {}
    shown: dict = {}

    def probe(attack: Attack, role: str, seed: int, found: dict) -> Probe:
        if role == "unlearned" and models["unlearned"] is models["retrain"]:
            return found["retrain"][-1]
        key = identity.get(role) if cache is not None else None
        result = _cached(cache, attack, role, seed, harness.recipe, key) if key else None
        if not everywhere(result is not None):  # (the processes attack together, or all read the entry)
            target = Target(harness, data, models["original"], role=role, log=log)
            result = _attack(attack, models[role], target, seed)
            if key and is_main_process():
                _store(cache, attack, role, seed, harness.recipe, key, result)
        return result

    for attack in attacks:
        target = Target(harness, data, models["original"], log=log)
        attack.check(target)
        budget = attack.budget(target)
        log(f"attack {attack.name}: {budget}; seeds {seeds}")
        probes: dict[str, list[Probe]] = {role: [] for role in ROLES}
        for seed in seeds:
            for role in ROLES:
                probes[role].append(probe(attack, role, seed, probes))
            log(f"  seed {seed}: " + ", ".join(f"{role} {probes[role][-1].success:.1f} %" for role in ROLES))
        metrics.update(summarize(attack.name, probes))
        shown[attack.name] = {"budget": budget, "seeds": seeds, "baselines": list(attack.baselines)}
        for name in attack.baselines:
            baseline = _baseline(attack, name, target)
            found: dict[str, list[Probe]] = {role: [] for role in ROLES}
            for seed in seeds:
                for role in ROLES:
                    found[role].append(probe(baseline, role, seed, found))
            for role in ROLES:
                metrics[f"{PREFIX[role]}{attack.name}.{name}"] = _mean([p.success for p in found[role]])
            metrics[f"{attack.name}.{name}_R"] = residual(
                *(
                    metrics[f"{PREFIX[role]}{attack.name}.{name}"]
                    for role in ("unlearned", "retrain", "original")
                )
            )
        if output is not None and is_main_process():
            shown[attack.name].update(_artifacts(output, attack.name, probes))
    if output is not None and is_main_process():
        write_json({"seeds": seeds, "attacks": _dump(shown)}, output / "attacks.json")
    return metrics, shown


def _baseline(attack: Attack, name: str, target: Target) -> Attack:
    """The same-budget baseline `name` of a search attack: as many generations as the search may spend, and the
    settings the two share (the targets searched, the guidance sweep) taken from the search."""
    cls = get_attack(name, target.family)
    shared = {
        field.name: getattr(attack, field.name)
        for field in dataclasses.fields(attack)
        if field.name in cls.__dataclass_fields__ and field.name != "generations"
    }
    return cls(**shared, generations=attack.generation_budget(target))


def _attack(attack: Attack, model, target: Target, seed: int) -> Probe:
    """One seeded attack; a model the attack trains is copied first. The caller's RNG state is left as it was."""
    from accelerate.utils import set_seed

    if attack.modifies_model:
        model = copy.deepcopy(model)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        set_seed(seed)
        return attack.run(model, target, seed)


def summarize(name: str, probes: dict[str, list[Probe]]) -> dict:
    """The metrics of one attack from its probes per role and seed: mean success, Wilson bounds on the pooled
    counts, the attack's own numbers (mean over seeds) and R (of the means; its std over the seeds' own R)."""
    out: dict = {}
    for role in ROLES:
        found, prefix = probes[role], PREFIX[role]
        out[f"{prefix}{name}.success"] = _mean([p.success for p in found])
        if all(p.trials for p in found):
            low, high = wilson(sum(p.hits for p in found), sum(p.trials for p in found))
            out[f"{prefix}{name}.success_low"], out[f"{prefix}{name}.success_high"] = low, high
        for key in dict.fromkeys(k for p in found for k in p.metrics):
            out[f"{prefix}{name}.{key}"] = _mean([p.metrics.get(key, math.nan) for p in found])
    out[f"{name}.R"] = residual(
        out[f"{name}.success"], out[f"retrain_{name}.success"], out[f"original_{name}.success"]
    )
    per_seed = [
        residual(u.success, r.success, o.success)
        for u, r, o in zip(probes["unlearned"], probes["retrain"], probes["original"])
    ]
    finite = [r for r in per_seed if not math.isnan(r)]
    out[f"{name}.R_std"] = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return out


def _mean(values) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


# ------------------------------------------------------------------------------------------------- the cache


def _digest(attack: Attack, role: str, seed: int, recipe, identity: dict) -> str:
    ev = recipe.eval
    what = {
        "attack": attack.name,
        "settings": dataclasses.asdict(attack),
        "role": role,
        "seed": seed,
        "model": identity,
        "data": dataclasses.asdict(recipe.data),
        "scoring": [
            ev.steps,
            ev.guidance,
            ev.samples,
            ev.batch_size,
            ev.judge,
            ev.second_judge,
            ev.concept_label,
        ],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(folder: Path, attack, role, seed, recipe, identity) -> Probe | None:
    path = folder / f"{attack.name}-{role}-{_digest(attack, role, seed, recipe, identity)}.json"
    if not path.exists():
        return None
    try:
        probe = Probe.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache entry is recomputed (and rewritten)
    if not isinstance(probe.success, (int, float)) or isinstance(probe.success, bool):
        return None
    return probe


def _store(folder: Path, attack, role, seed, recipe, identity, probe: Probe) -> None:
    path = folder / f"{attack.name}-{role}-{_digest(attack, role, seed, recipe, identity)}.json"
    write_json(probe.to_json(), path)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


# --------------------------------------------------------------------------------------------- the report


def _artifacts(run_dir: Path, name: str, probes: dict[str, list[Probe]]) -> dict:
    """The first seed's curves (a PNG chart of all three models) and images (a grid per model that produced
    them in this call; cached results keep no images)."""
    from ..charts import recovery_chart
    from ..metrics.generation import save_grid

    out: dict = {}
    curves = {role: probes[role][0].curve for role in ROLES if probes[role][0].curve}
    if curves:
        # A search measured against seed_search spends generations; the other attacks' curves count steps.
        unit = "generations per target" if "seed_search" in get_attack(name).baselines else "steps"
        path = recovery_chart(curves, run_dir / f"attack_{name}_curve.png", f"{name} (first seed)", unit)
        out["curve"] = path.name
        out["curve_points"] = {role: curve for role, curve in curves.items()}
    for role in ROLES:
        images = probes[role][0].images
        if images is not None and len(images):
            path = save_grid(images[:40].float().cpu(), run_dir / f"attack_{name}_{role}.png", nrow=10)
            out.setdefault("images", {})[role] = path.name
    return out


def _dump(shown: dict) -> dict:
    return json.loads(json.dumps(shown, default=str))


def attack_info(key: str) -> MetricInfo | None:
    """The catalogue entry of an attack key (`<attack>.<metric>`, with or without an original_/retrain_
    prefix): success, R, Wilson bounds, a baseline's success or R, or one of the attack's own metrics."""
    from . import ATTACKS

    for prefix in ("original_", "retrain_"):
        if key.startswith(prefix) and key[len(prefix) :].split(".")[0] in ATTACKS:
            key = key[len(prefix) :]
    name, _, rest = key.partition(".")
    if name not in ATTACKS or not rest:
        return None
    cls = ATTACKS[name]
    if rest == "success":
        return MetricInfo(name, cls.success_meaning, "retrain")
    if rest == "R":
        return MetricInfo(
            f"{name} R",
            f"residual of {name}: (unlearned − Retrain) / (original − Retrain); 0 = as gone as Retrain",
            "lower",
            "",
        )
    if rest == "R_std":
        return MetricInfo(f"{name} R std", "standard deviation of R over the attack's seeds", "lower", "")
    if rest in ("success_low", "success_high"):
        return MetricInfo(f"{name} {rest[8:]}", "Wilson 95 % bound of the success rate", "retrain")
    for baseline in cls.baselines:
        if rest == baseline:
            return MetricInfo(
                f"{name}: {baseline}", f"the same-budget baseline {baseline}'s success", "retrain"
            )
        if rest == f"{baseline}_R":
            return MetricInfo(f"{name}: {baseline} R", f"R of the baseline {baseline}", "lower", "")
    for pattern, info in cls.metrics.items():
        if rest == pattern or ("<" in pattern and rest.startswith(pattern.split("<")[0])):
            return info
    return None


def record_attacks(run_dir: Path, metrics: dict, shown: dict) -> dict:
    """Merge attack metrics into `run_dir/metrics.json` and put their section at the end of `report.md`
    (replacing an earlier attack section); returns the merged metrics (`unlearn attack` then writes them into
    the model card)."""
    run_dir = Path(run_dir)
    path, report_path = run_dir / "metrics.json", run_dir / "report.md"
    with run_lock(run_dir):
        recorded, report = recorded_outputs(run_dir)
        merged = {**recorded, **metrics}
        write_json(merged, path)
        head = report.split(f"\n{SECTION}")[0].rstrip("\n")
        write_text("\n".join([head, *attack_section(merged, shown)]) + "\n", report_path)
    return merged


def recorded_outputs(run_dir: Path) -> tuple[dict, str]:
    """The run folder's `metrics.json` and `report.md` that attacks merge into ({} and "" where absent);
    refuses in one sentence one that is corrupt (`unlearn attack` asks before it attacks)."""
    from ..runfolder import read_metrics

    path, report_path = run_dir / "metrics.json", run_dir / "report.md"
    recorded = read_metrics(path, f"run folder {str(run_dir)!r}") if path.exists() else {}
    if not report_path.exists():
        return recorded, ""
    try:
        return recorded, require_file(report_path, "report", CheckpointError).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"report {str(report_path)!r} cannot be read as text ({str(err).splitlines()[0]}); delete it or restore "
            "it, then rerun"
        ) from None


def attack_section(metrics: dict, shown: dict) -> list[str]:
    """report.md's attack section: per attack its budget, a table original / Retrain / unlearned (success with
    Wilson bounds, R, the baselines, the attack's own numbers), its curve and images."""
    from ..harness.base import fmt

    lines = [
        "",
        SECTION,
        "",
        "Each attack ran with the same settings and seeds on the original model, on Retrain (trained without the "
        "concept: what a model that never learned it shows under attack) and on the unlearned model. "
        "R = (unlearned − Retrain) / (original − Retrain): 0 = as gone as in Retrain, 1 = as present as in the "
        "original (mean ± std over seeds; – when the original and Retrain do not differ: the attack cannot tell).",
    ]
    for name, info in shown.items():
        cls = get_attack(name)
        lines += ["", f"### {name}", "", f"- success: {cls.success_meaning}", f"- budget: {info['budget']}"]
        lines.append(f"- seeds: {', '.join(map(str, info['seeds']))}")
        lines += ["", "| | original | Retrain | unlearned |", "|---|---|---|---|"]

        cells = []
        for role in ROLES:
            key = f"{PREFIX[role]}{name}.success"
            cell = fmt(metrics.get(key))
            if f"{key}_low" in metrics:
                cell += f" [{fmt(metrics[f'{key}_low'])}, {fmt(metrics[f'{key}_high'])}]"
            cells.append(cell)
        lines.append("| success (%) | " + " | ".join(cells) + " |")
        r, spread = metrics.get(f"{name}.R"), metrics.get(f"{name}.R_std")
        lines.append(f"| R | 1 | 0 | **{fmt(r)}** ± {fmt(spread)} |")
        for baseline in info["baselines"]:
            row = " | ".join(fmt(metrics.get(f"{PREFIX[role]}{name}.{baseline}")) for role in ROLES)
            lines.append(f"| same budget: {baseline} (%) | {row} |")
            lines.append(f"| {baseline} R | 1 | 0 | {fmt(metrics.get(f'{name}.{baseline}_R'))} |")
        standard = {"success", "success_low", "success_high", "R", "R_std"}
        standard |= {*info["baselines"], *(f"{b}_R" for b in info["baselines"])}
        for key in metrics:
            metric = key[len(name) + 1 :]
            if not key.startswith(f"{name}.") or metric in standard:
                continue
            entry = attack_info(key)
            label = entry.title if entry else metric
            for pattern in cls.metrics:  # a patterned key (`final_k<k>`): say which k
                if "<" in pattern and metric != pattern and metric.startswith(pattern.split("<")[0]):
                    var = pattern[pattern.index("<") + 1 : pattern.index(">")]
                    label += f" ({var}={metric[len(pattern.split('<')[0]) :]})"
                    break
            row = " | ".join(fmt(metrics.get(f"{PREFIX[role]}{key}")) for role in ROLES)
            lines.append(f"| {label} | {row} |")
        if "curve" in info:
            caption = "Recovery curve (first seed): percent recognized as the attack spends its budget"
            lines += ["", f"{caption}:", "", f"![{name} recovery curve]({info['curve']})"]
        for role, image in info.get("images", {}).items():
            lines += ["", f"{role}:", "", f"![{name} {role}]({image})"]
    return lines


def attack_columns(metrics: dict) -> tuple[dict, dict, dict]:
    """A run's attack numbers as bench columns: success, R and each baseline's success per attack, for the
    unlearned model's row, and the original's and Retrain's rows (their R is 1 and 0 by definition)."""
    rows: tuple[dict, dict, dict] = ({}, {}, {})
    for key in metrics:
        name, _, metric = key.partition(".")
        if not metric or name.startswith(("original_", "retrain_")) or attack_info(key) is None:
            continue
        if metric == "R":
            rows[0][key], rows[1][key], rows[2][key] = metrics[key], 1.0, 0.0
        elif metric == "success" or metric in get_attack(name).baselines:
            for row, prefix in zip(rows, ("", "original_", "retrain_")):
                row[key] = metrics.get(f"{prefix}{key}", math.nan)
    return rows


def attack_legend(keys: list[str]) -> str:
    """What the bench table's attack columns mean."""
    names = list(dict.fromkeys(key.split(".")[0] for key in keys))
    said = "; ".join(f"{name} = {get_attack(name).success_meaning}" for name in names)
    return (
        f"Attacks (percent, the same settings and seeds on every row): {said}. R = (method − Retrain) / "
        "(original − Retrain) per run (0: as gone as Retrain, 1: as present as in the original); a column "
        "named after a baseline is that same-budget baseline's success."
    )
