"""Scaling and memory of UNet training under DDP and FSDP, and generation throughput, side by side in one run.

    python benchmarks/scaling.py --size tiny                 # CPU: a tiny SD-shaped UNet, gloo (smoke test)
    python benchmarks/scaling.py --size small                # CPU: an SD-shaped UNet of 8 M parameters
    python benchmarks/scaling.py --size sd15 --processes 2   # GPUs: SD v1.x's UNet (860 M), bf16, checkpointing

One invocation launches, one after the other, the same training job three times: on 1 process (the plain model,
as `unlearn.train.data_parallel` leaves it), on N processes under DDP (`recipes/accelerate/ddp.yml`) and on N
processes under FSDP2 (`recipes/accelerate/fsdp_sd.yml`), these two by `accelerate launch --config_file` with
the shipped config. The job: a UNet2DConditionModel built from its config (random weights, no download), every
parameter trained (the full-UNet methods: SalUn, ESD-u, gradient ascent), AdamW, the noise-prediction loss on a
global batch drawn alike in every process from one seed and split across them (`unlearn.train.shard`), so the
three runs make the same optimizer steps; the table shows their losses' largest relative difference. Each run
reports its steps per second (after one warm-up step) and, per process, its peak memory:

- GPU: `torch.cuda.max_memory_allocated()`, everything the process allocated on its GPU.
- CPU: `torch.distributed._tools.mem_tracker.MemTracker`, torch's tensor memory tracker (it counts the bytes of
  live tensors, parameters, gradients, optimizer states, activations and temporaries, through a dispatch mode);
  plus the growth of the process's peak RSS from before the model was built (`ru_maxrss`, which also counts the
  allocator's slack and libraries loaded on first use: coarse at tiny size).

Speed-up = steps/s on N processes / steps/s on 1 process, for the same global batch; scaling efficiency =
speed-up / N (1.0: N devices go N times as fast). On a CPU whose cores the processes share (2 cores here), it
measures the overhead of the collectives and the sharding, not a speed-up.

Then the evaluation's generation throughput in one process (`Diffusion.generate`, DDIM, guidance as the
recipes use it): images per second at UNet batch 1 and at `--gen-batch`, fp32, and bf16 autocast on a GPU. (At
SD size; `benchmarks/generation_throughput.py` measures the digits world's models, on several processes too.)

accelerate 1.16 turns FSDP on only for accelerator devices: under a CPU launch (gloo) its state says MULTI_CPU
and `prepare` silently gives DDP. On CPU the benchmark therefore sets accelerate's state to FSDP with the plugin
the launcher built from the config (CPU only; the table names the wrapper each run really had), so
that the very code path of a GPU run (`accelerator.prepare(unet, optimizer)` under FSDP2) runs at small sizes.

Writes `benchmarks/results/scaling_<size>_<device>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = ROOT / "recipes" / "accelerate"
sys.path.insert(0, str(HERE))
from sd_step import SD_UNET, TINY_UNET, build_pipeline  # noqa: E402

from unlearn.checkpoints import write_json  # noqa: E402
from unlearn.train import shard  # noqa: E402

# SD v1.x's UNet layout (four levels, two layers each, cross-attention on three) at a tenth of its width
SMALL_UNET = {
    **SD_UNET,
    "sample_size": 16,
    "block_out_channels": (32, 64, 128, 128),
    "cross_attention_dim": 64,
}
SIZES = {
    # UNet config, latent side, text states (tokens, width), global batch, timed steps, gradient checkpointing
    "tiny": dict(unet=TINY_UNET, side=8, tokens=8, width=16, batch=8, steps=10, checkpointing=True),
    "small": dict(unet=SMALL_UNET, side=16, tokens=16, width=64, batch=8, steps=5, checkpointing=True),
    "sd15": dict(unet=SD_UNET, side=64, tokens=77, width=768, batch=8, steps=10, checkpointing=True),
}
MIB = 2**20


# ----------------------------------------------------------------------------------------------------- worker
def rss_mib() -> float:
    """The process's peak resident set size so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_accelerator(on_gpu: bool):
    """The run's Accelerator, as `unlearn.pipeline.make_accelerator` builds it (bf16 on a GPU; cpu=True under a
    CPU launch), with accelerate's state set to FSDP on CPU when the launcher was given an FSDP config."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(mixed_precision="bf16" if on_gpu else "no", cpu=not on_gpu)
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false") == "true"
    if fsdp_asked and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # accelerate enables FSDP only for accelerator devices (AcceleratorState); torch's FSDP2 itself runs on
        # gloo. The plugin is the one every process builds from the launcher's environment (the config file).
        # PartialState's copy too: accelerate re-reads it (its FSDP2 prepare builds a PartialState).
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    return accelerator


def worker(size: str, steps: int, batch: int, out: Path) -> None:
    from diffusers import UNet2DConditionModel

    on_gpu = torch.cuda.is_available()
    spec = SIZES[size]
    accelerator = make_accelerator(on_gpu)
    device = accelerator.device
    rss_before = rss_mib()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"]).to(device)
    if spec["checkpointing"]:
        unet.enable_gradient_checkpointing()  # what a recipe's `train.gradient_checkpointing: true` turns on
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    wrapper = "plain model (1 process)"
    if accelerator.num_processes > 1:
        if accelerator.is_fsdp2:  # FSDP2 shards in place and needs the optimizer in the same prepare call
            unet, optimizer = accelerator.prepare(unet, optimizer)
        else:
            unet = accelerator.prepare(unet)
            optimizer = accelerator.prepare(optimizer)
        from torch.distributed.tensor import DTensor

        first = next(unet.parameters())
        wrapper = (
            f"FSDP2 ({type(unet).__name__}, sharded DTensor parameters)"
            if isinstance(first, DTensor)
            else type(unet).__name__
        )
    generator = torch.Generator().manual_seed(1)
    side, tokens, width = spec["side"], spec["tokens"], spec["width"]

    def step() -> float:
        # the global batch, drawn alike in every process, then this process's share of it
        latents = torch.randn(batch, 4, side, side, generator=generator)
        noise = torch.randn(batch, 4, side, side, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        cond = torch.randn(batch, tokens, width, generator=generator)
        latents, noise, t, cond = (
            v.to(device) for v in shard(accelerator, latents, noise, t, cond)
        )  # the toolkit's split
        x_t = latents + noise * (t.float() / 1000).view(-1, 1, 1, 1)  # any noising: the cost is the UNet's
        with accelerator.autocast():
            prediction = unet(x_t, t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the global batch's loss: the mean of the equal shares' losses
        return float(accelerator.reduce(loss.detach(), reduction="mean"))

    losses = [step()]  # warm-up: allocator, lazy optimizer state, first gathers
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    accelerator.wait_for_everyone()
    started = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    categories = {}
    if on_gpu:
        peak = torch.cuda.max_memory_allocated() / MIB
    else:  # one more step under the tracker (its dispatch mode slows the step: not timed)
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(unet, optimizer)
        with tracker:
            losses.append(step())
        per_device = next(iter(tracker.get_tracker_snapshot("peak").values()))
        peak = per_device["Total"] / MIB
        categories = {str(k).split(".")[-1].lower(): v / MIB for k, v in per_device.items() if k != "Total"}
    mine = torch.tensor([peak, rss_mib() - rss_before], dtype=torch.float64, device=device)
    every = accelerator.gather(mine.unsqueeze(0)).cpu().tolist()
    if accelerator.is_main_process:
        result = {
            "processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "wrapper": wrapper,
            "precision": accelerator.mixed_precision,
            "global_batch": batch,
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "timed_steps": steps,
            "seconds": seconds,
            "steps_per_s": steps / seconds,
            "losses": losses,
            "peak_mib_per_process": [row[0] for row in every],
            "peak_rss_growth_mib_per_process": [row[1] for row in every],
            "memory_measure": "torch.cuda.max_memory_allocated" if on_gpu else "MemTracker (live tensors)",
            "main_process_peak_by_category_mib": categories,
        }
        out.write_text(json.dumps(result, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()


# ------------------------------------------------------------------------------------------------ orchestrator
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(config: str | None, processes: int, size: str, steps: int, batch: int, out: Path) -> dict:
    """One training job: `python scaling.py --worker` on 1 process, else under `accelerate launch --config_file`."""
    script = [str(Path(__file__).resolve()), "--worker", "--size", size, "--steps", str(steps)]
    script += ["--batch", str(batch), "--worker-out", str(out)]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--num_processes", str(processes), "--main_process_port", str(free_port()), *script,
        ]  # fmt: skip
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(out.read_text())


def generation(size: str, gen_batch: int, images: int, steps: int, on_gpu: bool) -> list[dict]:
    """Images per second of `Diffusion.generate` in one process: UNet batch 1 vs `gen_batch`, fp32 vs bf16."""
    model = build_pipeline("sd15" if size == "sd15" else "tiny")
    device = torch.device("cuda" if on_gpu else "cpu")
    model.to(device)
    prompts = [f"a photo of a {word}" for word in ("cat", "dog", "tree", "house")] * (images // 4 + 1)
    prompts = prompts[:images]
    rows = []
    settings = [(1, None), (gen_batch, None)] + (
        [(1, torch.bfloat16), (gen_batch, torch.bfloat16)] if on_gpu else []
    )
    for batch, dtype in settings:
        model.generate(prompts[:batch], steps=2, guidance=7.5, batch_size=batch, dtype=dtype)  # warm-up
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(prompts, steps=steps, guidance=7.5, batch_size=batch, dtype=dtype)
        if on_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rows.append(
            {
                "batch": batch,
                "dtype": "bf16" if dtype is not None else "fp32",
                "images": images,
                "ddim_steps": steps,
                "images_per_s": images / seconds,
            }
        )
    return rows


def computed_model_state(processes: int) -> list[dict]:
    """Model state per process of a full SD v1.5 UNet fine-tune with AdamW (fp32 weights, gradients and two
    moments: 16 bytes per parameter), by DDP (whole on every process) and FSDP (1/N each), counted on a UNet
    built on the meta device. Computed, not measured: activations, the gathered block and the frozen parts
    come on top."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD_UNET)
    count = sum(p.numel() for p in unet.parameters())
    xattn = sum(p.numel() for name, p in unet.named_parameters() if "attn2" in name)
    rows = []
    for trained, n_params in (("full", count), ("xattn", xattn)):
        # every weight in fp32; gradients and the two AdamW moments of the trained ones
        state = 4 * count + 12 * n_params
        sharded = state / processes
        rows.append(
            {
                "trained": trained,
                "trained_parameters": n_params,
                "ddp_gib": state / 2**30,
                "fsdp_gib": sharded / 2**30,
                "processes": processes,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, help="timed training steps (default: the size's)")
    parser.add_argument("--batch", type=int, help="global batch (default: the size's)")
    parser.add_argument("--gen-batch", type=int, default=16, help="UNet batch of the batched generation")
    parser.add_argument("--gen-images", type=int, default=32)
    parser.add_argument("--skip-generation", action="store_true", help="time the training runs only")
    parser.add_argument(
        "--gen-steps", type=int, help="DDIM steps of the generation (default: 25 tiny, 50 sd15)"
    )
    parser.add_argument("--out", help="default: benchmarks/results/scaling_<size>_<device>.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = SIZES[args.size]
    steps, batch = args.steps or spec["steps"], args.batch or spec["batch"]
    if args.worker:
        worker(args.size, steps, batch, Path(args.worker_out))
        return
    on_gpu = torch.cuda.is_available()
    if args.size == "sd15" and not on_gpu:
        raise SystemExit("--size sd15 needs GPUs (one per process); on CPU use --size tiny")
    if on_gpu and torch.cuda.device_count() < args.processes:
        raise SystemExit(
            f"{args.processes} processes need {args.processes} GPUs; {torch.cuda.device_count()} seen"
        )
    device_name = torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)"
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"scaling_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    n = args.processes
    runs = {
        "1 process": launch(None, 1, args.size, steps, batch, work / "one.json"),
        f"DDP x{n}": launch("ddp.yml", n, args.size, steps, batch, work / "ddp.json"),
        f"FSDP x{n}": launch("fsdp_sd.yml", n, args.size, steps, batch, work / "fsdp.json"),
    }
    single = runs["1 process"]
    for run in runs.values():
        run["speed_up"] = run["steps_per_s"] / single["steps_per_s"]
        run["efficiency"] = run["speed_up"] / run["processes"]
        run["loss_max_rel_diff_vs_1"] = max(
            abs(a - b) / max(abs(b), 1e-12) for a, b in zip(run["losses"], single["losses"])
        )
    gen_steps = args.gen_steps or (50 if args.size == "sd15" else 25)
    gen = (
        []
        if args.skip_generation
        else generation(args.size, args.gen_batch, args.gen_images, gen_steps, on_gpu)
    )
    computed = computed_model_state(n)

    print(
        f"UNet training ({args.size}, {single['unet_parameters'] / 1e6:.2f} M parameters, all trained, AdamW, "
        f"global batch {batch}, {steps} timed steps, gradient checkpointing {spec['checkpointing']}) on {device_name}"
    )
    memory = single["memory_measure"]
    print(
        f"{'run':10s} {'wrapper':46s} {'steps/s':>8s} {'speed-up':>8s} {'effic.':>6s} "
        f"{'peak MiB/proc':>14s} {'RSS+ MiB/proc':>14s} {'loss rel diff':>13s}"
    )
    for name, run in runs.items():
        peak = "/".join(f"{v:.1f}" for v in run["peak_mib_per_process"])
        rss = "/".join(f"{v:.0f}" for v in run["peak_rss_growth_mib_per_process"])
        print(
            f"{name:10s} {run['wrapper'][:46]:46s} {run['steps_per_s']:8.2f} {run['speed_up']:8.2f} "
            f"{run['efficiency']:6.2f} {peak:>14s} {rss:>14s} {run['loss_max_rel_diff_vs_1']:13.1e}"
        )
    ddp, fsdp = runs[f"DDP x{n}"], runs[f"FSDP x{n}"]
    print(
        f"peak memory per process ({memory}): FSDP / DDP = "
        f"{max(fsdp['peak_mib_per_process']) / max(ddp['peak_mib_per_process']):.2f}, DDP x{n} / 1 process = "
        f"{max(ddp['peak_mib_per_process']) / max(single['peak_mib_per_process']):.2f}"
    )
    if not on_gpu:
        print(
            f"(CPU: {os.cpu_count()} cores shared by the processes: the speed-up measures collective overhead)"
        )
    if gen:
        print(
            f"\nGeneration of the {'sd15' if args.size == 'sd15' else 'tiny'} pipeline (Diffusion.generate, "
            f"{args.gen_images} images, {gen_steps} DDIM steps, guidance 7.5, one process)"
        )
    for row in gen:
        print(
            f"  batch {row['batch']:3d} {row['dtype']:5s} {row['images_per_s']:9.2f} images/s "
            f"({row['images_per_s'] / gen[0]['images_per_s']:.2f}x batch 1 fp32)"
        )
    print(f"\nComputed (not measured): model state per process of an SD v1.5 UNet fine-tune, {n} processes")
    for row in computed:
        print(
            f"  trained {row['trained']:5s} ({row['trained_parameters'] / 1e6:6.1f} M): DDP {row['ddp_gib']:6.2f} GiB, "
            f"FSDP {row['fsdp_gib']:6.2f} GiB"
        )
    out = Path(args.out or HERE / "results" / f"scaling_{args.size}_{'cuda' if on_gpu else 'cpu'}.json")
    write_json(
        {
            "device": device_name,
            "size": args.size,
            "processes": n,
            "global_batch": batch,
            "timed_steps": steps,
            "gradient_checkpointing": spec["checkpointing"],
            "torch": torch.__version__,
            "training": runs,
            "generation_pipeline": "sd15" if args.size == "sd15" else "tiny",
            "generation": gen,
            "computed_sd15_model_state": computed,
        },
        out,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
