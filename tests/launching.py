"""A script run on one process, or under `accelerate launch` on several (with no GPU visible: gloo on the CPU),
for the tests that compare the two runs of a recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# What may differ between the runs: the run time and where it ran.
NOT_COMPARED = {"RTE_s", "device", "num_processes"}
# train.jsonl keys that are not losses
NOT_LOSSES = {"stage", "epoch", "step", "phase", "lr", "elapsed_s"}


def launch(
    script: Path, args: list[str], processes: int, cwd: Path, port: int, config: Path | None = None
) -> None:
    """Run `script args` in one process, or on `processes` under `accelerate launch` (`--multi_gpu`, or the
    accelerate `config` file), the main process on `port` (one per test file, so that files may run at once)."""
    command = [sys.executable, str(script), *args]
    if processes > 1:
        how = ["--config_file", str(config)] if config else ["--multi_gpu"]
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            *how, "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            *command[1:],
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
