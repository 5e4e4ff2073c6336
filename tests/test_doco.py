"""DoCo: the concept-preserving gradient's two forms, the discriminator warm-up, what is trained, the PatchGAN
on both input sizes (tiny pipelines built from configs, no download)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_diffusion import cat_task, tiny_ddpm_pipeline, tiny_sd_pipeline
from tiny_diffusion import cpu_accelerator as _accelerator
from tiny_diffusion import load_pipeline as _load


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("doco-pipelines")
    return {
        "sd": tiny_sd_pipeline(root / "sd"),
        "sd_pixels": tiny_sd_pipeline(root / "sd_pixels", vae=False),
        "ddpm": tiny_ddpm_pipeline(root / "ddpm", num_classes=3),
    }


def _small(**fields):
    from unlearn.methods.doco import DoCo

    base = dict(
        steps=3, warm_up=1, lr=1e-2, disc_lr=1e-2, batch_size=2, num_anchor_images=4, anchor_steps=2,
        anchor_guidance=2.0, log_every=1,
    )  # fmt: skip
    return DoCo(**{**base, **fields})


def _unet(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


# -- the concept-preserving gradient ------------------------------------------------------------------------


def _conflicting_pair():
    torch.manual_seed(0)
    g_pres = [torch.randn(3, 4), torch.randn(5)]
    # per tensor, g_adv = -0.7 g_pres + an orthogonal part: a conflict in every tensor
    g_adv = []
    for p in g_pres:
        noise = torch.randn_like(p)
        orth = noise - (noise * p).sum() / p.pow(2).sum() * p
        g_adv.append(-0.7 * p + orth)
    return g_adv, g_pres


def test_projection_removes_exactly_the_conflicting_component():
    from unlearn.methods.doco import cpg_projection

    g_adv, g_pres = _conflicting_pair()
    out = cpg_projection(g_adv, g_pres)
    for a, p, o in zip(g_adv, g_pres, out):
        assert (a * p).sum() < 0
        assert abs(float((o * p).sum())) < 1e-5  # orthogonal to the preservation gradient afterwards
        expected = a - (a * p).sum() / p.pow(2).sum() * p  # only the component along g_pres was taken away
        assert torch.allclose(o, expected, atol=1e-6)
    agreeing = [p * 0.5 + 0.01 * torch.randn_like(p) for p in g_pres]
    for a, o in zip(agreeing, cpg_projection(agreeing, g_pres)):
        assert torch.equal(a, o)  # no conflict: unchanged


def test_reference_scaling_is_its_formula_and_not_the_full_projection():
    from unlearn.methods.doco import cpg_reference

    g_adv, g_pres = _conflicting_pair()
    lam = 0.8
    out = cpg_reference(g_adv, g_pres, lam)
    for a, p, o in zip(g_adv, g_pres, out):
        cos = (a * p).sum() / (a.norm() * p.norm())
        assert cos < 0
        assert torch.allclose(o, a - lam * cos * p / p.norm(), atol=1e-6)
        # the unit-vector scaling removes cos along ĝ_pres, not ‖g_adv‖·cos: a conflict remains unless ‖g_adv‖ = 1
        assert (o * p).sum() < -1e-3
    same = [p * 0.5 for p in g_pres]
    assert all(torch.equal(a, o) for a, o in zip(same, cpg_reference(same, g_pres, lam)))


def test_clip_gradients_scales_the_total_norm():
    from unlearn.methods.doco import clip_gradients

    grads = [torch.full((4,), 3.0), torch.full((9,), 4.0 / 3.0)]  # total norm sqrt(36 + 16) > 1
    clipped = clip_gradients(grads, 1.0)
    total = torch.sqrt(sum(g.pow(2).sum() for g in clipped))
    assert abs(float(total) - 1.0) < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(grads, clip_gradients(grads, None)))


# -- the discriminator --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "size", "out"), [(1, 8, 1), (4, 64, 3), (4, 8, 1), (3, 16, 1)])
def test_patch_discriminator_adapts_to_the_input_size(channels, size, out):
    from unlearn.methods.doco import PatchDiscriminator

    disc = PatchDiscriminator(channels, size)
    assert disc(torch.randn(2, channels, size, size)).shape == (2, 1, out, out)
    widths = [m.out_channels for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == {8: [64, 128, 1], 64: [64, 128, 256, 512, 1], 16: [64, 128, 256, 1]}[size]
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == len(widths) - 2  # every block but the first and the final conv


# -- the method keeps its promises --------------------------------------------------------------------------


def test_warm_up_trains_the_discriminator_only(pipelines, tmp_path, one_thread, monkeypatch):
    from unlearn.methods import doco

    model = _load(pipelines["sd"])
    before = _unet(model)
    created = []
    original_init = doco.PatchDiscriminator.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.append((self, {n: p.detach().clone() for n, p in self.named_parameters()}))

    monkeypatch.setattr(doco.PatchDiscriminator, "__init__", recording_init)
    method = _small(steps=3, warm_up=2)
    # The state right after the warm-up: recorded when the first model step asks for its gradients (the
    # warm-up's discriminator steps have run by then, the model's has not; the model steps first in an iteration).
    seen = {}
    real = doco.DoCo.generator_gradients

    def spy(self, adv, pres, params, *rest):
        if "unet" not in seen:
            seen["unet"] = _unet(model)
            seen["disc"] = {n: p.detach().clone() for n, p in created[0][0].named_parameters()}
        return real(self, adv, pres, params, *rest)

    monkeypatch.setattr(doco.DoCo, "generator_gradients", spy)
    method.unlearn(model, cat_task(model, num_images=2), _accelerator(tmp_path))
    # after the discriminator-only steps: the UNet is bit for bit the original, the discriminator moved
    assert all(torch.equal(seen["unet"][n], before[n]) for n in before)
    start = created[0][1]
    assert any(not torch.equal(seen["disc"][n], start[n]) for n in start)
    # and the third step (after the warm-up) moves the UNet
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.unet.named_parameters())


@pytest.mark.parametrize("cpg", ["reference", "projection", "none"])
def test_only_cross_attention_keys_and_values_change(pipelines, tmp_path, one_thread, cpg):
    model = _load(pipelines["sd"])
    before = _unet(model)
    _small(cpg=cpg, add_preservation=cpg == "projection").unlearn(
        model, cat_task(model, num_images=2), _accelerator(tmp_path)
    )
    changed = {n for n, p in model.unet.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "nothing was trained"
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in changed), changed
    for name, param in model.unet.named_parameters():  # every other tensor bit for bit
        if ".attn2.to_k." not in name and ".attn2.to_v." not in name:
            assert torch.equal(param.detach(), before[name]), name
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert any('"discriminator":' in line for line in lines)
    assert any('"adversarial":' in line for line in lines)


def test_pixel_space_bf16_and_inputs_untouched(pipelines, tmp_path, one_thread):
    model = _load(pipelines["sd_pixels"])
    before = _unet(model)
    _small(steps=2).unlearn(model, cat_task(model, num_images=2), _accelerator(tmp_path, "bf16"))
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.unet.named_parameters())
    again = _load(pipelines["sd_pixels"])  # the input folder is unchanged
    assert all(torch.equal(p.detach(), before[n]) for n, p in again.unet.named_parameters())
    model.save(tmp_path / "out")  # a plain diffusers pipeline: loads back with the trained weights
    saved = _load(tmp_path / "out")
    assert all(
        torch.equal(p.detach(), q.detach()) for p, q in zip(model.unet.parameters(), saved.unet.parameters())
    )


def test_bad_configurations_are_refused(pipelines, tmp_path):
    from unlearn.errors import ConfigError

    with pytest.raises(ConfigError, match="cpg must be one of"):
        _small(cpg="pcgrad")
    with pytest.raises(ConfigError, match="warm_up"):
        _small(steps=3, warm_up=3)
    model = _load(pipelines["ddpm"])
    from unlearn.data import ConceptPrompts, UnlearnData

    with pytest.raises(ConfigError, match="use params: full"):
        _small().unlearn(model, UnlearnData(None, None, None, None, 0, prompts=None), _accelerator(tmp_path))
    fp16 = SimpleNamespace(num_processes=1, mixed_precision="fp16")
    data = UnlearnData(None, None, None, None, 0, prompts=ConceptPrompts("cat", ["the cat"], ["a dog"]))
    with pytest.raises(ConfigError, match="fp16"):
        _small().unlearn(_load(pipelines["sd"]), data, fp16)
