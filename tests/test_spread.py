"""Evaluation spread over processes (`unlearn.spread`): every process ends with every batch, each computed by one
process only, equal to what one process computes; and `unlearn eval` / `unlearn erase` on two processes give
exactly the metrics of one, the attacks' included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml


def _spread_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from unlearn.spread import everywhere, is_main_process, map_batches, spread_over

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    state = SimpleNamespace(num_processes=world, process_index=rank, device=torch.device("cpu"))
    computed, results = [], {}

    def compute(items: slice) -> torch.Tensor:
        computed.append((items.start, items.stop))
        values = torch.arange(items.start, items.stop)
        return torch.stack([values.double() / 3, values.double() ** 2], 1).to(torch.float32)

    with spread_over(state):
        for total, batch in ((10, 3), (2, 4), (0, 4), (5, 1)):
            results[f"{total}/{batch}"] = [t.tolist() for t in map_batches(total, batch, compute)]
        results["integers"] = [t.tolist() for t in map_batches(4, 1, lambda s: torch.arange(s.start, s.stop))]
        results["all_true"] = everywhere(True)
        results["one_false"] = everywhere(rank != world - 1)
        results["main"] = is_main_process()
    results["outside"] = [t.tolist() for t in map_batches(3, 2, compute)]  # local again: no waiting
    results["computed"] = computed
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)
    dist.destroy_process_group()


def test_batches_are_spread_and_every_process_gets_all_of_them(tmp_path):
    from unlearn.spread import map_batches

    world = 2
    torch.multiprocessing.spawn(
        _spread_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]

    def local(total: int, batch: int) -> list:
        def compute(items):
            values = torch.arange(items.start, items.stop)
            return torch.stack([values.double() / 3, values.double() ** 2], 1).to(torch.float32)

        return [t.tolist() for t in map_batches(total, batch, compute)]

    for got in ranks:
        for key in ("10/3", "2/4", "0/4", "5/1"):
            total, batch = map(int, key.split("/"))
            assert got[key] == local(total, batch), key  # the same values, exactly
        assert got["integers"] == [[0], [1], [2], [3]]
        assert got["all_true"] is True and got["one_false"] is False
        assert got["outside"] == local(3, 2)
    assert [r["main"] for r in ranks] == [True, False]
    # each batch of a spread call computed by one process: batch k by process k mod 2 (outside: all of them)
    spread_starts = {
        0: [(0, 3), (6, 9), (0, 2), (0, 1), (2, 3), (4, 5)],
        1: [(3, 6), (9, 10), (1, 2), (3, 4)],
    }
    for rank, got in enumerate(ranks):
        assert [tuple(c) for c in got["computed"]] == spread_starts[rank] + [(0, 2), (2, 3)]


# -- unlearn eval and unlearn erase on two processes -----------------------------------------------------------


def _unlearn(args: list[str], processes: int, cwd, port: int = 29551) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "unlearn", *args]
    if processes > 1:
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            "-m", "unlearn", *args,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


NOT_COMPARED = {"RTE_s", "device", "num_processes"}


@pytest.mark.slow
def test_unlearn_eval_and_erase_on_two_processes_give_the_metrics_of_one(digits_world, tmp_path):
    """UCE erases "three" from a tiny text-to-image model (a closed form: the run is mostly its evaluation);
    eight generations per set in batches of 2, so that both processes generate, judge and measure FID."""
    from tiny_diffusion import tiny_sd_pipeline

    pipeline = tiny_sd_pipeline(tmp_path / "t2i", vae=False)
    recipe = {
        "method": {"name": "uce"},
        "model": {"family": "diffusion", "checkpoint": str(pipeline)},
        "data": {"dataset": "digits", "concept": "three"},
        "eval": {"samples": 8, "steps": 2, "batch_size": 2, "cache": False},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    erased = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        _unlearn(["erase", str(tmp_path / "recipe.yaml"), "-o", str(out)], processes, tmp_path)
        erased[processes] = json.loads((out / "metrics.json").read_text())
    assert erased[2]["num_processes"] == 2
    assert {k: v for k, v in erased[2].items() if k not in NOT_COMPARED} == {
        k: v for k, v in erased[1].items() if k not in NOT_COMPARED
    }
    assert "fid" in erased[1] and "retain_accuracy" in erased[1] and "original_fid" in erased[1]
    evaluated = {
        n: json.loads(_unlearn(["eval", str(tmp_path / "run1"), "--json"], n, tmp_path).stdout)
        for n in (1, 2)
    }
    assert evaluated[2] == evaluated[1]  # exactly, every metric
    assert {k: v for k, v in evaluated[1].items()} == {
        k: v for k, v in erased[1].items() if k in evaluated[1]
    }, "unlearn eval scores the run as it was scored"


def _same(a: dict, b: dict) -> bool:
    """Equal metrics, exactly; NaN (an R the attack cannot tell) equals NaN."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.slow
def test_attacks_on_two_processes_give_the_metrics_of_one(digits_world, tmp_path):
    """Two cheap prompt attacks (seed_search, random_prompt) on a tiny text-to-image model, against a UCE run as the
    control (any finished run folder serves): `unlearn erase` and `unlearn eval` on 2 processes attack as 1 does,
    every metric equal, whether the original's and Retrain's results are attacked afresh or read from the cache
    the main process wrote. Candidates are drawn 4 at a time and judged 2 at a time: both processes generate."""
    from tiny_diffusion import tiny_sd_pipeline

    pipeline = tiny_sd_pipeline(tmp_path / "t2i", vae=False)
    small = {"generations": 18, "targets": 2, "batch": 4}
    recipe = {
        "method": {"name": "uce"},
        "model": {"family": "diffusion", "checkpoint": str(pipeline)},
        "data": {"dataset": "digits", "concept": "three"},
        "eval": {"samples": 4, "steps": 2, "batch_size": 2, "cache": False, "metrics": ["erasure_rate"]},
    }
    (tmp_path / "reference.yaml").write_text(yaml.safe_dump(recipe))
    _unlearn(["erase", str(tmp_path / "reference.yaml"), "-o", str(tmp_path / "reference")], 1, tmp_path)
    recipe["method"] = {"name": "uce", "erase_scale": 0.5}  # another edit than the control's
    recipe["eval"] |= {
        "reference": str(tmp_path / "reference"),
        "attacks": [{"name": "seed_search", **small}, {"name": "random_prompt", **small}],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cache = tmp_path / "reference" / "attacks"

    def cleared() -> None:
        for entry in cache.iterdir():
            entry.unlink()

    erased = {}
    for processes in (1, 2):
        if cache.exists():
            cleared()  # attacked afresh on every model
        out = tmp_path / f"run{processes}"
        _unlearn(["erase", str(tmp_path / "recipe.yaml"), "-o", str(out)], processes, tmp_path, port=29553)
        erased[processes] = json.loads((out / "metrics.json").read_text())
        assert (out / "attacks.json").exists() and "### seed_search" in (out / "report.md").read_text()
    names = ("seed_search", "random_prompt")
    attack_keys = [
        k for k in erased[1] if k.split(".")[0].removeprefix("original_").removeprefix("retrain_") in names
    ]
    assert "seed_search.R" in attack_keys and "original_random_prompt.success" in attack_keys
    assert _same(
        {k: v for k, v in erased[2].items() if k not in NOT_COMPARED},
        {k: v for k, v in erased[1].items() if k not in NOT_COMPARED},
    )
    # one entry per attack, role (original, Retrain) and seed, written once, by the main process
    assert len(list(cache.iterdir())) == 2 * 2 * 2

    def evaluate(processes: int) -> dict:
        result = _unlearn(["eval", str(tmp_path / "run1"), "--json"], processes, tmp_path, port=29553)
        return json.loads(result.stdout)

    from_cache = evaluate(2)
    cleared()
    evaluated = {2: evaluate(2), 1: evaluate(1)}
    assert _same(evaluated[2], evaluated[1]) and _same(from_cache, evaluated[1])  # exactly, every metric
    assert _same({k: evaluated[1][k] for k in attack_keys}, {k: erased[1][k] for k in attack_keys})
