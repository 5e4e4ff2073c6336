"""SalUn: the saliency mask as the reference computes it, and the mask respected bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn.errors import ConfigError
from unlearn.params import ParamMask, saliency_mask


def _ce_ascent(model, batch):
    return -F.cross_entropy(model(batch[0]), batch[1])


def test_saliency_mask_is_global_top_k_of_summed_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(3)]
    mask = saliency_mask(model, _ce_ascent, batches, sparsity=0.7)

    # Independent computation: signed sum of per-batch gradients, magnitude, global ranking in NumPy.
    summed = {n: np.zeros(tuple(p.shape)) for n, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad()
        _ce_ascent(model, batch).backward()
        for n, p in model.named_parameters():
            summed[n] += p.grad.numpy()
    flat = np.concatenate([np.abs(g).ravel() for g in summed.values()])
    keep = int(flat.size * 0.3)
    threshold = np.sort(flat)[::-1][keep - 1]
    for name, grad in summed.items():
        np.testing.assert_array_equal(mask.masks[name].numpy(), np.abs(grad) >= threshold)
    assert sum(int(m.sum()) for m in mask.masks.values()) == keep
    assert mask.density() == pytest.approx(keep / flat.size)


def test_saliency_mask_refuses_bad_sparsity():
    model = nn.Linear(2, 2)
    with pytest.raises(ConfigError):
        saliency_mask(model, _ce_ascent, [], sparsity=1.0)


def test_salun_moves_only_salient_weights_and_saves_its_mask(digits_world, tmp_path, digits_task):
    from accelerate import Accelerator

    from unlearn.evaluate import evaluate
    from unlearn.methods import get_method
    from unlearn.models import load_model

    data = digits_task
    model = load_model("world:digits", "digits_cnn", 10)
    before = {n: p.detach().clone() for n, p in model.network.named_parameters()}
    method = get_method("salun", "classifier")(epochs=3, weight_decay=5e-4, momentum=0.9)
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    unlearned = method.unlearn(model, data, accelerator)

    saved = ParamMask.load(tmp_path / "saliency_mask.safetensors")
    assert saved.density() == pytest.approx(0.5, abs=1e-4)
    moved = 0
    for name, param in unlearned.network.named_parameters():
        keep = saved.masks[name]
        assert torch.equal(param.detach()[~keep], before[name][~keep]), f"pinned entries of {name} moved"
        moved += int((param.detach()[keep] != before[name][keep]).sum())
    assert moved > 0
    assert evaluate(unlearned, data, ["UA"])["UA"] >= 90


def test_salun_reuses_a_saved_mask(digits_world, tmp_path, digits_task):
    from accelerate import Accelerator

    from unlearn.methods.salun import SalUn
    from unlearn.models import load_model

    data = digits_task
    first = SalUn(epochs=1)
    mask = first.mask(
        load_model("world:digits", "digits_cnn", 10), data, Accelerator(cpu=True, project_dir=str(tmp_path))
    )
    again = SalUn(epochs=1, mask_path=str(tmp_path / "saliency_mask.safetensors"))
    loaded = again.mask(load_model("world:digits", "digits_cnn", 10), data, Accelerator(cpu=True))
    assert mask.masks.keys() == loaded.masks.keys()
    assert all(torch.equal(mask.masks[n], loaded.masks[n]) for n in mask.masks)


# SalUn-soft (`soft: true`, reference RL_proximal): the proximal step, its schedule, and a short run.


def test_soft_threshold_matches_numpy():
    from unlearn.methods.salun import soft_threshold_

    rng = np.random.default_rng(0)
    shapes = [(4, 5), (7,), (2, 3, 3)]
    init = [rng.normal(size=s).astype(np.float32) for s in shapes]
    now = [i + rng.normal(scale=0.1, size=i.shape).astype(np.float32) for i in init]
    params = [torch.tensor(p) for p in now]
    k = 20
    tau = soft_threshold_(params, [torch.tensor(i) for i in init], k)

    delta = np.concatenate([(p - i).ravel() for p, i in zip(now, init)])
    expected_tau = np.sort(np.abs(delta))[k - 1]
    assert float(tau) == expected_tau
    reset = 0
    for p, i, got in zip(now, init, params):
        d = p - i
        expected = np.where(
            d > expected_tau, p - expected_tau, np.where(d < -expected_tau, p + expected_tau, i)
        )
        np.testing.assert_array_equal(got.numpy(), expected)
        reset += int((got.numpy() == i).sum())
        shrunk = np.abs(d) > expected_tau
        np.testing.assert_allclose(
            np.abs(got.numpy() - i)[shrunk], np.abs(d)[shrunk] - expected_tau, atol=1e-6
        )
    assert reset == k


def test_soft_threshold_leaves_fixed_entries_alone_and_k_zero_is_identity():
    from unlearn.methods.salun import soft_threshold_

    torch.manual_seed(0)
    init = [torch.randn(6, 6), torch.randn(5)]
    params = [i + 0.1 * torch.randn_like(i) for i in init]
    free = [torch.rand(6, 6) > 0.3, None]
    params[0][~free[0]] = 0.0  # pruned weights sit at zero
    before = [p.clone() for p in params]

    assert float(soft_threshold_(params, init, 0, free)) == 0.0
    assert all(torch.equal(p, b) for p, b in zip(params, before))

    n_free = int(free[0].sum()) + 5
    soft_threshold_(params, init, n_free // 2, free)
    assert torch.equal(params[0][~free[0]], torch.zeros(int((~free[0]).sum())))
    at_init = int((params[0] == init[0])[free[0]].sum()) + int((params[1] == init[1]).sum())
    assert at_init == n_free // 2
    soft_threshold_(params, init, 10**6, free)  # k beyond the free entries resets them all
    assert torch.equal(params[0][free[0]], init[0][free[0]]) and torch.equal(params[1], init[1])


def test_soft_k_is_constant_within_an_epoch_and_decays_over_epochs():
    from unlearn.methods.salun import soft_k

    epochs, steps_per_epoch, n = 4, 5, 10_000
    total = epochs * steps_per_epoch
    ks = [soft_k(step, total, epochs, 0.5, n) for step in range(1, total + 1)]
    per_epoch = [ks[e * steps_per_epoch : (e + 1) * steps_per_epoch] for e in range(epochs)]
    assert all(len(set(block)) == 1 for block in per_epoch)
    # The reference: int(mask_ratio * ((total - (epoch * steps_per_epoch + 1)) / total * n_params)).
    assert [block[0] for block in per_epoch] == [
        int(0.5 * (total - (e * 5 + 1)) / total * n) for e in range(4)
    ]
    assert [block[0] for block in per_epoch] == [4750, 3500, 2250, 1000]


def test_salun_soft_forgets_and_pins_the_expected_share_after_one_epoch(
    digits_world, one_thread, digits_task
):
    from accelerate import Accelerator

    from unlearn.evaluate import evaluate
    from unlearn.methods import get_method
    from unlearn.methods.salun import soft_k
    from unlearn.models import load_model

    data = digits_task
    model = load_model("world:digits", "digits_cnn", 10)
    assert evaluate(model, data, ["UA"])["UA"] < 10
    before = {n: p.detach().clone() for n, p in model.trainable.named_parameters()}
    method = get_method("salun", "classifier")(epochs=1, soft=True)
    unlearned = method.unlearn(model, data, Accelerator(cpu=True))

    n = sum(p.numel() for p in before.values())
    total_steps = -(-len(data.forget) // method.batch_size) + -(-len(data.retain) // method.batch_size)
    at_init = sum(
        int((p.detach() == before[name]).sum()) for name, p in unlearned.trainable.named_parameters()
    )
    assert at_init == soft_k(total_steps, total_steps, 1, 0.5, n)  # int(0.5 * (T - 1) / T * n)
    assert evaluate(unlearned, data, ["UA"])["UA"] >= 90


def test_salun_soft_keeps_pruned_weights_zero(digits_world, one_thread, digits_task):
    from accelerate import Accelerator

    from unlearn.methods.salun import SalUn
    from unlearn.models import load_model

    data = digits_task
    model = load_model("world:digits", "digits_cnn", 10)
    generator = torch.Generator().manual_seed(0)
    model.pruning_mask = ParamMask(
        {
            name: torch.rand(p.shape, generator=generator) > 0.5
            for name, p in model.trainable.named_parameters()
            if p.dim() > 1
        }
    )
    unlearned = SalUn(epochs=1, soft=True).unlearn(model, data, Accelerator(cpu=True))
    params = dict(unlearned.trainable.named_parameters())
    for name, keep in model.pruning_mask.masks.items():
        assert torch.all(params[name].detach()[~keep] == 0.0), f"pruned entries of {name} moved"
        assert torch.any(params[name].detach()[keep] != 0.0)


def test_salun_soft_refuses_a_mask_path_and_bad_ratio():
    from unlearn.methods.salun import SalUn

    with pytest.raises(ConfigError):
        SalUn(soft=True, mask_path="mask.safetensors")
    with pytest.raises(ConfigError):
        SalUn(soft=True, sparsity=1.0)
