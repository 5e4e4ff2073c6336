"""fit(): the one visible training loop, on accelerate.

Mixed precision (no / fp16 / bf16) and gradient accumulation come from the `Accelerator`; the loop adds
gradient masks (with pinned weights), gradient clipping, a learning-rate schedule, a progress bar, a JSON-lines
log and checkpoint-and-resume at epoch boundaries. Methods with two optimizers or two stages write their own
loop from the same parts.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoints import atomic_path, load_into, load_state_dict, save_state_dict
from .errors import ConfigError, DataError, TrainingError
from .params import ParamMask

LossFn = Callable[[nn.Module, tuple], torch.Tensor]


@dataclass
class Phase:
    """One pass over `loader` per epoch with its own loss; an epoch runs its phases in order."""

    loader: DataLoader
    loss: LossFn
    name: str = "train"


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, drop_last=False
    )


def endless(dataset: Dataset, batch_size: int) -> Iterator:
    """Shuffled batches of `dataset` forever, reshuffled at every pass (step-counted loops draw from it)."""
    if len(dataset) == 0:
        raise DataError("cannot draw batches from an empty dataset")
    loader = make_loader(dataset, batch_size)
    while True:
        yield from loader


def make_optimizer(
    params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """SGD (with momentum) or Adam/AdamW, the optimizers of the reference code."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; known: sgd, adam, adamw")


def random_crop_flip(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """RandomCrop(padding) + RandomHorizontalFlip on a batch, the CIFAR training augmentation."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device)[None, :])[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    out = padded[batch, channel, rows, cols]
    flip = torch.rand(n, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


AUGMENTATIONS = {"none": None, "crop_flip": random_crop_flip}


def _lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    if schedule == "linear":
        return lambda step: max(0.0, 1.0 - step / max(total_steps, 1))
    raise ConfigError(f"unknown lr schedule {schedule!r}; known: constant, cosine, linear")


def fit(
    model: nn.Module,
    phases: Sequence[Phase],
    optimizer: torch.optim.Optimizer,
    accelerator,
    epochs: int,
    *,
    lr_schedule: str = "constant",
    mask: ParamMask | None = None,
    max_grad_norm: float | None = None,
    augment: str = "none",
    stage: str = "fit",
    log_every: int = 20,
    checkpoint_every: int = 1,
    after_step: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Train `model` for `epochs` epochs over `phases`; returns the trained (unwrapped) model.

    Args:
        model: a family adapter; masks name parameters of `model.trainable`.
        phases: passes per epoch, each with its loader and loss `loss(prepared_model, batch)`.
        optimizer: built over the model's parameters.
        accelerator: an `accelerate.Accelerator`; if it has a `project_dir`, the loop logs to
            `project_dir/train.jsonl` and checkpoints to `project_dir/checkpoints/<stage>` every
            `checkpoint_every` epochs, and a rerun resumes from the last checkpoint.
        epochs: number of epochs.
        lr_schedule: constant, cosine or linear decay over all optimizer steps.
        mask: pinned weights never move (gradients masked, values and optimizer state restored per step).
            A pruned model's `pruning_mask` is always added: its pruned weights stay exactly zero.
        max_grad_norm: clip the gradient norm to this value.
        augment: batch augmentation of the images ("none" or "crop_flip").
        stage: name of this training stage (for logs and checkpoints).
        log_every: also log every `log_every` optimizer steps (besides the end of each epoch).
        after_step: called as `after_step(step, total_steps)` after every optimizer step (pinned weights are
            already restored; `step` counts steps so far, from 1), e.g. a proximal update of the weights.

    Each line of `train.jsonl` is one JSON object with the fields `stage`, `epoch` (1-based), `step` (optimizer
    steps so far), `phase` (the phase's name, or "epoch" for the end-of-epoch line), `loss` (mean loss of the
    epoch so far, averaged over processes), `lr` (after the step) and `elapsed_s` (since this call started).
    A loss that is NaN or infinite at a log point raises `TrainingError` (no checkpoint of it is written).
    """
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {augment!r}; known: {', '.join(AUGMENTATIONS)}")
    augment_fn = AUGMENTATIONS[augment]
    unwrapped = model
    from accelerate.utils import send_to_device

    place, non_blocking = _batch_placement(accelerator)
    placement = [None, None, *[False] * len(phases)] if place else None
    prepared = accelerator.prepare(
        model, optimizer, *[phase.loader for phase in phases], device_placement=placement
    )
    model, optimizer, loaders = prepared[0], prepared[1], prepared[2:]
    pinned = pinned_params(unwrapped, mask)  # after prepare(): the masks live on the model's device
    accum = accelerator.gradient_accumulation_steps
    steps_per_epoch = sum(math.ceil(len(loader) / accum) for loader in loaders)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, _lr_factor(lr_schedule, total_steps))
    optimizer_step, zero_grad = _optimizer_calls(optimizer, accelerator)

    project = Path(accelerator.project_dir) if accelerator.project_dir else None
    checkpoint_dir = project / "checkpoints" / stage if project else None
    log_path = project / "train.jsonl" if project else None
    start_epoch = _resume(checkpoint_dir, unwrapped, optimizer, scheduler, accelerator)
    step = start_epoch * steps_per_epoch

    from tqdm.auto import tqdm

    progress = tqdm(
        total=total_steps,
        initial=step,
        desc=stage,
        leave=False,
        disable=not (accelerator.is_local_main_process and sys.stderr.isatty()),
    )
    started = time.perf_counter()

    def log(phase_name: str) -> None:  # reads epoch, step and the running loss at call time
        mean = loss_sum / max(loss_count, 1)
        _log(log_path, accelerator, stage, epoch, step, phase_name, mean, scheduler, started)

    for epoch in range(start_epoch, epochs):
        _fork_rng_per_process(accelerator)
        model.train()
        loss_sum = torch.zeros((), device=accelerator.device)
        loss_count = 0
        for phase, loader in zip(phases, loaders):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for batch in loader:
                if place:
                    batch = send_to_device(batch, accelerator.device, non_blocking=non_blocking)
                with accelerator.accumulate(model):
                    if augment_fn is not None:
                        batch = (augment_fn(batch[0]), *batch[1:])
                    loss = phase.loss(model, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        for param, keep, _ in pinned:
                            if param.grad is not None:
                                param.grad.mul_(keep)
                        if max_grad_norm:
                            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                        optimizer_step()
                        zero_grad()
                loss_sum += loss.detach()
                loss_count += 1
                if accelerator.sync_gradients:
                    if pinned:
                        restore_pinned(pinned, optimizer.optimizer)
                    scheduler.step()
                    step += 1
                    if after_step is not None:
                        after_step(step, total_steps)
                    progress.update(1)
                    if step % log_every == 0:
                        log(phase.name)
        log("epoch")
        if checkpoint_dir is not None and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs):
            _save_checkpoint(checkpoint_dir, epoch + 1, unwrapped, optimizer, scheduler, accelerator)
    progress.close()
    accelerator.wait_for_everyone()
    _sync_rng(accelerator)
    return accelerator.unwrap_model(model)


def _collate_conditions(items: list) -> tuple[torch.Tensor, torch.Tensor | list[str]]:
    images = torch.stack([item[0] for item in items])
    conditions = [item[1] for item in items]
    if isinstance(conditions[0], str):
        return images, conditions
    return images, torch.stack([torch.as_tensor(c) for c in conditions])


def train_diffusion(
    model,
    dataset,
    steps: int,
    batch_size: int,
    lr: float,
    uncond_prob: float = 0.1,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    warmup_steps: int = 100,
    log_every: int = 500,
) -> list[float]:
    """Train a `Diffusion` model on `dataset` with its ordinary ε-MSE loss; deterministic for a fixed seed.

    Trains every parameter of `model` that requires grad (the UNet; for the digits t2i world also its text
    encoder), with AdamW, a linear warmup and a cosine decay of the learning rate to zero, gradients clipped
    at norm 1, fp32. Batches are epochs of a permutation drawn from a `torch.Generator` seeded with `seed`;
    the loss's noise, timesteps and condition dropout come from the global RNG, seeded with `seed` inside a
    fork so the caller's RNG state is left as it was.

    Args:
        model: a `unlearn.models.diffusion.Diffusion`.
        dataset: yields `(image, condition)`: images in [0, 1], conditions a class id or a caption.
        steps: optimizer steps.
        batch_size: images per step.
        lr: peak learning rate.
        uncond_prob: share of conditions replaced by the unconditional one (classifier-free guidance).
        seed: seed of the batch order, the noise and the dropout.
        log: called with a progress line every `log_every` steps; None for silence.
        warmup_steps: steps of linear learning-rate warmup.
        log_every: steps between progress lines.

    Returns:
        The loss of every step.
    """
    if len(dataset) == 0:
        raise DataError("cannot train a diffusion model on an empty dataset")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order_rng = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            if len(order) < batch_size:  # a new epoch; a batch may straddle two epochs
                order += torch.randperm(len(dataset), generator=order_rng).tolist()
            batch, order = _collate_conditions([dataset[i] for i in order[:batch_size]]), order[batch_size:]
            loss = model.loss(batch, uncond_prob=uncond_prob)
            if not torch.isfinite(loss):
                raise TrainingError(f"diffusion training diverged at step {step}: loss {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
                recent = losses[-log_every:]
                log(
                    f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                    f"{time.perf_counter() - started:.0f} s"
                )
    model.eval()
    return losses


def train_steps(
    model: nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    accelerator,
    steps: int,
    *,
    mask: ParamMask | None = None,
    max_grad_norm: float | None = None,
    stage: str = "train",
    log_every: int = 50,
) -> nn.Module:
    """`steps` optimizer steps on `loss_fn(step)`: the step-counted loop of the generative methods.

    The diffusion objectives draw their own batches (a forget batch and a retain batch per step, partial
    trajectories sampled from the model itself), so the loss function, not the loop, owns the data. The loop
    owns the rest: mixed precision (autocast; fp16 loss scaling through the prepared optimizer), gradient masks
    and pinned weights (`mask` and the model's `pruning_mask`, as in `fit`), clipping, NaN detection and
    `train.jsonl` logging. Single process: the model is not wrapped for data parallelism.
    """
    optimizer = accelerator.prepare(optimizer)
    pinned = pinned_params(model, mask)
    params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda step: 1.0)
    project = Path(accelerator.project_dir) if accelerator.project_dir else None
    log_path = project / "train.jsonl" if project else None
    started = time.perf_counter()
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
    model.train()
    for step in range(1, steps + 1):
        with accelerator.autocast():
            loss = loss_fn(step)
        accelerator.backward(loss)
        for param, keep, _ in pinned:
            if param.grad is not None:
                param.grad.mul_(keep)
        if max_grad_norm:
            accelerator.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if pinned:
            restore_pinned(pinned, optimizer.optimizer)
        loss_sum += loss.detach().float()
        loss_count += 1
        if step % log_every == 0 or step == steps:
            _log(log_path, accelerator, stage, 0, step, "steps", loss_sum / loss_count, scheduler, started)
            loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
    model.eval()
    return model


def _rng_types(accelerator) -> list[str]:
    return ["torch", "cuda"] if accelerator.device.type == "cuda" else ["torch"]


def _sync_rng(accelerator) -> None:
    """Give every process the main process's global RNG state (CPU, and CUDA on a GPU)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import synchronize_rng_states

        synchronize_rng_states(_rng_types(accelerator))


def _fork_rng_per_process(accelerator) -> None:
    """At an epoch start, give each process its own stream of the global RNG, derived from the main one's.

    Every process is seeded alike, so the random draws of a loss (random labels) and of the augmentation would
    be the same on every process: each process's share of the batch would get the very same labels, crops and
    flips (on the digits world this made random labeling with two processes erratic). All processes take the
    main process's state, which the other processes then reseed from with their index; the main process keeps
    its stream, so a one-process run is unchanged, and a resumed run (which restores the main process's state)
    draws what an uninterrupted one draws. Samplers are unaffected: accelerate seeded them at prepare().
    """
    if accelerator.num_processes == 1:
        return
    _sync_rng(accelerator)
    if accelerator.process_index > 0:
        base = int(torch.randint(0, 2**62, (1,)).item())
        torch.manual_seed(base + accelerator.process_index)


def _batch_placement(accelerator) -> tuple[bool, bool]:
    """Whether fit() moves batches to the device itself, and whether without blocking.

    accelerate's loader copies batch k to the device with a blocking copy, which synchronises with the GPU (it
    waits for step k-1 to finish), and only then collates batch k+1, so the GPU idles while the CPU collates: 5-10 %
    of a ResNet-18 CIFAR step on an H100. fit() takes the batches unplaced and copies each at the top of its
    step; to a CUDA device without blocking (safe from pageable memory: the driver stages the data before the
    call returns), so no step waits for the GPU. DeepSpeed, Megatron-LM and XLA place batches their own way.
    """
    from accelerate.utils import DistributedType

    own = accelerator.device_placement and accelerator.distributed_type not in (
        DistributedType.DEEPSPEED,
        DistributedType.MEGATRON_LM,
        DistributedType.XLA,
    )
    return own, bool(accelerator.non_blocking) or accelerator.device.type == "cuda"


def _optimizer_calls(optimizer, accelerator) -> tuple[Callable[[], None], Callable[[], None]]:
    """`step` and `zero_grad` for the prepared optimizer, to be called on gradient-sync steps only.

    accelerate's `AcceleratedOptimizer` re-checks per call what fit() already knows: `step` looks the LOMO package
    up with importlib twice and `zero_grad` runs `inspect.signature`, about 0.3 ms per step, which is several
    percent of a GPU step. Where the wrapper would only forward the call (no fp16 grad scaler, no XLA, no
    DeepSpeed/Megatron subclass, no LOMO optimizer) the torch optimizer is called directly.
    """
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.utils import DistributedType

    plain = (
        type(optimizer) is AcceleratedOptimizer
        and optimizer.scaler is None
        and accelerator.distributed_type != DistributedType.XLA
        and not getattr(accelerator, "has_lomo_optimizer", False)
    )
    target = optimizer.optimizer if plain else optimizer
    return target.step, lambda: target.zero_grad(set_to_none=True)


def pinned_params(model: nn.Module, mask: ParamMask | None):
    """(parameter, keep-mask, value at start) for every masked parameter of `model.trainable`.

    The model's own `pruning_mask` (set on a pruned model, "prune first, then unlearn") joins `mask`, and its
    pruned entries are zeroed first, so they start, and stay, exactly 0.0 whatever the loop does (Retrain's
    fresh weights included). A loop of its own calls this once and `restore_pinned` after every step.
    """
    pruning = getattr(model, "pruning_mask", None)
    trainable = getattr(model, "trainable", model)
    if pruning is not None:
        from .prune import apply_mask

        apply_mask(trainable, pruning)
        mask = pruning if mask is None else mask & pruning
    if mask is None:
        return []
    mask.check(trainable)
    params = dict(trainable.named_parameters())
    return [
        (params[name], keep.to(params[name].device, params[name].dtype), params[name].detach().clone())
        for name, keep in mask.masks.items()
    ]


@torch.no_grad()
def restore_pinned(pinned, optimizer: torch.optim.Optimizer) -> None:
    """Put pinned weights back and clear their optimizer state (momentum, Adam moments)."""
    for param, keep, start in pinned:
        param.copy_(torch.where(keep.bool(), param, start))
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.mul_(keep.to(value.dtype))


def _log(path, accelerator, stage, epoch, step, phase, mean_loss, scheduler, started) -> None:
    if accelerator.num_processes > 1:
        # Every process logs at the same steps: average over them, so the log shows the whole batch's loss and
        # a divergence raises on every process at once (not on one while the others wait at the next barrier).
        mean_loss = accelerator.reduce(mean_loss.detach().clone(), reduction="mean")
    value = float(mean_loss)
    if not math.isfinite(value):
        raise TrainingError(
            f"the {stage} loss became {value} at epoch {epoch + 1}, step {step}; lower the learning rate "
            "or enable gradient clipping (train.max_grad_norm)"
        )
    if path is None or not accelerator.is_main_process:
        return
    record = {
        "stage": stage,
        "epoch": epoch + 1,
        "step": step,
        "phase": phase,
        "loss": round(value, 6),
        "lr": scheduler.get_last_lr()[0],
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as log:
        log.write(json.dumps(record) + "\n")


def _save_checkpoint(folder: Path, epoch: int, model, optimizer, scheduler, accelerator) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_state_dict(model.state_dict(), tmp / "model.safetensors")
            state = {
                "optimizer": optimizer.optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "epoch": epoch,
            }
            torch.save(state, tmp / "state.pt")
    accelerator.wait_for_everyone()


def _resume(folder: Path | None, model, optimizer, scheduler, accelerator) -> int:
    """Load the last checkpoint of this stage, if any; returns the number of finished epochs."""
    if folder is None or not (folder / "state.pt").exists():
        return 0
    load_into(model, load_state_dict(folder / "model.safetensors"), str(folder))
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    optimizer.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"]:
        accelerator.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    accelerator.print(f"resuming stage {folder.name!r} after epoch {state['epoch']}")
    return int(state["epoch"])
