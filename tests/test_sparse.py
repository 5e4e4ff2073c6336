"""Pruning (OMP, IMP with rewinding) and ℓ1-sparse unlearning ("Model Sparsity Can Simplify Machine Unlearning")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import TensorDataset

from unlearn.errors import ConfigError
from unlearn.methods.l1_sparse import L1Sparse, l1_norm, l1_weight_at
from unlearn.params import ParamMask
from unlearn.prune import apply_mask, imp, magnitude_mask, omp, prunable, sparsity
from unlearn.train import Phase, fit, make_loader, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def make_accelerator(project_dir=None) -> Accelerator:
    return Accelerator(
        cpu=True,
        project_dir=None if project_dir is None else str(project_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 8 * 8, 10),
    )


def toy_data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def cross_entropy(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)


# --- magnitude pruning ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "names"),
    [("conv", {"0.weight", "3.weight"}), ("conv+linear", {"0.weight", "3.weight", "6.weight"})],
)
def test_scopes_name_the_right_weights(scope, names):
    net = tiny_cnn()
    assert set(prunable(net, scope)) == names
    assert set(prunable(net, "all")) == {"0.weight", "3.weight", "6.weight"}  # BN weight and biases are 1-D
    with pytest.raises(ConfigError, match="scope"):
        prunable(net, "linear")


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.95])
def test_magnitude_mask_keeps_the_globally_largest_weights(target):
    torch.manual_seed(0)
    net = tiny_cnn()
    mask = magnitude_mask(net, target, "conv")
    assert set(mask.masks) == {"0.weight", "3.weight"}  # the linear layer stays free
    weights = np.concatenate([net[0].weight.detach().numpy().ravel(), net[3].weight.detach().numpy().ravel()])
    keep = np.concatenate([mask.masks["0.weight"].numpy().ravel(), mask.masks["3.weight"].numpy().ravel()])
    pruned = int((~keep).sum())
    assert abs(pruned - target * weights.size) <= 1
    order = np.argsort(np.abs(weights), kind="stable")
    expected = np.ones(weights.size, dtype=bool)
    expected[order[:pruned]] = False
    assert np.array_equal(keep, expected)  # random weights: no ties
    if 0 < pruned < weights.size:
        assert np.abs(weights[keep]).min() > np.abs(weights[~keep]).max()


def test_magnitude_mask_with_previous_prunes_a_share_of_the_survivors():
    torch.manual_seed(0)
    net = tiny_cnn()
    first = magnitude_mask(net, 0.2)
    second = magnitude_mask(net, 0.2, previous=first)
    for name, keep in second.masks.items():
        assert not (keep & ~first.masks[name]).any()  # pruned stays pruned
    total = sum(m.numel() for m in first.masks.values())
    survivors = sum(int(m.sum()) for m in first.masks.values())
    assert abs(sum(int(m.sum()) for m in second.masks.values()) - (survivors - round(0.2 * survivors))) == 0
    assert abs((1 - second.density()) - 0.36) <= 1 / total
    with pytest.raises(ConfigError, match="sparsity"):
        magnitude_mask(net, 1.5)


def test_omp_zeroes_the_smallest_weights_and_reports_sparsity():
    torch.manual_seed(0)
    net = tiny_cnn()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    mask = omp(net, 0.5)
    for name, param in net.named_parameters():
        if name in mask.masks:
            keep = mask.masks[name]
            assert torch.equal(param[keep], before[name][keep])
            assert (param[~keep] == 0).all() and not torch.signbit(param[~keep]).any()  # +0.0, bit for bit
        else:
            assert torch.equal(param, before[name])
    assert abs(sparsity(net, mask) - 0.5) <= 1 / sum(m.numel() for m in mask.masks.values())


def test_pruned_weights_stay_exactly_zero_through_fit():
    """SGD with momentum and weight decay: the pinned zeros never move, the survivors do."""
    torch.manual_seed(0)
    net = tiny_cnn()
    mask = omp(net, 0.8)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = make_optimizer(net.parameters(), "sgd", 0.05, momentum=0.9, weight_decay=5e-4)
    set_seed(0)
    fit(net, [Phase(make_loader(toy_data(), 16), cross_entropy)], optimizer, make_accelerator(), 2, mask=mask)
    for name, keep in mask.masks.items():
        param = dict(net.named_parameters())[name].detach()
        zeros = param[~keep]
        assert torch.equal(zeros.view(torch.int32), torch.zeros_like(zeros).view(torch.int32))
        assert not torch.equal(param[keep], before[name][keep])
    assert not torch.equal(net[6].weight, before["6.weight"])  # outside the scope: free


def test_apply_mask_checks_names():
    with pytest.raises(ConfigError, match="does not have"):
        apply_mask(tiny_cnn(), ParamMask({"nope": torch.ones(3, dtype=torch.bool)}))


# --- IMP with rewinding -----------------------------------------------------------------------------------------


def test_imp_prunes_20_percent_of_survivors_per_round_and_rewinds():
    torch.manual_seed(0)
    net = tiny_cnn()
    rewind = {k: v.clone() for k, v in net.state_dict().items()}
    with (
        torch.no_grad()
    ):  # "training" after the rewind point: the trained weights differ from the rewind ones
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    seen = []

    def spy(model, mask, round_index):
        # Before retraining: the survivors are exactly the rewind weights, the pruned entries exactly zero.
        for name, param in model.named_parameters():
            expected = rewind[name]
            if name in mask.masks:
                expected = torch.where(mask.masks[name], expected, torch.zeros_like(expected))
            assert torch.equal(param, expected), name
        seen.append((round_index, 1 - mask.density()))
        with torch.no_grad():  # a stand-in for retraining that keeps the pruned zeros
            for param in model.parameters():
                param.mul_(1.5)

    mask = imp(net, None, rounds=2, rate=0.2, rewind_state=rewind, train_fn=spy)
    total = sum(m.numel() for m in mask.masks.values())
    assert [r for r, _ in seen] == [0, 1]
    assert abs(seen[0][1] - 0.2) <= 1 / total and abs(seen[1][1] - 0.36) <= 1 / total
    assert abs(sparsity(net, mask) - 0.36) <= 1 / total


def test_imp_with_fit_reaches_36_percent_and_keeps_zeros(tmp_path):
    torch.manual_seed(0)
    net = tiny_cnn()
    rewind = {k: v.clone() for k, v in net.state_dict().items()}
    set_seed(0)
    optimizer = make_optimizer(net.parameters(), "sgd", 0.05)
    fit(net, [Phase(make_loader(toy_data(), 16), cross_entropy)], optimizer, make_accelerator(), 1)
    mask = imp(
        net,
        toy_data(),
        make_accelerator(tmp_path),
        rounds=2,
        rate=0.2,
        rewind_state=rewind,
        epochs=1,
        lr=0.05,
    )
    total = sum(m.numel() for m in mask.masks.values())
    assert abs(sparsity(net, mask) - 0.36) <= 1 / total
    assert (tmp_path / "checkpoints" / "imp_round1" / "state.pt").exists()


# --- ℓ1-sparse --------------------------------------------------------------------------------------------------


def test_l1_schedule_follows_the_reference_formula():
    method = L1Sparse(epochs=10, l1_weight=5e-4)
    assert [method.gamma(t) for t in range(10)] == pytest.approx([5e-4 * (1 - t / 10) for t in range(10)])
    method = L1Sparse(epochs=10, l1_weight=1e-4, no_l1_epochs=4)
    assert [method.gamma(t) for t in range(10)] == pytest.approx(
        [1e-4 * (1 - t / 6) for t in range(6)] + [0] * 4
    )
    assert [l1_weight_at(t, 4, 2.0, 0, "increase") for t in range(4)] == pytest.approx([0, 0.5, 1.0, 1.5])
    assert [l1_weight_at(t, 4, 2.0, 1, "constant") for t in range(4)] == [2.0, 2.0, 2.0, 0.0]
    # the reference's special case: no active epoch -> the full weight throughout
    assert l1_weight_at(0, 3, 2.0, 3) == 2.0
    with pytest.raises(ConfigError, match="schedule"):
        L1Sparse(l1_schedule="cosine")
    with pytest.raises(ConfigError, match="no_l1_epochs"):
        L1Sparse(epochs=2, no_l1_epochs=3)


def world_model():
    from unlearn.models import load_model

    return load_model("world:digits", "digits_cnn", 10)


def reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    images, labels = next(iter(torch.utils.data.DataLoader(data, batch_size=len(data))))
    return float((model(images).argmax(1) == labels).float().mean())


def test_l1_sparse_shrinks_the_weights_on_digits(digits_world, digits_task, tmp_path):
    set_seed(0)
    plain = L1Sparse(epochs=2, l1_weight=0.0).unlearn(world_model(), digits_task, make_accelerator())
    reset_accelerate()
    set_seed(0)
    sparse = L1Sparse(epochs=2, l1_weight=5e-3).unlearn(
        world_model(), digits_task, make_accelerator(tmp_path)
    )
    with torch.no_grad():
        plain_l1 = float(l1_norm(plain.trainable.parameters()))
        sparse_l1 = float(l1_norm(sparse.trainable.parameters()))
    assert sparse_l1 < 0.98 * plain_l1, (sparse_l1, plain_l1)
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} == {"l1_sparse_0", "l1_sparse_1"}
    assert accuracy(sparse, digits_task.retain) > 0.8


def test_l1_sparse_without_l1_is_fine_tuning(digits_world, digits_task):
    from unlearn.methods.baselines import FineTune

    set_seed(0)
    ft = FineTune(epochs=1).unlearn(world_model(), digits_task, make_accelerator())
    reset_accelerate()
    set_seed(0)
    l1 = L1Sparse(epochs=1, l1_weight=0.0).unlearn(world_model(), digits_task, make_accelerator())
    for (name, a), b in zip(ft.trainable.state_dict().items(), l1.trainable.state_dict().values()):
        assert torch.equal(a, b), name


def test_l1_sparse_resumes_after_an_interrupted_epoch(digits_world, digits_task, tmp_path, monkeypatch):
    from unlearn.methods import l1_sparse

    method = L1Sparse(epochs=2, l1_weight=5e-3)
    set_seed(0)
    whole = method.unlearn(world_model(), digits_task, make_accelerator(tmp_path / "whole"))
    reset_accelerate()

    real_fit = l1_sparse.fit

    def interrupted(*args, stage, **kwargs):
        if stage == "l1_sparse_1":
            raise KeyboardInterrupt
        return real_fit(*args, stage=stage, **kwargs)

    monkeypatch.setattr(l1_sparse, "fit", interrupted)
    set_seed(0)
    with pytest.raises(KeyboardInterrupt):
        method.unlearn(world_model(), digits_task, make_accelerator(tmp_path / "cut"))
    monkeypatch.setattr(l1_sparse, "fit", real_fit)
    reset_accelerate()
    set_seed(123)  # the resumed stage restores the RNG state of its checkpoint
    resumed = method.unlearn(world_model(), digits_task, make_accelerator(tmp_path / "cut"))
    for (name, a), b in zip(whole.trainable.state_dict().items(), resumed.trainable.state_dict().values()):
        assert torch.equal(a, b), name


# --- prune first, then unlearn ----------------------------------------------------------------------------------


def is_exact_zero(tensor: torch.Tensor) -> bool:
    """+0.0 bit for bit (a -0.0 or a denormal would not do)."""
    return torch.equal(tensor.view(torch.int32), torch.zeros_like(tensor).view(torch.int32))


@pytest.mark.parametrize("method", ["grad_ascent", "random_label", "salun", "l1_sparse", "retrain"])
def test_every_method_keeps_a_pruned_models_zeros(digits_world, digits_task, method):
    """A model's `pruning_mask` binds every method, even Retrain's fresh weights and SalUn's own mask."""
    from unlearn.methods import get_method

    model = world_model()
    mask = omp(model, 0.9)
    model.pruning_mask = mask
    set_seed(0)
    result = get_method(method)(epochs=1).unlearn(model, digits_task, make_accelerator())
    params = dict(result.trainable.named_parameters())
    for name, keep in mask.masks.items():
        assert is_exact_zero(params[name].detach()[~keep]), name
        assert params[name].detach()[keep].abs().sum() > 0


def test_prune_spec_is_validated():
    from unlearn.recipe import load_recipe

    base = "recipes/classifier/digits/finetune.yaml"
    with pytest.raises(ConfigError, match="model.prune.method"):
        load_recipe(base, ["model.prune={method: snip}"])
    with pytest.raises(ConfigError, match="sparsity"):
        load_recipe(base, ["model.prune={method: omp, sparsity: 1.5}"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_recipe(base, ["model.prune={method: omp, sparsty: 0.5}"])
    resolved = load_recipe(base, ["model.prune={method: omp, sparsity: 0.5}"]).to_dict()
    assert resolved["model"]["prune"]["scope"] == "conv" and resolved["model"]["prune"]["sparsity"] == 0.5


def test_pipeline_prunes_first_then_unlearns_and_keeps_retrain_dense(digits_world, tmp_path):
    """The run prunes the loaded model (OMP + one retraining epoch), fine-tunes the sparse model, scores the
    pruned model as `original_*`, writes the mask and the pruned model, and its Retrain reference stays dense."""
    from unlearn.checkpoints import load_state_dict
    from unlearn.pipeline import run
    from unlearn.recipe import load_recipe

    recipe = load_recipe(
        "recipes/classifier/digits/finetune.yaml",
        [
            "method.epochs=1",
            "model.prune={method: omp, sparsity: 0.8, epochs: 1, lr: 0.05, batch_size: 64}",
            "eval.metrics=[UA, RA, TA, MIA]",
        ],
    )
    metrics = run(recipe, tmp_path / "run", log=lambda message: None)
    assert metrics["pruned_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert metrics["original_RA"] > 90  # the retraining epoch recovered the pruned model
    mask = ParamMask.load(tmp_path / "run" / "pruning_mask.safetensors")
    final = load_state_dict(tmp_path / "run" / "model" / "model.safetensors")
    pruned = load_state_dict(tmp_path / "run" / "pruned" / "model.safetensors")
    for name, keep in mask.masks.items():
        assert is_exact_zero(final[name][~keep]) and is_exact_zero(pruned[name][~keep])
    assert not torch.equal(final["body.3.weight"], pruned["body.3.weight"])  # fine-tuning moved the survivors
    reference = load_state_dict(tmp_path / "run" / "reference" / "model" / "model.safetensors")
    assert (reference["body.3.weight"] == 0).float().mean() < 0.01
