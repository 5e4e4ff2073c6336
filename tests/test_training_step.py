"""The training step (`unlearn.train.Trainer`) in every loop: a run killed after a checkpoint and run again ends
bit for bit where an uninterrupted run ends; a checkpoint resumes only the training it belongs to; gradient
accumulation works or is refused; messages and trackers."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import TensorDataset

from unlearn.errors import ConfigError
from unlearn.recipe import TrainSpec
from unlearn.train import Batches, Phase, Trainer, fit, make_loader, make_optimizer, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    """What `kill -9` does to a run right after a checkpoint, as an exception."""


def kill_after_checkpoint(monkeypatch, stage: str, position: int) -> None:
    real = Trainer.save

    def save(self):
        real(self)
        if self.stage == stage and self.position == position:
            raise Killed

    monkeypatch.setattr(Trainer, "save", save)


def accelerator(project_dir=None, messages=None, **train) -> Accelerator:
    """As `pipeline.make_accelerator` builds it: the recipe's train section and a message log attached."""
    acc = Accelerator(
        cpu=True,
        project_dir=None if project_dir is None else str(project_dir),
        gradient_accumulation_steps=train.pop("gradient_accumulation_steps", 1),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    acc.train_spec = TrainSpec(**train)
    acc.log_message = messages.append if messages is not None else None
    return acc


def equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def toy_data(n: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.rand(n, 16, generator=generator), torch.randint(0, 4, (n,), generator=generator)
    )


# -- the step loop --------------------------------------------------------------------------------------------


def step_loop(project_dir, messages=None, steps: int = 10, seed: int = 0, **train) -> nn.Module:
    """A fresh model each call, as a rerun of the same command builds it: Adam, clipping, a mask, batches and a
    Python RNG that the loss draws from."""
    from unlearn.params import ParamMask

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))
    mask = ParamMask({"0.weight": torch.rand(8, 16, generator=torch.Generator().manual_seed(1)) < 0.5})
    batches, rng = Batches(toy_data(), 8), random.Random(3)

    def loss_fn(step: int) -> torch.Tensor:
        images, labels = next(batches)
        noisy = labels if rng.random() < 0.5 else torch.randint(0, 4, labels.shape)
        return F.cross_entropy(model(images), noisy)

    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    acc = accelerator(project_dir, messages, **{"checkpoint_every_steps": 3, **train})
    state = {"batches": batches, "rng": rng}
    return train_steps(
        model, loss_fn, optimizer, acc, steps, mask=mask, max_grad_norm=1.0, state=state, stage="demo"
    )


def test_step_loop_resumes_bit_for_bit(tmp_path, monkeypatch):
    straight = step_loop(tmp_path / "straight")
    kill_after_checkpoint(monkeypatch, "demo", 6)
    with pytest.raises(Killed):
        step_loop(tmp_path / "killed")
    monkeypatch.undo()
    messages = []
    resumed = step_loop(tmp_path / "killed", messages)
    assert messages == ["resuming stage 'demo' after step 6"]
    assert equal(straight, resumed)
    # the log of the rerun continues where the killed run's stopped
    import json

    steps = [
        json.loads(line)["step"] for line in (tmp_path / "killed" / "train.jsonl").read_text().splitlines()
    ]
    assert steps == [10]  # log_every 50: the last step only, written once (by the rerun)


def test_checkpoint_every_steps_is_honoured(tmp_path, monkeypatch):
    saved = []
    real = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self: (saved.append(self.position), real(self)))
    step_loop(tmp_path, checkpoint_every_steps=4)
    assert saved == [4, 8, 10]


def test_step_loop_accumulation_matches_a_larger_batch(tmp_path):
    def run(batch_size: int, accumulation: int) -> nn.Module:
        set_seed(0)
        model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))
        batches = Batches(toy_data(), batch_size)

        def loss_fn(step):
            images, labels = next(batches)
            return F.cross_entropy(model(images), labels)

        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        acc = accelerator(gradient_accumulation_steps=accumulation)
        return train_steps(model, loss_fn, optimizer, acc, 6, state={"batches": batches})

    accumulated, large, small = run(8, 2), run(16, 1), run(8, 1)
    for a, b, c in zip(accumulated.parameters(), large.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a, c, rtol=1e-3, atol=1e-4), "accumulation had no effect"


# -- one Accelerator, two trainings -----------------------------------------------------------------------------


def finetune(model_seed: int, acc) -> nn.Module:
    from unlearn.methods.baselines import FineTune

    class Tiny(nn.Module):  # the adapter surface FineTune needs
        def __init__(self):
            super().__init__()
            torch.manual_seed(model_seed)
            self.trainable = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))

        def forward(self, x):
            return self.trainable(x)

    from unlearn.data import UnlearnData

    data = UnlearnData(toy_data(16, 1), toy_data(48, 2), toy_data(16, 3), toy_data(8, 4), 4, (0,))
    set_seed(0)
    return FineTune(epochs=2, lr=0.1, batch_size=16).unlearn(Tiny(), data, acc)


def test_one_accelerator_two_models_gives_two_correct_results(tmp_path):
    """The regression: a second `unlearn` call on another model with the same Accelerator used to return the
    first call's weights after "resuming stage ... after epoch 2"."""
    messages = []
    shared = accelerator(tmp_path / "shared", messages)
    first, second = finetune(1, shared), finetune(2, shared)
    assert equal(first, finetune(1, accelerator(tmp_path / "fresh1")))
    assert equal(second, finetune(2, accelerator(tmp_path / "fresh2")))
    assert not equal(first, second)
    assert any("belongs to another training" in m for m in messages), messages
    assert not any(m.startswith("resuming") for m in messages)
    # the same call again continues its own finished checkpoint: same weights, nothing trained
    again = finetune(2, shared)
    assert equal(again, second) and messages[-1] == "resuming stage 'finetune' after epoch 2"


def test_other_settings_start_over(tmp_path):
    step_loop(tmp_path)
    messages = []
    other = step_loop(tmp_path, messages, seed=5)  # other starting weights
    assert "belongs to another training" in messages[0]
    assert equal(other, step_loop(tmp_path / "fresh", seed=5))


# -- the methods' own loops -------------------------------------------------------------------------------------


def laf_run(project_dir, messages=None):
    from unlearn.data import forget_classes
    from unlearn.datasets import load_dataset
    from unlearn.methods.laf import LAF
    from unlearn.models.classifier import build_classifier

    task = forget_classes(load_dataset("digits", "train"), load_dataset("digits", "test"), [3])
    torch.manual_seed(3)
    model = build_classifier("digits_cnn", 10)
    set_seed(0)
    return LAF(epochs=3, vae_epochs=2, repair_epochs=1).unlearn(
        model, task, accelerator(project_dir, messages)
    )


def test_laf_resumes_bit_for_bit(tmp_path, monkeypatch):
    straight = laf_run(tmp_path / "straight")
    kill_after_checkpoint(monkeypatch, "laf", 2)
    with pytest.raises(Killed):
        laf_run(tmp_path / "killed")
    monkeypatch.undo()
    messages = []
    assert equal(straight, laf_run(tmp_path / "killed", messages))
    assert "resuming stage 'laf' after epoch 2" in messages, messages


def gan_run(project_dir, messages=None):
    from test_gan import tiny

    from unlearn.data import forget_classes
    from unlearn.datasets import load_dataset
    from unlearn.methods.adapt_then_unlearn import AdaptThenUnlearn

    data = forget_classes(load_dataset("digits", "train"), load_dataset("digits", "test"), [3])
    model = tiny(0)
    set_seed(0)
    method = AdaptThenUnlearn(
        feedback="test_gan:toy_judge", negatives=8, positives=32, max_draws=1000, adapt_steps=4, steps=7,
        batch_size=8, fisher_samples=2,
    )  # fmt: skip
    return method.unlearn(model, data, accelerator(project_dir, messages, checkpoint_every_steps=3))


def test_adapt_then_unlearn_resumes_bit_for_bit(tmp_path, monkeypatch):
    straight = gan_run(tmp_path / "straight")
    kill_after_checkpoint(monkeypatch, "unlearn", 3)  # stage 2: EMA, discriminator, a pass of reals mid-way
    with pytest.raises(Killed):
        gan_run(tmp_path / "killed")
    monkeypatch.undo()
    messages = []
    assert equal(straight, gan_run(tmp_path / "killed", messages))
    assert "resuming stage 'unlearn' after step 3" in messages, messages


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    from tiny_diffusion import tiny_ddpm_pipeline, tiny_sd_pipeline

    root = tmp_path_factory.mktemp("step-pipelines")
    return {"sd": tiny_sd_pipeline(root / "sd"), "ddpm": tiny_ddpm_pipeline(root / "ddpm", num_classes=3)}


def doco_run(folder, project_dir, messages=None):
    from tiny_diffusion import cat_task, load_pipeline

    from unlearn.methods.doco import DoCo

    model = load_pipeline(folder)
    set_seed(0)
    task = cat_task(model, num_images=2)
    method = DoCo(
        steps=5, warm_up=1, lr=1e-2, disc_lr=1e-2, batch_size=2, num_anchor_images=4, anchor_steps=2
    )
    return method.unlearn(model, task, accelerator(project_dir, messages, checkpoint_every_steps=2)).unet


def test_doco_resumes_bit_for_bit(tiny_pipelines, tmp_path, monkeypatch):
    straight = doco_run(tiny_pipelines["sd"], tmp_path / "straight")
    kill_after_checkpoint(monkeypatch, "doco", 2)
    with pytest.raises(Killed):
        doco_run(tiny_pipelines["sd"], tmp_path / "killed")
    monkeypatch.undo()
    messages = []
    assert equal(straight, doco_run(tiny_pipelines["sd"], tmp_path / "killed", messages))
    assert messages == ["resuming stage 'doco' after step 2"]


def retrain_run(folder, project_dir, messages=None):
    from tiny_diffusion import load_pipeline

    from unlearn.data import UnlearnData
    from unlearn.methods.baselines import RetrainDiffusion

    model = load_pipeline(folder)
    generator = torch.Generator().manual_seed(0)
    retain = TensorDataset(
        torch.rand(40, 1, 8, 8, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    )
    data = UnlearnData(retain, retain, retain, retain, 3, (0,))
    set_seed(0)
    method = RetrainDiffusion(steps=6, batch_size=16, warmup_steps=2)
    return method.unlearn(model, data, accelerator(project_dir, messages, checkpoint_every_steps=3)).unet


def test_diffusion_retrain_resumes_bit_for_bit(tiny_pipelines, tmp_path, monkeypatch):
    straight = retrain_run(tiny_pipelines["ddpm"], tmp_path / "straight")
    kill_after_checkpoint(monkeypatch, "retrain", 3)
    with pytest.raises(Killed):
        retrain_run(tiny_pipelines["ddpm"], tmp_path / "killed")
    monkeypatch.undo()
    messages = []
    assert equal(straight, retrain_run(tiny_pipelines["ddpm"], tmp_path / "killed", messages))
    assert messages == ["resuming stage 'retrain' after step 3"]


def test_loops_with_two_optimizers_refuse_accumulation(tiny_pipelines, tmp_path):
    from test_gan import tiny
    from tiny_diffusion import cat_task, load_pipeline

    from unlearn.data import UnlearnData, forget_classes
    from unlearn.datasets import load_dataset
    from unlearn.methods.adapt_then_unlearn import AdaptThenUnlearn
    from unlearn.methods.baselines import RetrainDiffusion, RetrainGAN
    from unlearn.methods.doco import DoCo

    acc = accelerator(tmp_path, gradient_accumulation_steps=2)
    model = load_pipeline(tiny_pipelines["sd"])
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        DoCo(steps=2, warm_up=1).unlearn(model, cat_task(model, num_images=2), acc)
    data = forget_classes(load_dataset("digits", "train"), load_dataset("digits", "test"), [3])
    method = AdaptThenUnlearn(feedback="test_gan:toy_judge", negatives=4, positives=8, max_draws=1000)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        method.unlearn(tiny(0), data, acc)
    with pytest.raises(ConfigError, match="does not accumulate gradients"):  # the GAN world's loop, two steps
        RetrainGAN(steps=1).unlearn(tiny(0), data, acc)
    # Retrain of a diffusion model has one optimizer: it accumulates (a step of two batches of 2 here)
    retain = TensorDataset(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    ddpm = load_pipeline(tiny_pipelines["ddpm"])
    RetrainDiffusion(steps=1, batch_size=2).unlearn(
        ddpm, UnlearnData(retain, retain, retain, retain, 3, (0,)), acc
    )


# -- trackers and recipes ---------------------------------------------------------------------------------------


def test_tensorboard_tracker_logs_offline(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from unlearn.pipeline import make_accelerator
    from unlearn.recipe import from_dict
    from unlearn.train import end_trackers

    recipe = from_dict(
        {
            "method": "finetune",
            "data": {"forget_class": [3]},
            "train": {"cpu": True, "log_with": "tensorboard"},
        }
    )
    acc = make_accelerator(recipe, tmp_path)
    set_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    loader = make_loader(toy_data(), 16)
    fit(
        model,
        [Phase(loader, lambda m, b: F.cross_entropy(m(b[0]), b[1]))],
        make_optimizer(model.parameters(), "sgd", 0.1),
        acc,
        2,
        log_every=2,
    )
    end_trackers(acc)
    folders = [p.parent for p in (tmp_path / "logs").rglob("events.out.tfevents.*")]
    scalars = set()
    for folder in folders:
        events = EventAccumulator(str(folder))
        events.Reload()
        scalars |= set(events.Tags()["scalars"])
    assert {"fit/loss", "fit/lr"} <= scalars, scalars


def test_recipe_refuses_an_unknown_tracker():
    from unlearn.recipe import from_dict

    with pytest.raises(ConfigError, match="Did you mean tensorboard"):
        from_dict({"method": "finetune", "data": {"forget_class": [3]}, "train": {"log_with": "tensorbord"}})
    with pytest.raises(ConfigError, match="checkpoint_every_steps"):
        from_dict(
            {"method": "finetune", "data": {"forget_class": [3]}, "train": {"checkpoint_every_steps": 0}}
        )


def test_resume_message_goes_to_the_pipeline_log(tmp_path):
    from unlearn.pipeline import make_accelerator
    from unlearn.recipe import from_dict

    recipe = from_dict({"method": "finetune", "data": {"forget_class": [3]}, "train": {"cpu": True}})
    messages = []
    for _ in range(2):
        set_seed(0)
        model = nn.Sequential(nn.Linear(16, 4))
        phases = [Phase(make_loader(toy_data(), 16), lambda m, b: F.cross_entropy(m(b[0]), b[1]))]
        optimizer = make_optimizer(model.parameters(), "sgd", 0.1)
        fit(model, phases, optimizer, make_accelerator(recipe, tmp_path, log=messages.append), 2)
    assert messages == ["resuming stage 'fit' after epoch 2"]
