"""The accelerate configs shipped under recipes/accelerate/ are valid for the installed accelerate.

They are `.yml` files: the recipe tools (`unlearn check`, `unlearn ls recipes`) take every recipes/**/*.yaml for
an erase recipe.

Each file goes through accelerate's own code: its config loader (`load_config_from_file`, as `accelerate launch
--config_file` reads it), the launcher's translation into the environment the processes get
(`_validate_launch_command`, `prepare_multi_gpu_env`), and, for the FSDP configs, the plugin every launched
process builds from that environment (`FullyShardedDataParallelPlugin`), whose wrap policy must find its layer
classes in a text-to-image UNet. No process is launched and no GPU is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_diffusion import TINY_T2I

CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"
# file -> (distributed type, FSDP parameters offloaded to the CPU); FSDP configs are FSDP2
EXPECTED = {
    "ddp.yml": ("MULTI_GPU", None),
    "fsdp_sd.yml": ("FSDP", False),
    "fsdp_sdxl_offload.yml": ("FSDP", True),
}


def launch_environment(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG -m unlearn erase RECIPE` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        [
            "--config_file",
            str(config),
            "--main_process_port",
            "29751",
            "-m",
            "unlearn",
            "erase",
            "recipe.yaml",
        ]
    )
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def test_every_shipped_config_is_listed():
    # .yml, not .yaml: `unlearn check` / `unlearn ls recipes` read every recipes/**/*.yaml as an erase recipe
    assert sorted(path.name for path in CONFIGS.iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert isinstance(config, ClusterConfig)
    assert str(config.distributed_type).split(".")[-1] == EXPECTED[name][0]
    assert not config.use_cpu
    assert config.num_machines == 1 and config.num_processes >= 2
    # the header says what the file is for and how to launch it
    header = (CONFIGS / name).read_text(encoding="utf-8").split("compute_environment:")[0]
    assert f"accelerate launch --config_file recipes/accelerate/{name} " in header
    assert "-m unlearn erase" in header and "For:" in header


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launcher_environment(name):
    env = launch_environment(CONFIGS / name)
    kind, offload = EXPECTED[name]
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if kind != "FSDP":
        assert env.get("ACCELERATE_USE_FSDP", "false") == "false"
        return
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "2"
    assert env["FSDP_OFFLOAD_PARAMS"] == str(offload).lower()
    # activation checkpointing is the recipe's (the UNet's own), never FSDP's on top of it
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"


@pytest.mark.parametrize("name", [name for name, (kind, _) in sorted(EXPECTED.items()) if kind == "FSDP"])
def test_fsdp_plugin_wraps_a_text_to_image_unet(name, monkeypatch):
    """Every launched process builds this plugin from the environment; the FSDP2 wrap policy accelerate makes of
    it must find the named layer classes in the UNet (it raises if one is missing) and shard exactly those."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.fsdp import CPUOffloadPolicy

    for key, value in launch_environment(CONFIGS / name).items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == EXPECTED[name][1]
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert not plugin.sync_module_states and not plugin.cpu_ram_efficient_loading

    unet = UNet2DConditionModel(**TINY_T2I)
    plugin.set_auto_wrap_policy(unet)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, unet)
    wrapped = {type(module) for module in unet.modules() if policy(module)}
    assert wrapped == {BasicTransformerBlock, ResnetBlock2D}


@pytest.mark.slow
def test_fsdp_config_shards_a_unet_on_cpu(tmp_path):
    """`benchmarks/scaling.py --size tiny`: the shipped fsdp_sd.yml, launched on 2 CPU processes (accelerate's
    state set to FSDP, as the benchmark says), shards the UNet (FSDP2), makes the steps of the one-process run,
    and holds less memory per process than DDP (the same job under ddp.yml). About 3 minutes on 2 cores."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "scaling.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "scaling.py"
    command = [
        sys.executable,
        str(script),
        "--size",
        "tiny",
        "--steps",
        "2",
        "--skip-generation",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = json.loads(out.read_text())["training"]
    ddp, fsdp = runs["DDP x2"], runs["FSDP x2"]
    assert ddp["wrapper"] == "DistributedDataParallel"
    assert fsdp["distributed_type"] == "FSDP" and fsdp["wrapper"].startswith("FSDP2")
    for run in (ddp, fsdp):
        assert run["loss_max_rel_diff_vs_1"] < 1e-5
    assert max(fsdp["peak_mib_per_process"]) < 0.8 * max(ddp["peak_mib_per_process"])


def test_an_fsdp_launch_that_would_not_shard_is_refused_in_one_sentence(monkeypatch):
    """Under an FSDP config on a machine without a GPU accelerate runs plain DDP, and a method whose loop does not
    shard its model would run unsharded: both refused before any work; the methods that shard pass."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from unlearn.errors import ConfigError
    from unlearn.methods import get_method
    from unlearn.pipeline import check_sharding

    esd, doco = get_method("esd", family="diffusion")(), get_method("doco", family="diffusion")()
    cpu = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    check_sharding(doco, cpu)  # no FSDP asked: anything runs
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ConfigError, match="an FSDP launch config needs GPUs .*MULTI_CPU.*ddp.yml") as refused:
        check_sharding(esd, cpu)
    assert "\n" not in str(refused.value)
    check_sharding(esd, fsdp)
    check_sharding(get_method("salun", family="diffusion")(), fsdp)
    with pytest.raises(
        ConfigError, match="'doco' does not shard its model under FSDP yet.*: esd, grad_ascent, salun\\)$"
    ):
        check_sharding(doco, fsdp)
