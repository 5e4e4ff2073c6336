"""Two CPU processes (gloo) run a recipe like one: outputs written once, the same scores within noise.

The launch that works with accelerate on a machine without a GPU is

    accelerate launch --multi_gpu --num_processes 2 -m unlearn erase RECIPE -o DIR

(`--cpu --num_processes 2` starts a single process unless an MPI hostfile is given). The pipeline sees the
launch (WORLD_SIZE=2) and no GPU and asks accelerate for its CPU backend (gloo); see `pipeline.use_cpu`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "classifier" / "digits" / "random_label.yaml")
# Points of difference allowed between the two runs (one seed each; the two-process run sees other batches).
TOLERANCE = {"UA": 6.0, "RA": 3.0, "TA": 3.0}

pytestmark = pytest.mark.slow


def launch(args: list[str], processes: int, cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, "-m", "unlearn", *args]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
            "-m", "unlearn", *args,
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_dir()}


def log_messages(folder: Path) -> list[str]:
    """run.log without timestamps, numbers and the run folder's name."""
    lines = (folder / "run.log").read_text().replace(str(folder), "DIR").splitlines()
    return [re.sub(r"[-+]?\d+(\.\d+)?", "#", line.split(" ", 2)[2]) for line in lines]


def test_two_processes_write_once_and_match_one(digits_world, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    launch(["erase", RECIPE, "-o", str(single)], 1, tmp_path)
    launch(["erase", RECIPE, "-o", str(multi)], 2, tmp_path)

    one = json.loads((single / "metrics.json").read_text())
    two = json.loads((multi / "metrics.json").read_text())
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    reference_two = json.loads((multi / "reference" / "metrics.json").read_text())
    assert reference_two["num_processes"] == 2, "the Retrain reference must run on both processes too"

    # The same files, each written once: no second copy, no temporary or leftover resume state.
    assert files(multi) == files(single)
    assert not any(name.startswith(".") for name in files(multi)), files(multi)
    assert not (multi / "checkpoints").exists() and not (multi / "reference" / "checkpoints").exists()
    assert log_messages(multi) == log_messages(single), "run.log differs (doubled or missing lines)"
    epochs = [json.loads(line)["epoch"] for line in (multi / "train.jsonl").read_text().splitlines()]
    epoch_lines = [
        json.loads(line)["epoch"]
        for line in (multi / "train.jsonl").read_text().splitlines()
        if json.loads(line)["phase"] == "epoch"
    ]
    assert epoch_lines == sorted(set(epochs)), "each epoch must be logged once"

    for key, tolerance in TOLERANCE.items():
        assert abs(one[key] - two[key]) <= tolerance, f"{key}: one process {one[key]:.2f}, two {two[key]:.2f}"
        assert abs(one[f"retrain_{key}"] - two[f"retrain_{key}"]) <= tolerance, f"retrain {key}"
    print(json.dumps({k: (round(one[k], 2), round(two[k], 2)) for k in ("UA", "RA", "TA", "MIA")}))


FIT_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import TensorDataset
from unlearn.train import Phase, fit, make_loader, make_optimizer

config = DataLoaderConfiguration(use_seedable_sampler=True, split_batches=True)
accelerator = Accelerator(cpu=True, dataloader_config=config)
set_seed(0)
data = TensorDataset(torch.arange(64.0).view(64, 1), torch.arange(64))
model = torch.nn.Linear(1, 1)
steps = []

def loss(model, batch):
    x, index = batch
    steps.append({"index": index.tolist(), "draw": torch.rand(3).tolist()})
    return model(x / 64).pow(2).mean()

optimizer = make_optimizer(model.parameters(), "sgd", lr=0.1)
fit(model, [Phase(make_loader(data, 16), loss)], optimizer, accelerator, epochs=2)
result = {"steps": steps, "after": torch.rand(2).tolist(), "weight": model.weight.item()}
with open(f"{sys.argv[1]}/rank{accelerator.process_index}.json", "w") as handle:
    json.dump(result, handle)
accelerator.wait_for_everyone()
accelerator.end_training()  # destroy the gloo group: exiting with it alive can abort a process at teardown
"""


def test_fit_shards_batches_and_gives_each_process_its_own_random_stream(tmp_path):
    """Each process sees its half of every batch, draws its own random numbers (random labels, crops), and
    leaves fit() with the main process's RNG state; the run is reproducible."""
    script = tmp_path / "fit_two.py"
    script.write_text(FIT_SCRIPT)
    runs = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        out.mkdir()
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534",
            str(script), str(out),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-5000:]
        runs.append([json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)])

    zero, one = runs[0]
    assert len(zero["steps"]) == len(one["steps"]) == 8  # 64 examples, global batch 16, 2 epochs
    for epoch in (0, 1):
        seen = []
        for a, b in zip(zero["steps"][4 * epoch : 4 * epoch + 4], one["steps"][4 * epoch : 4 * epoch + 4]):
            assert len(a["index"]) == len(b["index"]) == 8
            assert not set(a["index"]) & set(b["index"]), "both processes got the same examples"
            assert a["draw"] != b["draw"], "both processes drew the same random numbers"
            seen += a["index"] + b["index"]
        assert sorted(seen) == list(range(64)), "an epoch must visit every example once"
    assert zero["after"] == one["after"], "after fit() every process must hold the main process's RNG state"
    assert zero["weight"] == one["weight"]
    assert runs[0] == runs[1], "two launches of the same script must agree exactly"
