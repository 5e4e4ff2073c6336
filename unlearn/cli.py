"""The `unlearn` command line: erase | eval | attack | bench | ls | check | prepare.

User errors print one line and exit with status 2; heavy packages are imported only by the commands that
need them, so `unlearn --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import ConfigError, UnlearnError


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="unlearn", description="Machine unlearning and concept erasure.")
    parser.add_argument("--version", action="version", version=f"unlearn-toolkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    erase = sub.add_parser("erase", help="erase a class or examples from a model as a recipe says")
    erase.add_argument(
        "recipe",
        help="recipe YAML, or a shipped recipe's short name (`unlearn ls recipes`): classifier/digits/salun",
    )
    erase.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. method.lr=0.02")
    erase.add_argument("--checkpoint", help="the model to unlearn (overrides model.checkpoint)")
    erase.add_argument("--arch", help="architecture of a bare weights file (overrides model.arch)")
    # Strings, not type=int: nargs="+" also swallows overrides that follow (`--forget-class 5 data.root=x`);
    # `_erase` hands those back to the overrides.
    erase.add_argument("--forget-class", nargs="+", metavar="N", help="class ids to forget")
    erase.add_argument(
        "--concept",
        help="diffusion: the concept to erase (overrides data.concept), e.g. three; three,seven erases both",
    )
    erase.add_argument("--anchor", help="diffusion: what the concept should become (overrides data.anchor)")
    erase.add_argument("-o", "--output", help="run folder (rerun the same folder to resume)")
    erase.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 when the utility guard warns (RA / TA fell more than eval.utility_margin "
        "below the original's; the run folder is still complete), and refuse an original model that scores "
        "near chance on the data as preprocessed",
    )
    erase.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="after the run, upload its model folder (with its model card) to this Hugging Face model repo",
    )

    ev = sub.add_parser(
        "eval", help="score a run folder again (or the model a recipe names, before unlearning)"
    )
    ev.add_argument("target", help="RUN_DIR or RECIPE")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")

    attack = sub.add_parser(
        "attack",
        help="try to bring the erased concept back: attacks on a run folder, with Retrain as the control",
    )
    attack.add_argument("run_dir", help="a finished run folder (its Retrain reference is the control)")
    attack.add_argument(
        "--attack",
        action="append",
        metavar="NAME",
        help="an attack (`unlearn ls attacks`); repeat for several; default: the recipe's eval.attacks",
    )
    attack.add_argument("settings", nargs="*", help="key=value settings of a single --attack, e.g. steps=50")
    attack.add_argument("--json", action="store_true", help="print the attack metrics as JSON")

    bench = sub.add_parser("bench", help="run an evaluation suite over methods and seeds")
    bench.add_argument(
        "suite", help="suite YAML, or a shipped suite's short name (`unlearn ls suites`): digits_classwise"
    )
    bench.add_argument("-o", "--output", help="output folder for results.json / results.md")
    bench.add_argument(
        "--seed",
        type=int,
        action="append",
        dest="seeds",
        help="run only this seed of the suite (repeat for several): processes that share a suite's seeds over "
        "one -o folder; the bench over every seed then reuses their runs and writes the results",
    )

    ls = sub.add_parser(
        "ls", help="list methods, attacks, metrics, recipes or suites; `ls methods NAME` documents a method"
    )
    ls.add_argument("what", choices=["methods", "attacks", "metrics", "recipes", "suites"])
    ls.add_argument("name", nargs="?", help="methods and attacks: print this one's settings")

    check = sub.add_parser("check", help="validate recipes or suites without running anything")
    check.add_argument("files", nargs="+", help="recipe or suite YAML files, or shipped short names")

    prepare = sub.add_parser(
        "prepare",
        help="build and cache an embedded world (digits: classifier, DDPM, text-to-image, GAN, digits × styles)",
    )
    prepare.add_argument("world", help="e.g. digits")
    prepare.add_argument(
        "--families",
        nargs="+",
        default=None,
        metavar="MODEL",
        help="build only these models (digits: classifier ddpm t2i gan canvas); default: all of them",
    )
    return parser


def _yaml_quoted(text: str) -> str:
    """`text` as a YAML double-quoted scalar that reads back as exactly `text`: every character outside
    printable ASCII escaped by its code point (`\\U0001f642` for an emoji, not JSON's pair of UTF-16 surrogate
    halves; an undecodable byte of a file name stays its lone surrogate, for the loader to name)."""
    out = []
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def _erase(args) -> int:
    from .pipeline import run, shutdown
    from .recipe import check_reference, find_path, load_recipe

    classes = [item for item in args.forget_class or [] if "=" not in item]
    overrides = [*args.overrides, *[item for item in args.forget_class or [] if "=" in item]]
    try:
        classes = [int(item) for item in classes]
    except ValueError:
        raise ConfigError(f"--forget-class takes integer class ids, got {' '.join(classes)!r}") from None
    if args.checkpoint:
        overrides.append(f"model.checkpoint={_yaml_quoted(args.checkpoint)}")
    if args.arch:
        overrides.append(f"model.arch={_yaml_quoted(args.arch)}")
    if classes:
        overrides += [f"data.forget_class={classes}", "data.forget_fraction=null", "data.concept=null"]
    if args.concept is not None:  # "three,seven" erases both together
        names = [c.strip() for c in args.concept.split(",")] if "," in args.concept else args.concept
        quoted = _yaml_quoted(names) if isinstance(names, str) else f"[{', '.join(map(_yaml_quoted, names))}]"
        overrides += [f"data.concept={quoted}", "data.forget_class=null"]
    if args.anchor is not None:
        overrides.append(f"data.anchor={_yaml_quoted(args.anchor)}")
    recipe = load_recipe(find_path(args.recipe, "recipe"), overrides)
    check_reference(recipe)  # a reference that is not found is refused before the run folder is made
    if args.push_to_hub:  # a malformed repo id or a missing token is refused before anything runs
        from .card import check_push_target

        check_push_target(args.push_to_hub)
    metrics = run(recipe, args.output, strict=args.strict)
    main = _is_main_process()
    shutdown()
    if args.strict and metrics.get("utility_warning"):  # the run folder is complete; nothing is pushed
        if main:
            print("unlearn erase: --strict: the utility guard warned (see the line above)", file=sys.stderr)
        return 1
    if args.push_to_hub and main:
        _push(recipe, args.output, args.push_to_hub)
    return 0


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _push(recipe, output: str | None, repo_id: str) -> None:
    """`erase --push-to-hub`: upload the finished run folder's model (with its card) to the Hub."""
    from pathlib import Path

    from .card import push_to_hub
    from .pipeline import default_output

    folder = Path(output or recipe.output or default_output(recipe))
    print(f"uploaded {folder / 'model'} to {push_to_hub(folder, repo_id)}")


def _eval(args) -> int:

    from .paths import existing_path
    from .pipeline import evaluate_run, shutdown
    from .runfolder import finished_run, read_metrics

    target = existing_path(args.target, "run folder or recipe")
    recorded = None
    if (
        target.is_dir()
    ):  # the run's own metrics.json, read (and a corrupt one refused) before minutes of scoring
        finished_run(target, "unlearn eval")
        if (target / "metrics.json").exists() or (target / "metrics.json").is_symlink():
            recorded = read_metrics(target / "metrics.json", f"run folder {args.target!r}")
    metrics = evaluate_run(args.target, log=lambda message: print(message, file=sys.stderr))
    main = _is_main_process()
    shutdown()
    if not main:  # a multi-process launch scored together; the main process prints
        return 0
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    from .recipe import load_recipe

    family = load_recipe(target / "recipe.yaml" if target.is_dir() else target).model.family
    print(_eval_table(metrics, recorded, family))
    if recorded:
        differ = [k for k, v in metrics.items() if k != "RTE_s" and recorded.get(k) != v]
        print(
            f"{len(metrics) - len(differ)} of {len(metrics)} metrics equal the run's metrics.json"
            + (f"; differ: {', '.join(differ)}" if differ else "")
        )
    return 0


def _eval_table(metrics: dict, recorded: dict | None, family: str) -> str:
    """`unlearn eval`'s table: one row per metric (its key and its title from the family's catalogue), the
    model's value now beside the original's and Retrain's where they were scored, and for a run folder the
    value its `metrics.json` holds; `*` marks a row where a value now differs from the run's."""
    import math

    from .attacks.run import attack_info
    from .harness import HARNESSES

    harness = HARNESSES[family]
    prefixes = [p for p in ("original_", "retrain_") if any(k.startswith(p) for k in metrics)]
    paired = {f"{p}{k}" for p in prefixes for k in metrics}  # a prefixed key whose model key is there too
    keys = [k for k in metrics if k not in paired]

    def number(value) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "–" if value is None else str(value)
        if not math.isfinite(value):
            return str(value)
        return f"{value:.2f}" if value == 0 or abs(value) >= 0.1 else f"{value:.3g}"

    def title(key: str) -> str:
        info = harness.info(key) or attack_info(key)
        if info is None:
            return ""
        unit = f" ({info.unit})" if info.unit and info.unit not in info.title else ""
        return info.title + (f": {key.split(':', 1)[1]}" if ":" in key else "") + unit

    header = ["metric", "", "model", *("original" if p == "original_" else "Retrain" for p in prefixes)]
    header += ["in the run"] if recorded else []
    rows = []
    for key in keys:
        scored = [key, *(f"{p}{key}" for p in prefixes)]
        row = [key, title(key), *(number(metrics.get(k)) for k in scored)]
        if recorded:
            differs = any(k in metrics and k != "RTE_s" and recorded.get(k) != metrics[k] for k in scored)
            row.append(number(recorded.get(key)) + (" *" if differs else "  "))
        rows.append(row)
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))
        ).rstrip()
        for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if recorded and any(row[-1].endswith("*") for row in rows):
        lines.append(
            "* differs now from the run's metrics.json (the model's, the original's or Retrain's value)"
        )
    return "\n".join(lines)


def _attack(args) -> int:
    from .attacks.run import attack_run, record_attacks, recorded_outputs, run_lock
    from .card import write_model_card
    from .runfolder import finished_run
    from .safe_yaml import parse_yaml

    specs = None
    if args.attack:
        twice = sorted({name for name in args.attack if args.attack.count(name) > 1})
        if twice:
            raise ConfigError(f"--attack {twice[0]} is given twice; name each attack once")
        specs = [{"name": name} for name in args.attack]
    if args.settings:
        if not args.attack or len(args.attack) != 1:
            raise ConfigError(
                f"key=value settings ({' '.join(args.settings)}) apply to exactly one --attack NAME, and "
                f"{len(args.attack or [])} are named; give each attack its settings in a run of its own, or in "
                "the recipe's eval.attacks"
            )
        for item in args.settings:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"attack settings are key=value, got {item!r}")
            # bounded: an alias bomb in a setting is refused before it expands
            specs[0][key] = parse_yaml(value, f"attack setting {item[:100]!r}: the value")
    run_dir = finished_run(args.run_dir, "unlearn attack")
    with run_lock(run_dir):  # one writer of the folder from the first attack to the report
        # metrics.json and report.md, merged into at the end: refused now if corrupt
        recorded_outputs(run_dir)
        metrics, shown = attack_run(run_dir, specs, log=lambda message: print(message, file=sys.stderr))
        merged = record_attacks(run_dir, metrics, shown)
        if (run_dir / "model").is_dir():
            write_model_card(run_dir, merged)  # the card's evaluation results gain the attacks'
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    for name in shown:
        print(
            f"{name}: success original {metrics[f'original_{name}.success']:.1f} %, "
            f"Retrain {metrics[f'retrain_{name}.success']:.1f} %, unlearned {metrics[f'{name}.success']:.1f} %; "
            f"R = {metrics[f'{name}.R']:.2f}"
        )
    print(f"wrote {run_dir / 'metrics.json'} and the report's attack section")
    return 0


def _bench(args) -> int:
    from .bench import bench
    from .pipeline import shutdown

    bench(args.suite, args.output, seeds=args.seeds)
    shutdown()
    return 0


def _ls(args) -> int:
    if args.name is not None and args.what not in ("methods", "attacks"):
        raise ConfigError(f"`unlearn ls {args.what}` takes no name; only methods and attacks do")
    if args.what == "methods" and args.name is not None:
        _ls_method(args.name)
    elif args.what == "attacks":
        from .attacks import ATTACKS, attack_names, get_attack

        names = [get_attack(args.name).name] if args.name else attack_names()
        for name in names:
            cls = ATTACKS[name]
            summary = (cls.__doc__ or "").strip().splitlines()[0]
            print(f"{name:20s} [{', '.join(cls.families)}]  {summary}")
            if args.name:
                print(f"  success: {cls.success_meaning}")
                if cls.baselines:
                    print(f"  same-budget baselines: {', '.join(cls.baselines)}")
                _print_fields(cls)
    elif args.what == "methods":
        from .methods import METHODS, families

        for name, classes in METHODS.items():
            summary = (classes[0].__doc__ or "").strip().splitlines()[0]
            print(f"{name:14s} [{', '.join(families(name))}]  {summary}")
    elif args.what == "metrics":
        from .harness import COMMON, HARNESSES
        from .harness.base import better_text

        for family, harness in HARNESSES.items():
            print(f"{family} (default: {', '.join(harness.default_metrics)})")
            for key, info in {**harness.catalogue, **COMMON}.items():
                source = f"  [from {info.requested_by}]" if info.requested_by else ""
                unit = f" ({info.unit})" if info.unit else ""
                print(f"  {key:24s} {info.meaning}{unit}; {better_text(info.better)}{source}")
            print()
    else:  # the shipped recipes or suites, wherever the toolkit is installed: short name, then the path
        from .errors import CheckpointNotFoundError
        from .recipe import SHIPPED, shipped_folder, shipped_names

        kind = args.what.removesuffix("s")
        folder = shipped_folder(kind)
        if folder is None:
            raise CheckpointNotFoundError(
                f"no shipped {SHIPPED[kind]}/ folder is found in the checkout or in the installed package; "
                "reinstall unlearn-toolkit, or give `unlearn erase` and `unlearn bench` your own files"
            )
        names = shipped_names(kind)
        width = max(map(len, names), default=0)
        for name in names:
            print(f"{name:{width}s}  {folder.name}/{name}.yaml")
    return 0


def _ls_method(name: str) -> None:
    """Each family implementation of method `name`: its summary line, then every field with type, default
    and help, in recipe (YAML) spelling."""
    from .methods import METHODS, get_method

    get_method(name)  # refuses an unknown name in one sentence, with the closest names
    for i, cls in enumerate(METHODS[name]):
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        print(("\n" if i else "") + f"{name} [{', '.join(cls.families)}]  {summary}")
        _print_fields(cls, ranges=True)


def _print_fields(cls, ranges: bool = False) -> None:
    """Every field of a method or attack with type, default and help, in recipe (YAML) spelling; with `ranges`
    (methods), the range a recipe's value is checked against comes first in the help."""
    import dataclasses

    from .methods.base import describe, field_rule

    def help_of(field) -> str:
        rule = field_rule(field) if ranges else {}
        return (f"[{describe(rule)}] " if rule else "") + field.metadata.get("help", "")

    fields = dataclasses.fields(cls)
    rows = [(f.name, str(f.type), _yaml_default(f), help_of(f)) for f in fields]
    widths = [max((len(row[k]) for row in rows), default=0) for k in range(3)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])


def _yaml_default(field) -> str:
    """A field's default as a recipe would write it (null, true, 0.0005, kv, [a, b])."""
    import dataclasses
    import json

    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _check(args) -> int:
    from .bench import check_suite, load_suite
    from .errors import CheckpointNotFoundError
    from .recipe import check_reference, find_path, load_recipe, read_yaml

    for name in args.files:
        path = find_path(name)
        if not path.exists() and not path.is_symlink():
            raise CheckpointNotFoundError(f"{str(path)!r} does not exist; give a recipe or suite file")
        raw = read_yaml(path, "recipe or suite")  # a folder, a FIFO, bad YAML, an alias bomb: refused here
        if isinstance(raw, dict) and "methods" in raw:
            check_suite(load_suite(path))
        else:
            check_reference(load_recipe(path))
        print(f"ok  {name}")
    return 0


def _prepare(args) -> int:
    from .worlds import prepare

    # The command builds every model of the world unless told which (the generative models take minutes each);
    # `prepare(world)` from Python builds only the quick classifier unless asked for more.
    for family, path in prepare(args.world, families=args.families or "all").items():
        print(f"{family}: {path}")
    return 0


COMMANDS = {
    "erase": _erase,
    "eval": _eval,
    "attack": _attack,
    "bench": _bench,
    "ls": _ls,
    "check": _check,
    "prepare": _prepare,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a plain `kill`): stops the command as Ctrl-C does, through every cleanup on the way out."""


def _main_process() -> bool:
    """Whether this is the process that speaks for a multi-process launch (`accelerate launch`, `torchrun`:
    global rank 0); a lone process always is. Read from the launcher's environment, so it holds before, and
    whether or not, accelerate's state exists."""
    import os

    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            return int(value) == 0
    return True


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # parse_known_args: overrides may also follow options (`erase RECIPE -o DIR key=value`); argparse alone
    # stops filling a nargs="*" positional at the first option and would refuse what comes after it.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command == "erase" and not any(item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        elif args.command == "attack" and not any(item.startswith("-") for item in extra):
            args.settings = [*args.settings, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    import signal
    import threading

    # In a multi-process launch every process meets the same user error (the recipe and the checks are the
    # same everywhere): only the main one says it, the others exit with the same status in silence.
    speaks = _main_process()
    handles = threading.current_thread() is threading.main_thread()  # only there may a signal handler be set
    if handles:

        def terminated(signum, frame):
            raise Terminated()

        previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return COMMANDS[args.command](args)
    except UnlearnError as err:
        if speaks:
            message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())  # one line
            print(f"unlearn {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        if speaks:
            print(f"unlearn {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except BrokenPipeError:  # the reader went away (`unlearn ls methods | head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    finally:
        if handles:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
