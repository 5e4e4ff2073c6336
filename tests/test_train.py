"""fit(): gradient masks, mixed precision, accumulation, clipping, divergence, resume, logging; the baselines."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import TensorDataset

from unlearn.errors import TrainingError
from unlearn.params import ParamMask
from unlearn.train import Phase, fit, make_loader, make_optimizer, random_crop_flip

LOG_FIELDS = {"stage", "epoch", "step", "phase", "loss", "lr", "elapsed_s"}

pytestmark = pytest.mark.usefixtures("one_thread")


def make_accelerator(project_dir=None, **kwargs) -> Accelerator:
    """As `unlearn.pipeline.make_accelerator` builds it (seedable sampler), on the CPU."""
    return Accelerator(
        cpu=True,
        project_dir=None if project_dir is None else str(project_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **kwargs,
    )


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.rand(n, 1, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    )


def cross_entropy(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


# --- gradient masks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer, momentum, weight_decay",
    [("sgd", 0.9, 5e-4), ("adam", 0.0, 5e-4), ("adamw", 0.0, 1e-2)],
)
def test_mask_pins_weights_bit_for_bit(optimizer, momentum, weight_decay):
    set_seed(0)
    model = tiny_cnn()
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(1)
    masks = {
        "0.weight": torch.rand(params["0.weight"].shape, generator=generator) < 0.5,
        "4.weight": torch.rand(params["4.weight"].shape, generator=generator) < 0.5,
        "4.bias": torch.zeros(params["4.bias"].shape, dtype=torch.bool),  # the whole tensor pinned
    }
    before = snapshot(model)
    opt = make_optimizer(model.parameters(), optimizer, lr=0.05, momentum=momentum, weight_decay=weight_decay)
    fit(
        model,
        [Phase(make_loader(dataset(), 16), cross_entropy)],
        opt,
        make_accelerator(),
        epochs=3,
        mask=ParamMask(masks),
    )
    after = snapshot(model)

    for name, keep in masks.items():
        pinned = ~keep
        assert torch.equal(after[name][pinned], before[name][pinned]), f"{name}: a pinned entry moved"
        if keep.any():
            moved = after[name][keep] != before[name][keep]
            assert moved.float().mean() > 0.9, f"{name}: free entries did not train"
        state = opt.state[params[name]]
        buffers = ["momentum_buffer"] if optimizer == "sgd" else ["exp_avg", "exp_avg_sq"]
        for buffer in buffers:
            assert torch.all(state[buffer][pinned] == 0), f"{name}: {buffer} is not zero where pinned"
            if keep.any():
                assert torch.any(state[buffer][keep] != 0)
    # Parameters outside the mask train normally.
    assert not torch.equal(after["0.bias"], before["0.bias"])
    assert not torch.equal(after["1.weight"], before["1.weight"])


def test_mask_with_wrong_shape_is_refused():
    from unlearn.errors import ConfigError

    model = tiny_mlp()
    opt = make_optimizer(model.parameters(), "sgd", lr=0.1)
    bad = ParamMask({"1.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ConfigError, match="shape"):
        fit(model, [Phase(make_loader(dataset(), 16), cross_entropy)], opt, make_accelerator(), 1, mask=bad)


# --- mixed precision -------------------------------------------------------------------------------------------


def test_bf16_on_cpu():
    set_seed(0)
    model = tiny_cnn()
    seen = []
    model[4].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = snapshot(model)
    accelerator = make_accelerator(mixed_precision="bf16")
    assert accelerator.mixed_precision == "bf16"
    opt = make_optimizer(model.parameters(), "sgd", lr=0.05)
    trained = fit(model, [Phase(make_loader(dataset(), 16), cross_entropy)], opt, accelerator, epochs=2)
    assert set(seen) == {torch.bfloat16}, "the forward pass did not run under bf16 autocast"
    assert all(p.dtype == torch.float32 for p in trained.parameters()), "master weights must stay fp32"
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    assert not torch.equal(trained[4].weight, before["4.weight"])


def test_accelerators_with_other_precision_need_a_reset():
    """Documents accelerate's behaviour that the fixture above and `pipeline.make_accelerator` work around."""
    Accelerator(cpu=True)
    with pytest.raises(ValueError, match="mixed_precision"):
        Accelerator(cpu=True, mixed_precision="bf16")
    AcceleratorState._reset_state(reset_partial_state=True)
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"


def test_pipeline_accelerators_may_change_precision(tmp_path):
    """Two runs in one process with different train.mixed_precision (a bench over precisions, a test session)."""
    from unlearn.pipeline import make_accelerator as pipeline_accelerator
    from unlearn.recipe import from_dict

    def recipe(precision):
        return from_dict(
            {
                "method": "finetune",
                "data": {"forget_class": [3]},
                "train": {"mixed_precision": precision, "cpu": True},
            }
        )

    first = pipeline_accelerator(recipe("no"), tmp_path / "a")
    assert first.mixed_precision == "no"
    second = pipeline_accelerator(recipe("bf16"), tmp_path / "b")
    assert second.mixed_precision == "bf16"
    third = pipeline_accelerator(recipe("no"), tmp_path / "c")
    assert third.mixed_precision == "no" and third.native_amp is False


# --- gradient accumulation and clipping ------------------------------------------------------------------------


def test_gradient_accumulation_matches_a_larger_batch():
    def train(batch_size, accum):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        set_seed(0)
        model = tiny_mlp()
        opt = make_optimizer(model.parameters(), "sgd", lr=0.5, momentum=0.0)
        accelerator = make_accelerator(gradient_accumulation_steps=accum)
        loader = make_loader(dataset(64), batch_size, shuffle=True)
        return fit(model, [Phase(loader, cross_entropy)], opt, accelerator, epochs=3, lr_schedule="cosine")

    accumulated, large = train(8, 2), train(16, 1)
    single = train(8, 1)
    for (name, a), b, c in zip(
        accumulated.state_dict().items(), large.state_dict().values(), single.state_dict().values()
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs")
        assert not torch.allclose(a, c, rtol=1e-3, atol=1e-4), "accumulation had no effect"


def test_gradient_clipping_bounds_every_step():
    lr, max_norm = 0.1, 1e-3
    set_seed(0)
    model = tiny_mlp()
    states = []

    def huge_loss(model, batch):
        states.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
        return 1e6 * cross_entropy(model, batch)

    opt = make_optimizer(model.parameters(), "sgd", lr=lr, momentum=0.0)
    fit(
        model,
        [Phase(make_loader(dataset(), 16), huge_loss)],
        opt,
        make_accelerator(),
        epochs=2,
        max_grad_norm=max_norm,
    )
    states.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    moves = torch.stack([(b - a).norm() for a, b in zip(states, states[1:])])
    assert len(moves) == 8
    assert torch.all(moves <= lr * max_norm * (1 + 1e-3)), moves
    assert torch.all(moves >= lr * max_norm * 0.99), "the gradient was not clipped to max_grad_norm"

    AcceleratorState._reset_state(reset_partial_state=True)
    set_seed(0)
    free = tiny_mlp()
    start = torch.cat([p.detach().flatten().clone() for p in free.parameters()])
    opt = make_optimizer(free.parameters(), "sgd", lr=lr, momentum=0.0)
    fit(free, [Phase(make_loader(dataset(), 16), huge_loss)], opt, make_accelerator(), epochs=1)
    assert (torch.cat([p.detach().flatten() for p in free.parameters()]) - start).norm() > 100 * lr * max_norm


# --- divergence ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_raises_training_error(bad):
    set_seed(0)
    model = tiny_mlp()

    def diverged(model, batch):
        return cross_entropy(model, batch) * bad

    opt = make_optimizer(model.parameters(), "sgd", lr=0.1)
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at epoch 1.*learning rate"):
        fit(
            model,
            [Phase(make_loader(dataset(), 16), diverged)],
            opt,
            make_accelerator(),
            epochs=2,
            stage="demo",
        )


def test_divergence_leaves_no_checkpoint(tmp_path):
    set_seed(0)
    model = tiny_mlp()
    opt = make_optimizer(model.parameters(), "sgd", lr=0.1)
    with pytest.raises(TrainingError):
        fit(
            model,
            [Phase(make_loader(dataset(), 16), lambda m, b: cross_entropy(m, b) * float("nan"))],
            opt,
            make_accelerator(tmp_path),
            epochs=2,
        )
    assert not (tmp_path / "checkpoints" / "fit" / "state.pt").exists()


# --- checkpoint-and-resume -------------------------------------------------------------------------------------


class InterruptAt:
    """Random-label cross-entropy (uses the global RNG) that raises KeyboardInterrupt on call number `at`."""

    def __init__(self, at: int | None = None):
        self.calls, self.at = 0, at

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        images, labels = batch
        noisy = torch.where(torch.rand(labels.shape) < 0.3, torch.randint(0, 10, labels.shape), labels)
        return F.cross_entropy(model(images), noisy)


def train_resumable(project_dir, epochs: int = 4, interrupt_at: int | None = None) -> nn.Module:
    """A fresh model and optimizer each call, as a rerun of the same command would build them."""
    set_seed(0)
    model = tiny_cnn()
    opt = make_optimizer(model.parameters(), "sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    phases = [Phase(make_loader(dataset(72), 16), InterruptAt(interrupt_at), "noisy")]
    return fit(
        model,
        phases,
        opt,
        make_accelerator(project_dir),
        epochs,
        lr_schedule="cosine",
        augment="crop_flip",
        log_every=1000,
    )


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    steps_per_epoch, k = 5, 2  # 72 examples at batch 16
    straight = train_resumable(tmp_path / "straight")

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(KeyboardInterrupt):
        train_resumable(tmp_path / "resumed", interrupt_at=k * steps_per_epoch + 3)
    log = tmp_path / "resumed" / "train.jsonl"
    assert [r["epoch"] for r in read_log(log)] == [1, 2]
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "fit" / "state.pt", weights_only=True)
    assert state["unit"] == "epoch" and state["position"] == k

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = train_resumable(tmp_path / "resumed")
    records = read_log(log)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4], "the rerun must start at epoch k+1"
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    # Losses of the resumed epochs equal those of the straight run.
    straight_losses = [r["loss"] for r in read_log(tmp_path / "straight" / "train.jsonl")]
    assert [r["loss"] for r in records] == straight_losses


def test_finished_stage_is_not_trained_again(tmp_path):
    first = snapshot(train_resumable(tmp_path))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    calls = InterruptAt()
    set_seed(0)
    model = tiny_cnn()
    opt = make_optimizer(model.parameters(), "sgd", lr=0.05, momentum=0.9, weight_decay=5e-4)
    phases = [Phase(make_loader(dataset(72), 16), calls, "noisy")]
    again = fit(model, phases, opt, make_accelerator(tmp_path), 4, lr_schedule="cosine", augment="crop_flip")
    assert calls.calls == 0
    for name, value in again.state_dict().items():
        assert torch.equal(value, first[name])


# --- the log ---------------------------------------------------------------------------------------------------


def test_jsonl_log_has_the_documented_fields(tmp_path):
    set_seed(0)
    model = tiny_mlp()
    opt = make_optimizer(model.parameters(), "sgd", lr=0.1)
    phases = [
        Phase(make_loader(dataset(64), 16), cross_entropy, "forget"),
        Phase(make_loader(dataset(32, seed=1), 16), cross_entropy, "retain"),
    ]
    fit(
        model,
        phases,
        opt,
        make_accelerator(tmp_path),
        epochs=2,
        stage="demo",
        log_every=3,
        lr_schedule="linear",
    )
    records = read_log(tmp_path / "train.jsonl")
    for record in records:
        assert set(record) == LOG_FIELDS
        assert record["stage"] == "demo"
        assert isinstance(record["loss"], float) and record["loss"] > 0
        assert isinstance(record["elapsed_s"], float) and record["elapsed_s"] >= 0
    assert [(r["epoch"], r["step"], r["phase"]) for r in records] == [
        (1, 3, "forget"),
        (1, 6, "retain"),
        (1, 6, "epoch"),
        (2, 9, "forget"),
        (2, 12, "retain"),
        (2, 12, "epoch"),
    ]
    lrs = [r["lr"] for r in records]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0  # linear decay to zero after the last step


def test_no_log_without_project_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    set_seed(0)
    model = tiny_mlp()
    opt = make_optimizer(model.parameters(), "sgd", lr=0.1)
    fit(model, [Phase(make_loader(dataset(), 16), cross_entropy)], opt, make_accelerator(), epochs=1)
    assert list(tmp_path.iterdir()) == []


# --- augmentation ----------------------------------------------------------------------------------------------


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    torch.manual_seed(0)
    images = torch.rand(16, 3, 10, 12)
    out = random_crop_flip(images, padding=2)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = F.pad(images, (2,) * 4)
    flipped = 0
    for i in range(len(images)):
        crops = []
        for dy in range(5):
            for dx in range(5):
                crop = padded[i, :, dy : dy + 10, dx : dx + 12]
                crops += [
                    (dy, dx, flip)
                    for flip in (False, True)
                    if torch.equal(out[i], crop.flip(-1) if flip else crop)
                ]
        assert crops, f"image {i} is not a (flipped) crop of its padded image"
        flipped += crops[0][2]
    assert 0 < flipped < len(images), "flips should be random"
    assert not torch.equal(out, images)


# --- the baselines keep their promises on the digits world -----------------------------------------------------


def load_world_model(digits_world):
    from unlearn.models.classifier import load_classifier

    return load_classifier(digits_world["classifier"], None, 10)


@torch.no_grad()
def mean_loss(model, data) -> float:
    model.eval()
    images, labels = next(iter(torch.utils.data.DataLoader(data, batch_size=len(data))))
    return float(F.cross_entropy(model(images), labels))


def test_retrain_reinitialises_before_training(digits_world, digits_task, monkeypatch):
    from unlearn.methods import baselines
    from unlearn.models.classifier import build_classifier

    seen = {}
    real_fit = baselines.fit

    def spy(model, *args, **kwargs):
        seen.update(snapshot(model))
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(baselines, "fit", spy)
    model = load_world_model(digits_world)
    trained_weights = snapshot(model)
    torch.manual_seed(7)
    fresh = snapshot(build_classifier("digits_cnn", 10))
    torch.manual_seed(7)
    out = baselines.Retrain(epochs=1, lr=0.05).unlearn(model, digits_task, make_accelerator())
    for name, value in fresh.items():
        assert torch.equal(seen[name], value), f"{name} was not drawn fresh before training"
    assert not torch.equal(seen["network.fc.weight"], trained_weights["network.fc.weight"])
    assert not torch.equal(out.network.fc.weight, fresh["network.fc.weight"]), "retrain did not train"


def test_grad_ascent_raises_the_forget_loss(digits_world, digits_task):
    from unlearn.methods.baselines import GradAscent

    model = load_world_model(digits_world)
    before = mean_loss(model, digits_task.forget)
    set_seed(0)
    out = GradAscent(epochs=1, lr=1e-3).unlearn(model, digits_task, make_accelerator())
    assert mean_loss(out, digits_task.forget) > 1.05 * before


def test_random_label_mixed_runs(digits_world, digits_task, tmp_path):
    from unlearn.methods.baselines import RandomLabel

    model = load_world_model(digits_world)
    before_forget = mean_loss(model, digits_task.forget)
    set_seed(0)
    out = RandomLabel(epochs=1, lr=0.01, mixed=True).unlearn(model, digits_task, make_accelerator(tmp_path))
    records = read_log(tmp_path / "train.jsonl")
    assert {r["phase"] for r in records} <= {"mixed", "epoch"} and records[-1]["epoch"] == 1
    assert records[-1]["step"] == -(-(len(digits_task.forget) + len(digits_task.retain)) // 64)
    assert mean_loss(out, digits_task.forget) > before_forget
    assert mean_loss(out, digits_task.retain) < 1.0
