"""The training step and fit(), on accelerate.

`Trainer` is the one training step every loop uses: backward (mixed precision and gradient accumulation from the
`Accelerator`), gradient masks with pinned weights, clipping, the optimizer and learning-rate steps, a progress
bar, the JSON-lines log (and accelerate's trackers), and checkpoint-and-resume. `fit()` is the plain epoch loop
on it and `train_steps()` the step loop of the generative methods; loops with two optimizers or two stages
(LAF, DoCo, Adapt-then-Unlearn, the worlds) are short loops of their own on the same step, and resume alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoints import atomic_path
from .errors import ConfigError, DataError, OutputError, TrainingError
from .params import ParamMask, apply_mask

LossFn = Callable[[nn.Module, tuple], torch.Tensor]

# How often a loop checkpoints when the accelerator carries no recipe (`TrainSpec.checkpoint_every` and
# `checkpoint_every_steps` hold the recipe's).
CHECKPOINT_EVERY = {"epoch": 1, "step": 100}


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


class Batches:
    """Shuffled batches of a dataset forever, whose position a checkpoint saves (`state_dict`).

    Without `generator`, each pass is shuffled exactly as a shuffling `DataLoader` would (its two seed draws from
    the global RNG when the pass starts) and ends with a short batch. With `generator`, passes are permutations
    drawn from it and a batch may straddle two passes (the worlds' order). `collate` makes a batch of a list of
    items (default: the DataLoader's).
    """

    def __init__(self, dataset, batch_size: int, generator: torch.Generator | None = None, collate=None):
        if len(dataset) == 0:
            raise DataError("cannot draw batches from an empty dataset")
        self.dataset, self.batch_size, self.generator = dataset, batch_size, generator
        self.collate = collate or torch.utils.data.default_collate
        self.pending: list[int] = []

    def __iter__(self) -> Batches:
        return self

    def __next__(self):
        if self.generator is not None:
            if len(self.pending) < self.batch_size:
                self.pending += torch.randperm(len(self.dataset), generator=self.generator).tolist()
        elif not self.pending:
            torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed, unused here
            seed = int(torch.empty((), dtype=torch.int64).random_().item())  # its RandomSampler's
            self.pending = torch.randperm(
                len(self.dataset), generator=torch.Generator().manual_seed(seed)
            ).tolist()
        indices, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
        return self.collate([self.dataset[i] for i in indices])

    def state_dict(self) -> dict:
        generator = self.generator.get_state() if self.generator is not None else None
        return {"pending": list(self.pending), "generator": generator}

    def load_state_dict(self, state: dict) -> None:
        self.pending = list(state["pending"])
        if self.generator is not None:
            self.generator.set_state(state["generator"])


def endless(dataset: Dataset, batch_size: int) -> Batches:
    """Shuffled batches of `dataset` forever, reshuffled at every pass (step-counted loops draw from it; pass it
    in the loop's `state` so that a resumed run draws what an uninterrupted one draws)."""
    return Batches(dataset, batch_size)


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
    """RandomCrop(padding) + RandomHorizontalFlip on a batch, the CIFAR training augmentation.

    Each image gets its own crop and flip, drawn for the whole batch at once on the batch's device. Not
    torchvision's `transforms.v2`: applied to a batch tensor it draws one crop and one flip for all of its
    images, and applied image by image it is a Python loop (slower at batch 256 even on a CPU) that draws its
    random numbers in another order, so a seed would no longer give the crops that recorded runs were trained
    with (tests/test_observability.py checks both).
    """
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
    """The learning-rate multiplier of a schedule at a step, for `torch.optim.lr_scheduler.LambdaLR`.

    cosine and linear are torch's `CosineAnnealingLR(T_max=total_steps, eta_min=0)` and `LinearLR(1.0, 0.0,
    total_steps)` in closed form. Those classes compute the same schedule recursively from the previous step's
    rate, which drifts from the closed form by up to ~2e-15 (measured over 1 to 3,910 steps): every recorded
    run and benchmark would change in its last bits, so the closed form stays (tests/test_observability.py
    checks that the two agree to 1e-12).
    """
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    if schedule == "linear":
        return lambda step: max(0.0, 1.0 - step / max(total_steps, 1))
    raise ConfigError(f"unknown lr schedule {schedule!r}; known: constant, cosine, linear")


class Trainer:
    """The training step of one training stage, with its log, progress bar and checkpoints.

    A loop walks `for position in trainer.loop():` (0-based steps or epochs, from after the last checkpoint) and
    calls `trainer.step(loss)` per batch: backward (inside `accelerator.accumulate`, so the loss is scaled and
    the optimizer steps every `gradient_accumulation_steps` calls), then on the steps that sync: clipping and the
    gradients of pinned weights masked (in that order by default, `clip_before_mask`), the optimizer step, pinned
    weights and their optimizer state restored, the learning-rate step. A second optimizer (a discriminator's,
    LAF's alignment step) steps through the same call: `trainer.step(loss, optimizer=other)`. After each step
    (step loops) or epoch: a log line every `log_every` steps or every epoch, and a checkpoint every
    `checkpoint_every` steps or epochs and at the end.

    A checkpoint (`project_dir/checkpoints/<stage>/state.pt`) holds the model's trainable weights and buffers,
    the optimizers, the scheduler, the loss scaler, the global RNG and everything in `state`, and a fingerprint
    of what it continues: the stage, its settings and the model's weights at the start. A loop resumes only from
    a checkpoint with its own fingerprint; another training's checkpoint is left unread (with a message) and
    overwritten by this training's first one, so nothing is ever restored into the wrong model.

    Args:
        model: what trains (a family adapter, or the module accelerate prepared); its unwrapped trainable weights
            and buffers are checkpointed.
        optimizer: its optimizer, as accelerate prepared it (needed for fp16 loss scaling) or plain.
        accelerator: an `accelerate.Accelerator`; None for a plain fp32 single-process loop without log or
            checkpoint (the worlds, which are trained once and cached).
        stage: the stage's name, in the log and the checkpoint folder.
        total: the loop's length in `unit`s.
        unit: "step" or "epoch".
        scheduler: stepped after every step of `optimizer` (default: a constant learning rate).
        mask: pinned weights; a pruned model's `pruning_mask` always joins it (see `pinned_params`).
        max_grad_norm: clip the gradient of `optimizer`'s parameters to this L2 norm (not a second optimizer's).
        clip_before_mask: clip the full gradient, then zero the pinned weights' entries (the order of SalUn's
            reference code, `DDPM/runners/diffusion.py:saliency_unlearn`; the default); False: zero them first and
            clip what is left (the order before issue 16). Either way a pruned model's pruned entries are zeroed
            before clipping: under the reference's pruning (torch's `prune`) they have no gradient to count.
        state: more that the result depends on, checkpointed with the model: objects with `state_dict()` (another
            optimizer, a discriminator, `Batches`), a `torch.Generator`, a `random.Random`, a list of tensors, a
            prepared loader (its pass count); None values are skipped.
        settings: what else a checkpoint must match: the method (a dataclass), its data (`UnlearnData`, datasets,
            prompts), numbers; digested cheaply (datasets by their length and a few items, tensors by sums).
        log_every: steps between log lines.
        checkpoint_every: steps or epochs between checkpoints; default: the recipe's `train.checkpoint_every`
            (epochs) or `train.checkpoint_every_steps` when `pipeline.make_accelerator` built the accelerator.
        log: where messages ("resuming ...") go; default: the log the pipeline attached to the accelerator, else
            `accelerator.print`.
        steps_per_epoch: optimizer steps per epoch (epoch loops: the progress bar counts steps).

    Each line of `train.jsonl` is one JSON object with `stage`, `epoch` (1-based; 1 in step loops), `step`
    (steps so far), `phase`, the mean of each recorded loss since the last line (`loss` for the main one; in
    `fit` the mean of the epoch so far), `lr` (after the step) and `elapsed_s`. The same values go to accelerate's
    trackers (`train.log_with`). A loss that is NaN or infinite at a log point raises `TrainingError`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        accelerator=None,
        *,
        stage: str,
        total: int,
        unit: str = "step",
        scheduler=None,
        mask: ParamMask | None = None,
        max_grad_norm: float | None = None,
        clip_before_mask: bool = True,
        state: dict | None = None,
        settings: dict | None = None,
        log_every: int = 50,
        checkpoint_every: int | None = None,
        log: Callable[[str], None] | None = None,
        steps_per_epoch: int | None = None,
    ):
        if unit not in ("step", "epoch"):
            raise ValueError(f"unknown unit {unit!r}; known: step, epoch")
        self.model, self.optimizer, self.accelerator = model, optimizer, accelerator
        self.unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
        self.stage, self.total, self.unit = stage, total, unit
        self.scheduler = scheduler or torch.optim.lr_scheduler.LambdaLR(_raw(optimizer), lambda step: 1.0)
        self.max_grad_norm, self.log_every = max_grad_norm, log_every
        self.state = {name: value for name, value in (state or {}).items() if value is not None}
        # after prepare(): the masks live on the model's device
        self.pinned = pinned_params(self.unwrapped, mask)
        self.clip_before_mask = clip_before_mask
        self.pruned = pruned_params(self.unwrapped)
        self.steps_per_epoch = steps_per_epoch
        self.position = 0  # finished steps or epochs
        self.step_count = 0  # steps of `optimizer`
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._calls: dict[int, tuple] = {}
        self._accumulating = False
        self.started = time.perf_counter()
        spec = getattr(accelerator, "train_spec", None)
        if checkpoint_every is None:
            name = "checkpoint_every" if unit == "epoch" else "checkpoint_every_steps"
            checkpoint_every = getattr(spec, name, CHECKPOINT_EVERY[unit])
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.say = (
            log or getattr(accelerator, "log_message", None) or (accelerator.print if accelerator else print)
        )
        project = getattr(accelerator, "project_dir", None)
        self.folder = Path(project) / "checkpoints" / stage if project else None
        self.log_path = Path(project) / "train.jsonl" if project else None
        if accelerator is not None:
            accelerator.step = 0  # a new loop starts a new accumulation cycle
        self.fingerprint = self._fingerprint(settings or {}) if self.folder is not None else None
        from tqdm.auto import tqdm

        main = accelerator is None or accelerator.is_local_main_process
        self.progress = tqdm(desc=stage, leave=False, disable=not (main and sys.stderr.isatty()))

    # -- the step ---------------------------------------------------------------------------------------------

    @contextmanager
    def accumulate(self):
        """`accelerator.accumulate(model)` around a forward pass and its `step` (lets DDP skip the all-reduce of
        gradients that are not yet complete); `step` opens it itself when the loop did not."""
        with self.accelerator.accumulate(self.model):
            self._accumulating = True
            try:
                yield
            finally:
                self._accumulating = False

    def step(self, loss: torch.Tensor, optimizer=None, name: str = "loss") -> bool:
        """Backward `loss` and, when the gradients are complete, step `optimizer` (default: the trainer's).

        Returns whether the trainer's own optimizer stepped. `loss` joins the running mean logged as `name`.
        """
        if self.accelerator is not None and not self._accumulating:
            with self.accumulate():
                return self.step(loss, optimizer, name)
        optimizer = self.optimizer if optimizer is None else optimizer
        self.record(name, loss)
        if self.accelerator is None:
            _raw(optimizer).zero_grad(set_to_none=True)
            loss.backward()
            return self.update(optimizer)
        if self._fresh():  # clear what another loss's backward left (a GAN's other network)
            _raw(optimizer).zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        return self.update(optimizer) if self.accelerator.sync_gradients else False

    def _fresh(self) -> bool:
        """Whether this backward pass starts an accumulation cycle."""
        accumulation = self.accelerator.gradient_accumulation_steps
        return accumulation == 1 or self.accelerator.step % accumulation == 1

    def update(self, optimizer=None) -> bool:
        """The step after the backward pass (masks, clipping, optimizer step, restore pinned weights, schedule),
        for loops that set `.grad` themselves; returns whether it was the trainer's own optimizer."""
        optimizer = self.optimizer if optimizer is None else optimizer
        raw = _raw(optimizer)
        clip = bool(self.max_grad_norm) and optimizer is self.optimizer
        if clip and self.clip_before_mask:
            _mask_gradients(self.pruned)
            self._clip(raw)
        _mask_gradients(self.pinned)
        if clip and not self.clip_before_mask:
            self._clip(raw)
        if id(optimizer) not in self._calls:
            self._calls[id(optimizer)] = _optimizer_calls(optimizer, self.accelerator)
        optimizer_step, zero_grad = self._calls[id(optimizer)]
        optimizer_step()
        zero_grad()
        if self.pinned:
            restore_pinned(self.pinned, raw)
        if optimizer is not self.optimizer:
            return False
        self.scheduler.step()
        self.step_count += 1
        if self.unit == "epoch":
            self.progress.update(1)
        return True

    def _clip(self, raw_optimizer) -> None:
        params = [p for group in raw_optimizer.param_groups for p in group["params"]]
        if self.accelerator is not None:
            self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    def record(self, name: str, value) -> None:
        """Add `value` to the running mean logged as `name`."""
        value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    # -- the loop ---------------------------------------------------------------------------------------------

    def loop(self) -> Iterator[int]:
        """Positions (0-based) from after the last checkpoint to `total`; after each one the bookkeeping: log
        line, progress bar, checkpoint."""
        total = self.total
        start = self.resume()
        if self.unit == "step":
            self.progress.reset(total=total)
            self.progress.update(start)
        else:
            self.progress.reset(total=total * self.steps_per_epoch if self.steps_per_epoch else None)
            self.progress.update(self.step_count)
        try:
            for position in range(start, total):
                yield position
                if self.unit == "epoch":
                    self.log("epoch")
                self.position = position + 1
                if self.unit == "step":
                    self.progress.update(1)
                    if self.position % self.log_every == 0 or self.position == total:
                        self.log("steps")
                if self.position % self.checkpoint_every == 0 or self.position == total:
                    self.save()
        finally:
            self.progress.close()

    def log(self, phase: str, reset: bool = True) -> None:
        """Write the running means as one `train.jsonl` line (and to the trackers); raise on a non-finite one."""
        accelerator = self.accelerator
        means = {}
        for name, total in self.sums.items():
            mean = total / max(self.counts[name], 1)
            if accelerator is not None and accelerator.num_processes > 1:
                # Every process logs at the same steps: average over them, so the log shows the whole batch's loss
                # and a divergence raises on every process at once (not on one while the others wait).
                mean = accelerator.reduce(mean.to(accelerator.device), reduction="mean")
            means[name] = float(mean)
        if reset:
            self.sums, self.counts = {}, {}
        for name, value in means.items():
            if not math.isfinite(value):
                where = (
                    f"epoch {self.position + 1}, step {self.step_count}"
                    if self.unit == "epoch"
                    else f"step {self.position}"
                )
                what = "loss" if name == "loss" else f"{name} loss"
                raise TrainingError(
                    f"the {self.stage} {what} became {value} at {where}; lower the learning rate or clip the "
                    "gradient (the method's max_grad_norm)"
                )
        if accelerator is None or not accelerator.is_main_process:
            return
        lr = self.scheduler.get_last_lr()[0]
        epoch = self.position + 1 if self.unit == "epoch" else 1  # epoch loops log before advancing
        step = self.step_count if self.unit == "epoch" else self.position
        if self.log_path is not None:
            record = {"stage": self.stage, "epoch": epoch, "step": step, "phase": phase}
            record.update({name: round(value, 6) for name, value in means.items()})
            record.update({"lr": lr, "elapsed_s": round(time.perf_counter() - self.started, 3)})
            try:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError as err:  # a full disk, a folder made read-only during the run
                from .checkpoints import write_error

                raise write_error(self.log_path, err) from None
        if accelerator.trackers:
            values = {f"{self.stage}/{name}": value for name, value in means.items()}
            accelerator.log({**values, f"{self.stage}/lr": lr}, step=step)

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _fingerprint(self, settings: dict) -> str:
        """A hash of what a checkpoint continues: stage, settings, optimizers and the weights at the start."""
        optimizers = [_raw(v) for v in (self.optimizer, *self.state.values())]
        optimizers = [o for o in optimizers if isinstance(o, torch.optim.Optimizer)]
        groups = [{k: v for k, v in g.items() if k != "params"} for o in optimizers for g in o.param_groups]
        accelerator = self.accelerator
        described = {
            "stage": self.stage,
            "total": self.total,
            "unit": self.unit,
            "max_grad_norm": self.max_grad_norm,
            "pinned": [int(keep.sum()) for _, keep, _ in self.pinned],
            "accumulation": accelerator.gradient_accumulation_steps,
            "mixed_precision": accelerator.mixed_precision,
            "optimizers": [type(o).__name__ for o in optimizers],
            "groups": groups,
            "state": sorted(self.state),
        }
        digest = hashlib.sha256(repr(described).encode())
        with torch.random.fork_rng(devices=[]):  # reading a dataset's items must not move the global RNG
            _describe(settings, digest)
            for value in self.state.values():  # the data that `Batches` draw from, a discriminator's weights
                _describe(getattr(value, "dataset", value), digest)
        digest.update(_weights_digest(_trainable_state(self.unwrapped)))
        return digest.hexdigest()

    def save(self) -> None:
        """Write a checkpoint of this stage (main process; every process waits).

        Written atomically (`atomic_path`): a kill or a full disk while writing leaves the previous checkpoint
        as it was, and a rerun resumes from it.

        Raises:
            OutputError: the checkpoint cannot be written (no space left, say), in every process.
        """
        if self.folder is None:
            return
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        failure = None
        if accelerator.is_main_process:
            checkpoint = {
                "fingerprint": self.fingerprint,
                "unit": self.unit,
                "position": self.position,
                "step_count": self.step_count,
                "model": {k: v.detach().cpu() for k, v in _trainable_state(self.unwrapped).items()},
                "optimizer": _raw(self.optimizer).state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
                "state": {name: _state_of(value) for name, value in self.state.items()},
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
            try:
                with atomic_path(self.folder / "state.pt") as tmp:
                    torch.save(checkpoint, str(tmp))
            except OutputError as err:
                failure = err
        if accelerator.num_processes > 1:  # the others stop too, rather than wait for a process that has left
            from accelerate.utils import broadcast_object_list

            said = broadcast_object_list([str(failure) if failure is not None else None], from_process=0)[0]
            if said is not None and failure is None:
                raise OutputError(said)
        if failure is not None:
            raise failure
        accelerator.wait_for_everyone()

    def resume(self) -> int:
        """Load this stage's last checkpoint if it continues this very training; returns the finished positions."""
        if self.folder is None or not (self.folder / "state.pt").exists():
            return 0
        checkpoint = torch.load(self.folder / "state.pt", map_location="cpu", weights_only=True)
        if checkpoint.get("fingerprint") != self.fingerprint:
            self.say(
                f"not resuming stage {self.stage!r}: its checkpoint in {self.folder} belongs to another training "
                "(other starting weights or settings); starting over"
            )
            return 0
        missing, unexpected = self.unwrapped.load_state_dict(checkpoint["model"], strict=False)
        if unexpected or set(missing) & set(_trainable_state(self.unwrapped)):
            raise TrainingError(f"the checkpoint in {self.folder} does not fit stage {self.stage!r}'s model")
        _raw(self.optimizer).load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.accelerator.scaler is not None and checkpoint["scaler"]:
            self.accelerator.scaler.load_state_dict(checkpoint["scaler"])
        for name, value in self.state.items():
            _load_state(value, checkpoint["state"][name])
        torch.set_rng_state(checkpoint["torch_rng"])
        if checkpoint["cuda_rng"]:
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        self.position, self.step_count = int(checkpoint["position"]), int(checkpoint["step_count"])
        self.say(f"resuming stage {self.stage!r} after {self.unit} {self.position}")
        return self.position


def _raw(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the state dict without frozen parameters (trainable weights and buffers)."""
    return {
        name: value
        for name, value in model.state_dict(keep_vars=True).items()
        if not (isinstance(value, nn.Parameter) and not value.requires_grad)
    }


def _describe(value, digest) -> None:
    """Feed a cheap description of `value` to `digest`: numbers and strings as they are, tensors by shape and
    sums, dataclasses field by field, datasets by their length and up to 8 evenly spaced items."""
    if isinstance(value, torch.Tensor):
        digest.update(_weights_digest({"": value}))
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        digest.update(repr(value).encode())
    elif isinstance(value, dict):
        for key, item in value.items():
            digest.update(repr(key).encode())
            _describe(item, digest)
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}]".encode())
        for item in value:
            _describe(item, digest)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(type(value).__name__.encode())
        for field in dataclasses.fields(value):
            digest.update(field.name.encode())
            _describe(getattr(value, field.name), digest)
    elif isinstance(value, nn.Module):
        digest.update(_weights_digest(value.state_dict()))
    elif hasattr(value, "__len__") and hasattr(value, "__getitem__"):  # a dataset
        n = len(value)
        digest.update(f"{type(value).__name__}[{n}]".encode())
        for index in sorted({n * k // 8 for k in range(8)} if n else ()):
            _describe(value[index], digest)
    else:  # no repr: it may hold a memory address, which differs between runs
        digest.update(type(value).__name__.encode())


def _weights_digest(state: dict[str, torch.Tensor]) -> bytes:
    """A cheap digest of tensor values: per tensor its name, shape and two sums (computed where it lives)."""
    from torch.distributed.tensor import DTensor

    # an FSDP2-sharded tensor: the whole tensor's sums (a collective: every process computes the digest)
    state = {k: t.full_tensor() if isinstance(t, DTensor) else t for k, t in state.items()}
    sums = [torch.stack([t.detach().double().sum(), t.detach().double().abs().sum()]) for t in state.values()]
    values = torch.stack(sums).cpu().numpy().tobytes() if sums else b""
    names = repr([(name, tuple(t.shape)) for name, t in state.items()]).encode()
    return names + values


def _state_of(value):
    if hasattr(value, "iteration") and hasattr(value, "set_epoch"):  # accelerate's loader: its pass count
        return int(value.iteration)
    if isinstance(value, torch.Generator):
        return value.get_state()
    if isinstance(value, random.Random):
        return value.getstate()
    if isinstance(value, list):
        return [t.detach().cpu().clone() for t in value]
    if isinstance(value, nn.Module):
        return {k: v.detach().cpu() for k, v in value.state_dict().items()}
    return _raw(value).state_dict()


def _load_state(value, state) -> None:
    if hasattr(value, "iteration") and hasattr(value, "set_epoch"):
        value.iteration = int(state)
    elif isinstance(value, torch.Generator):
        value.set_state(state)
    elif isinstance(value, random.Random):
        value.setstate(state)
    elif isinstance(value, list):
        with torch.no_grad():
            for tensor, saved in zip(value, state):
                tensor.copy_(saved)
    else:
        _raw(value).load_state_dict(state)


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
    clip_before_mask: bool = True,
    augment: str = "none",
    stage: str = "fit",
    log_every: int = 20,
    checkpoint_every: int | None = None,
    after_step: Callable[[int, int], None] | None = None,
    settings: dict | None = None,
) -> nn.Module:
    """Train `model` for `epochs` epochs over `phases`; returns the trained (unwrapped) model.

    Args:
        model: a family adapter; masks name parameters of `model.trainable`.
        phases: passes per epoch, each with its loader and loss `loss(prepared_model, batch)`.
        optimizer: built over the model's parameters.
        accelerator: an `accelerate.Accelerator`; if it has a `project_dir`, the loop logs to
            `project_dir/train.jsonl` and checkpoints to `project_dir/checkpoints/<stage>` every
            `checkpoint_every` epochs (default: the recipe's `train.checkpoint_every`, else 1), and a rerun
            resumes from the last checkpoint of the same training (see `Trainer`).
        epochs: number of epochs.
        lr_schedule: constant, cosine or linear decay over all optimizer steps.
        mask: pinned weights never move (gradients masked, values and optimizer state restored per step).
            A pruned model's `pruning_mask` is always added: its pruned weights stay exactly zero.
        max_grad_norm: clip the gradient norm to this value.
        clip_before_mask: clip the full gradient, then mask it (SalUn's reference order); False: mask, then clip
            (see `Trainer`).
        augment: batch augmentation of the images ("none" or "crop_flip").
        stage: name of this training stage (for logs and checkpoints).
        log_every: also log every `log_every` optimizer steps (besides the end of each epoch).
        after_step: called as `after_step(step, total_steps)` after every optimizer step (pinned weights are
            already restored; `step` counts steps so far, from 1), e.g. a proximal update of the weights.
        settings: what else a checkpoint must match to be resumed (the method; see `Trainer`).

    The log is `Trainer`'s: a line every `log_every` steps with the phase's name and one per epoch (phase
    "epoch"), each with the mean loss of the epoch so far.
    """
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {augment!r}; known: {', '.join(AUGMENTATIONS)}")
    augment_fn = AUGMENTATIONS[augment]
    from accelerate.utils import send_to_device

    place, non_blocking = _batch_placement(accelerator)
    placement = [None, None, *[False] * len(phases)] if place else None
    prepared = accelerator.prepare(
        model, optimizer, *[phase.loader for phase in phases], device_placement=placement
    )
    model, optimizer, loaders = prepared[0], prepared[1], prepared[2:]
    accum = accelerator.gradient_accumulation_steps
    steps_per_epoch = sum(math.ceil(len(loader) / accum) for loader in loaders)
    total_steps = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, _lr_factor(lr_schedule, total_steps))
    trainer = Trainer(
        model,
        optimizer,
        accelerator,
        stage=stage,
        total=epochs,
        unit="epoch",
        steps_per_epoch=steps_per_epoch,
        scheduler=scheduler,
        mask=mask,
        max_grad_norm=max_grad_norm,
        clip_before_mask=clip_before_mask,
        settings={
            "schedule": lr_schedule,
            "augment": augment,
            "data": [(phase.loader.dataset, phase.loader.batch_size) for phase in phases],
            "more": settings,
        },
        log_every=log_every,
        checkpoint_every=checkpoint_every,
    )
    for epoch in trainer.loop():
        _fork_rng_per_process(accelerator)
        model.train()
        for phase, loader in zip(phases, loaders):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for batch in loader:
                if place:
                    batch = send_to_device(batch, accelerator.device, non_blocking=non_blocking)
                with trainer.accumulate():
                    if augment_fn is not None:
                        batch = (augment_fn(batch[0]), *batch[1:])
                    stepped = trainer.step(phase.loss(model, batch))
                if stepped:
                    if after_step is not None:
                        after_step(trainer.step_count, total_steps)
                    if trainer.step_count % log_every == 0:
                        trainer.log(phase.name, reset=False)
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
    accelerator=None,
    stage: str = "train_diffusion",
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
        accelerator: with a `project_dir`, the loop also writes `train.jsonl` and checkpoints, and resumes
            (RetrainDiffusion); None for the worlds (fp32, one process). Its mixed precision (autocast; fp16
            loss scaling through the prepared optimizer) and gradient accumulation (each step averages
            `gradient_accumulation_steps` batches of `batch_size`) apply. Several processes: the UNet trains
            under DDP, every process draws each batch, its dropped conditions, noise and timesteps alike and
            trains on its share (`shard`), so the result is the one-process one.
        stage: the stage's name in the log and checkpoints.

    Returns:
        The loss of every step (of this process's steps only, after a resume).
    """
    if len(dataset) == 0:
        raise DataError("cannot train a diffusion model on an empty dataset")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, warmup_steps))
        return warm * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if accelerator is not None:
        optimizer = accelerator.prepare(optimizer)  # (fp16 loss scaling; the model still runs in fp32)
    batches = Batches(dataset, batch_size, torch.Generator().manual_seed(seed), _collate_conditions)
    net = data_parallel(model, accelerator)
    trainer = Trainer(
        net,
        optimizer,
        accelerator,
        stage=stage,
        total=steps,
        scheduler=schedule,
        max_grad_norm=1.0,
        state={"batches": batches},
        settings={"batch_size": batch_size, "uncond_prob": uncond_prob, "seed": seed, "warmup": warmup_steps},
        log_every=log_every,
        log=log if accelerator is None else None,
    )
    losses: list[float] = []
    started = time.perf_counter()
    net.train()
    micro_batches = accelerator.gradient_accumulation_steps if accelerator is not None else 1
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in trainer.loop():
            for _ in range(micro_batches):
                with trainer.accumulate() if accelerator is not None else contextlib.nullcontext():
                    with autocast():
                        loss = diffusion_loss(model, next(batches), uncond_prob, net, accelerator)
                    if not torch.isfinite(loss):
                        raise TrainingError(f"diffusion training diverged at step {step}: loss {loss.item()}")
                    trainer.step(loss)
            losses.append(loss.item())
            if log is not None and ((step + 1) % log_every == 0 or step + 1 == steps):
                recent = losses[-log_every:]
                log(
                    f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                    f"{time.perf_counter() - started:.0f} s"
                )
    net.eval()
    if net is not model:
        accelerator.unwrap_model(net, keep_fp32_wrapper=False)  # (the model trained in place)
    return losses


def diffusion_loss(model, batch, uncond_prob: float = 0.0, net=None, accelerator=None) -> torch.Tensor:
    """`model.loss(batch, uncond_prob)`, the ordinary diffusion loss. On several processes (`net` the model as
    `data_parallel` wrapped it): `batch` is the global batch, its random draws are those of `model.loss` in the
    same order (dropped conditions, noise, timesteps) for the whole of it, and the UNet pass, through `net`, runs
    on this process's share (a pass's short last batch may split unevenly: the share's loss is weighted by
    `share_weight`)."""
    if net is None or net is model:
        return model.loss(batch, uncond_prob=uncond_prob)
    images, conditions = batch
    x0 = model.to_latents(images)
    conditions = model.drop_conditions(conditions, uncond_prob) if conditions is not None else None
    x_t, noise, t = model.noised(x0)
    x_t, noise, t, conditions = shard(accelerator, x_t, noise, t, conditions, uneven=True)
    loss = torch.nn.functional.mse_loss(net(x_t, t, model.encode(conditions)).float(), noise.float())
    return loss * share_weight(accelerator, len(images))


def train_steps(
    model: nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    accelerator,
    steps: int,
    *,
    mask: ParamMask | None = None,
    max_grad_norm: float | None = None,
    clip_before_mask: bool = True,
    stage: str = "train",
    log_every: int = 50,
    state: dict | None = None,
    settings: dict | None = None,
) -> nn.Module:
    """`steps` optimizer steps on `loss_fn(step)` (step from 1): the step loop of the generative methods.

    The diffusion objectives draw their own batches (a forget batch and a retain batch per step, partial
    trajectories sampled from the model itself), so the loss function, not the loop, owns the data; whatever it
    draws from besides the global RNG (`Batches`, a `random.Random`, a `torch.Generator`) goes in `state`, so that
    a resumed run draws what an uninterrupted one draws. The loop owns the rest (`Trainer`): mixed precision
    (autocast; fp16 loss scaling through the prepared optimizer), gradient accumulation (`loss_fn(step)` is
    called once per micro-batch), gradient masks and pinned weights (`mask` and the model's `pruning_mask`, as in
    `fit`), clipping (`clip_before_mask`: the full gradient, then the mask, as `Trainer`), NaN detection,
    `train.jsonl` logging and checkpoints every `train.checkpoint_every_steps`. `settings`: the method's settings
    that a checkpoint must match.

    Several processes: pass the model as `data_parallel` wrapped it, and let `loss_fn` draw the global batch alike
    in every process and compute its loss on this process's `shard` of it (the `Method.multi_process` methods);
    the returned model is unwrapped.
    """
    if is_fsdp(accelerator):
        # FSDP2 shards the trained module in place (every pass through it, the adapter's sampling and encoding
        # included, gathers its weights) and its optimizer must be prepared in the same call.
        _, optimizer = accelerator.prepare(model.trainable, optimizer)
    else:
        optimizer = accelerator.prepare(optimizer)
    trainer = Trainer(
        model,
        optimizer,
        accelerator,
        stage=stage,
        total=steps,
        mask=mask,
        max_grad_norm=max_grad_norm,
        clip_before_mask=clip_before_mask,
        state=state,
        settings=settings,
        log_every=log_every,
    )
    model.train()
    for step in trainer.loop():
        for _ in range(accelerator.gradient_accumulation_steps):
            # accumulate() around the forward pass too: DDP skips the all-reduce of micro-batches but the last
            with trainer.accumulate():
                with accelerator.autocast():
                    loss = loss_fn(step + 1)
                trainer.step(loss)
    model.eval()
    if is_fsdp(accelerator):
        return unshard(model, accelerator)
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False)


def is_fsdp(accelerator) -> bool:
    """Whether the launch shards models (accelerate's FSDP; `recipes/accelerate/fsdp_*.yaml`)."""
    from accelerate.utils import DistributedType

    return accelerator is not None and accelerator.distributed_type == DistributedType.FSDP


def unshard(model, accelerator):
    """Put a plain copy of the FSDP2-sharded trained module, with its full weights, back on the adapter (in every
    process: the full state dict is a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    sharded = model.trainable
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    base = next(c for c in type(sharded).__mro__[1:] if not issubclass(c, FSDPModule))
    plain = base.from_config(sharded.config)  # a diffusers model (the UNet); other families need their own
    plain.load_state_dict(full)
    grads = {name: p.requires_grad for name, p in sharded.named_parameters()}
    for name, p in plain.named_parameters():
        p.requires_grad_(grads[name])
    model.unet = plain.to(accelerator.device).eval()
    return model


def data_parallel(model: nn.Module, accelerator) -> nn.Module:
    """`model` wrapped for data parallelism (DDP, through `accelerator.prepare`) under a multi-process launch, else
    `model` itself. Call the wrapped model for the forward passes whose gradient trains (DDP averages it over
    the processes in the backward pass), the model itself for the rest (its other primitives, passes without
    gradient). Freeze what does not train first: only parameters that require a gradient are synchronized."""
    if accelerator is None or accelerator.num_processes == 1 or is_fsdp(accelerator):
        return model  # FSDP: train_steps shards model.trainable in place, with its optimizer
    return accelerator.prepare(model)


def shard(accelerator, *values, uneven: bool = False):
    """This process's share of a global batch: each of `values` (tensors, lists; None passes) cut along its first
    dimension into `num_processes` parts, in process order.

    The generative methods draw each step's global batch (examples, conditions, noise, timesteps) alike in every
    process, from the same seeded RNG, and each process trains on its share: the global batch, and so the
    result, does not depend on the number of processes. Returns the one value, or a tuple of them.

    The parts are equal, or with `uneven` (batches drawn pass after pass, `endless`, whose last batch of a pass
    may be short) they may differ by one example: the first `len % N` processes take one more, and a process
    left with none takes the batch's first example as a stand-in. The caller then scales its mean loss over the
    share by `share_weight`, so that DDP's mean over the processes is the global batch's mean.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return values[0] if len(values) == 1 else values
    count, index = accelerator.num_processes, accelerator.process_index
    parts = []
    for value in values:
        if value is None:
            parts.append(None)
            continue
        if len(value) % count and not uneven:
            raise ConfigError(
                f"a batch of {len(value)} cannot be split evenly across {count} processes; use a batch size that "
                f"is a multiple of {count}"
            )
        start, stop = _share_bounds(len(value), count, index)
        parts.append(value[start:stop] if stop > start else value[:1])
    return parts[0] if len(parts) == 1 else tuple(parts)


def share_weight(accelerator, total: int) -> float:
    """The factor of this process's mean loss over its `shard(..., uneven=True)` of a global batch of `total`
    examples: its share's size times N over `total` (1 for equal shares, 0 for a stand-in example), so that the
    mean over the processes of the scaled losses, and of their gradients (DDP), is the global batch's mean."""
    if accelerator is None or accelerator.num_processes == 1:
        return 1.0
    count = accelerator.num_processes
    start, stop = _share_bounds(total, count, accelerator.process_index)
    return (stop - start) * count / total


def _share_bounds(total: int, count: int, index: int) -> tuple[int, int]:
    """Where process `index` of `count` cuts its share of `total` examples: sizes differ by at most one."""
    size, extra = divmod(total, count)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


# -- a GAN's two steps on several processes (Adapt-then-Unlearn, Retrain's `train_gan`) ----------------------


def has_batch_statistics(module: nn.Module) -> bool:
    """Whether `module` normalizes with batch statistics in training (BatchNorm and its variants)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def parallel_generator(model, accelerator) -> nn.Module:
    """The module that runs the generator's trained pass: under a multi-process launch `model.generator` wrapped
    by DDP (`data_parallel`; every generator weight trains, so DDP synchronizes all of them), else
    the generator itself. It trains in place: the wrapper shares `model.generator`'s weights."""
    if accelerator is None or accelerator.num_processes == 1:
        return model.generator
    return data_parallel(model.generator, accelerator)


@contextmanager
def generating_through(model, net: nn.Module):
    """`model.generate` runs `net` (the DDP wrapper of `model.generator`) while inside: the adapter's own mapping
    to images, with the gradient synchronized by DDP. The adapter's modules are restored on leaving."""
    original = model._modules["generator"]
    model._modules["generator"] = net
    try:
        yield
    finally:
        model._modules["generator"] = original


def generator_loss_on_shards(model, net: nn.Module, z: torch.Tensor, accelerator) -> torch.Tensor:
    """The non-saturating generator loss of the global batch of latents `z` (drawn alike in every process).

    One process: `model.generator_loss(model.generate(z))`. Several (`net` from `parallel_generator`): the
    generator runs on this process's share of `z` under DDP; the discriminator judges the gathered global batch
    alike in every process (no DDP, so batch statistics, if it has any, are the whole batch's), and the
    gradient of the global loss with respect to the generated images is sent back to each share. The returned
    tensor's value is the global batch's loss; its gradient is N·(∂L/∂fake_share)·∂fake_share/∂θ, which DDP's
    mean over the N processes makes the gradient of the global loss (as in DoCo's adversarial term). A
    generator with batch statistics runs on the whole batch in every process instead (its share's statistics
    would differ from the whole batch's); DDP then averages equal gradients."""
    if accelerator is None or accelerator.num_processes == 1:
        return model.generator_loss(model.generate(z))
    if has_batch_statistics(model.generator):
        with generating_through(model, net):
            return model.generator_loss(model.generate(z))
    count = accelerator.num_processes
    with generating_through(model, net):
        fake = model.generate(shard(accelerator, z))
    whole = accelerator.gather(fake.detach().contiguous()).requires_grad_(True)
    loss = model.generator_loss(whole)
    (grad,) = torch.autograd.grad(loss, whole)
    term = (fake * shard(accelerator, grad)).sum() * count
    return loss.detach() + (term - term.detach())  # the global loss's value, the share's gradient


def discriminator_step(trainer: Trainer, loss: torch.Tensor, optimizer, discriminator: nn.Module) -> None:
    """A step of the discriminator's optimizer on `loss` (`trainer.step`). Under a multi-process launch the loss
    is the same global batch's in every process, and its gradients are averaged over the processes before the
    step: equal on a CPU, they keep the copies equal where GPU kernels are not deterministic."""
    accelerator = trainer.accelerator
    if accelerator is None or accelerator.num_processes == 1:
        trainer.step(loss, optimizer=optimizer, name="discriminator")
        return
    trainer.record("discriminator", loss)
    _raw(optimizer).zero_grad(set_to_none=True)
    accelerator.backward(loss)
    grads = [p.grad for p in discriminator.parameters() if p.grad is not None]
    with torch.no_grad():
        for grad, mean in zip(grads, accelerator.reduce(grads, reduction="mean")):
            grad.copy_(mean)
    trainer.update(optimizer)


def broadcast_tensors(accelerator, tensors) -> None:
    """Give every process the main process's values of `tensors` (in place), e.g. what a closed-form edit or a
    saliency pass computed: the processes then hold exactly the same model whatever their kernels did."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    for tensor in tensors:
        sent = tensor.detach().to(accelerator.device)
        sent = broadcast(sent.to(torch.uint8) if sent.dtype == torch.bool else sent.clone(), from_process=0)
        with torch.no_grad():
            tensor.copy_(sent.to(tensor.device, tensor.dtype))


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
    if accelerator is None:
        return optimizer.step, lambda: optimizer.zero_grad(set_to_none=True)
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
        apply_mask(trainable, pruning)
        mask = pruning if mask is None else mask & pruning
    if mask is None:
        return []
    mask.check(trainable)
    params = dict(trainable.named_parameters())
    return [
        (params[name], _keep_like(keep, params[name]), params[name].detach().clone())
        for name, keep in mask.masks.items()
    ]


def _keep_like(keep: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A keep-mask on `param`'s device and dtype, sharded as `param` is (FSDP2: a DTensor, Shard(0))."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    keep = keep.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        keep = distribute_tensor(keep, param.device_mesh, param.placements)
    return keep


def pruned_params(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, keep-mask) for every parameter a pruned model's `pruning_mask` names; [] when unpruned."""
    pruning = getattr(model, "pruning_mask", None)
    if pruning is None:
        return []
    params = dict(getattr(model, "trainable", model).named_parameters())
    return [(params[name], _keep_like(keep, params[name])) for name, keep in pruning.masks.items()]


def _mask_gradients(pinned) -> None:
    """Zero the gradient entries of pinned weights (`pinned_params` or `pruned_params` entries)."""
    for param, keep, *_ in pinned:
        if param.grad is not None:
            param.grad.mul_(keep)


@torch.no_grad()
def restore_pinned(pinned, optimizer: torch.optim.Optimizer) -> None:
    """Put pinned weights back and clear their optimizer state (momentum, Adam moments)."""
    for param, keep, start in pinned:
        param.copy_(torch.where(keep.bool(), param, start))
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.mul_(keep.to(value.dtype))


def end_trackers(accelerator) -> None:
    """Close accelerate's trackers (`train.log_with`) at the end of a run; unlike `accelerator.end_training()`
    this leaves the process group alone (a bench runs several recipes in one process)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested recipe dict as the flat `{"a.b": scalar}` that trackers store as hyperparameters."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def reset_accelerate_state(mixed_precision: str, cpu: bool) -> None:
    """accelerate keeps one process-wide state and refuses (ValueError) an Accelerator whose mixed precision or
    cpu flag differs from the first one's. A process that runs several recipes (`unlearn bench`, a test session)
    drops that state when the next run asks for other settings. Under a multi-process launch only the
    AcceleratorState is dropped; the PartialState (process group, device) stays."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    state = AcceleratorState._shared_state
    if not state or "_mixed_precision" not in state:
        return
    if state["_mixed_precision"] == mixed_precision and (not cpu or state["device"].type == "cpu"):
        return
    single = PartialState._shared_state.get("num_processes", 1) == 1
    AcceleratorState._reset_state(reset_partial_state=single)
    GradientState._reset_state()
