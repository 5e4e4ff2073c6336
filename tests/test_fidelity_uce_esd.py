"""Reference parity of UCE and ESD (issue 16): each test recomputes, in a few lines of plain torch written from the
authors' code, what our method computes on a tiny pipeline, and compares.

References: UCE, rohitgandikota/unified-concept-editing: `train-scripts/train_erase.py` at 35e91e2 (`edit_model`,
the paper's code) and `trainscripts/uce_sd_erase.py` at 28c81ed (`UCE`, the newer script). ESD,
rohitgandikota/erasing: `train-scripts/train-esd.py` at a2189e9 (the paper's code, with its CompVis DDIM sampler
`ldm/models/diffusion/ddim.py`) and `esd_sd.py` at 25613d2 (the newer diffusers script).
"""

from __future__ import annotations

import random
import types

import pytest
import torch
import torch.nn.functional as F
from tiny_diffusion import load_pipeline as _load
from tiny_diffusion import reference_text_states, tiny_sd_pipeline

FORGET = ["a photo of the cat", "the cat", "cat"]
RETAIN = ["a photo of the dog", "a tree"]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("pipelines") / "sd")


def _data(forget, anchors, retain):
    from unlearn.data import ConceptPrompts

    return types.SimpleNamespace(
        prompts=ConceptPrompts(concept="cat", forget=list(forget), anchor=list(anchors), retain=list(retain))
    )


def _projections(unet) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


def _solve(weights, erased, preserved, lamb, erase_scale, preserve_scale):
    """Each layer's W = mat1 @ inverse(mat2), mat1 = λW + s_e Σ v cᵀ + s_p Σ W c_p c_pᵀ, mat2 = λI + s_e Σ c cᵀ +
    s_p Σ c_p c_pᵀ, v = W a (the anchor's states through the original layer: `--technique replace`)."""
    solved = {}
    for name, weight in weights.items():
        w = weight.double()
        mat1, mat2 = lamb * w, lamb * torch.eye(w.shape[1], dtype=torch.float64)
        for c, a in erased:
            mat1 = mat1 + erase_scale * (a @ w.T).T @ c
            mat2 = mat2 + erase_scale * c.T @ c
        mat1 = mat1 + preserve_scale * (preserved @ w.T).T @ preserved
        mat2 = mat2 + preserve_scale * preserved.T @ preserved
        solved[name] = mat1 @ torch.inverse(mat2)
    return solved


def _reference_train_erase(model, forget, anchors, retain, lamb=0.5, erase_scale=1.0):
    """train_erase.py: '' guides become ' '; a prompt pair keeps old[i : L - (far - i)] and new[j : L - (far - j)]
    with i, j = mask.sum() - 2, far = max(i, j); '' and every retain prompt are preserved at every position with
    preserve_scale = max(0.1, 1 / len(['', *retain])); the entry point passes lamb = 0.5."""
    erased = []
    for old, new in zip(forget, anchors):
        states, (i, j) = reference_text_states(model, [old, new if new != "" else " "], torch.float64)
        far, length = max(i, j), states.shape[1]
        erased.append((states[0, i : length - (far - i)], states[1, j : length - (far - j)]))
    kept = ["", *retain]
    preserved = reference_text_states(model, kept, torch.float64)[0].flatten(0, 1)
    weights = {n: m.weight.detach() for n, m in _projections(model.unet).items()}
    return _solve(weights, erased, preserved, lamb, erase_scale, max(0.1, 1 / len(kept)))


def _reference_uce_sd_erase(model, forget, anchors, retain, lamb=0.5, preserve_scale=1.0):
    """uce_sd_erase.py: one state per prompt, at mask.sum() - 2 (the start token for ''), for erased, guide and
    preserved prompts; only the listed preserve concepts; --preserve_scale 1, --lamb 0.5."""

    def last(texts):
        states, idx = reference_text_states(model, texts, torch.float64)
        return states[torch.arange(len(texts)), idx]

    erased = [(c[None], a[None]) for c, a in zip(last(forget), last(anchors))]
    weights = {n: m.weight.detach() for n, m in _projections(model.unet).items()}
    return _solve(weights, erased, last(retain), lamb, 1.0, preserve_scale)


def _ours(folder, forget, anchors, retain, **fields):
    from accelerate import Accelerator

    from unlearn.methods.uce import UCE

    model = _load(folder)
    before = {n: m.weight.detach().clone() for n, m in _projections(model.unet).items()}
    UCE(**fields).unlearn(model, _data(forget, anchors, retain), Accelerator(cpu=True))
    return before, {n: m.weight.detach().clone() for n, m in _projections(model.unet).items()}


def _relative_difference(before, ours, reference):
    """||W_ours − W_ref||_F / ||W_ref − W0||_F over every edited projection (relative to the edit itself)."""
    difference = sum(((ours[n].double() - reference[n]) ** 2).sum() for n in before) ** 0.5
    change = sum(((reference[n] - before[n].double()) ** 2).sum() for n in before) ** 0.5
    assert change > 1e-3  # the edit is not trivially zero
    return float(difference / change)


@pytest.mark.parametrize(
    "anchors",
    [["", "", ""], ["a photo of the dog", "a dog", "the house painting"]],
    ids=["empty_anchor", "nonempty_anchor"],
)
def test_uce_defaults_match_train_erase_closed_form(sd_folder, anchors, one_thread):
    """Our UCE at its defaults = train_erase.py's edit_model as its entry point calls it (lamb 0.5, erase_scale 1,
    preserve_scale max(0.1, 1/n), '' preserved). The empty anchor is the case the old start-index clamp broke
    (the concept was paired with the anchor one position late: ~100 % of the edit off)."""
    model = _load(sd_folder)
    reference = _reference_train_erase(model, FORGET, anchors, RETAIN)
    before, ours = _ours(sd_folder, FORGET, anchors, RETAIN)
    # both solve in float64 from the same float32 text states; ours is stored back in float32 weights: 1e-5 of
    # the edit leaves two orders of magnitude above that rounding
    assert _relative_difference(before, ours, reference) <= 1e-5


def test_uce_last_word_mode_matches_uce_sd_erase(sd_folder, one_thread):
    """`positions: last_word, preserve_unconditional: false, preserve_scale: 1` = the newer uce_sd_erase.py."""
    model = _load(sd_folder)
    anchors = ["", "a dog", ""]
    reference = _reference_uce_sd_erase(model, FORGET, anchors, RETAIN)
    before, ours = _ours(
        sd_folder,
        FORGET,
        anchors,
        RETAIN,
        positions="last_word",
        preserve_unconditional=False,
        preserve_scale=1.0,
    )
    assert _relative_difference(before, ours, reference) <= 1e-5  # as above: float64 solves, float32 storage


def test_empty_prompt_starts_at_the_start_token(sd_folder):
    """'' (and ' ', which train_erase.py maps '' to) has no word: its span starts at 0, the start-of-text token."""
    from unlearn.methods.closed_form import concept_keys, concept_starts

    model = _load(sd_folder)
    assert concept_starts(model, ["", " ", "cat", "a photo of the cat"]) == [0, 0, 1, 5]
    keys, anchor_keys = concept_keys(model, ["cat"], [""])
    states, _ = reference_text_states(model, ["cat", ""], torch.float64)
    length = states.shape[1]
    # the anchor from its start token on, as many positions as "cat" has from its word on
    assert torch.equal(anchor_keys, states[1, : length - 1].float())
    assert torch.equal(keys, states[0, 1:].float())


def test_uce_defaults_are_the_reference_entry_points():
    from unlearn.errors import ConfigError
    from unlearn.methods.uce import UCE

    uce = UCE()
    assert (uce.ridge, uce.erase_scale, uce.preserve_scale, uce.preserve_unconditional, uce.positions) == (
        0.5,
        1.0,
        None,
        True,
        "concept",
    )
    with pytest.raises(ConfigError, match="positions"):
        UCE(positions="first")


# -- ESD ----------------------------------------------------------------------------------------------------------


def _capture_loss(monkeypatch, esd, model, data):
    """Run `esd.unlearn` up to its training loop and return its loss function and the (x_t, t, who sampled)
    of each call."""
    import unlearn.methods.esd as module

    captured, points = {}, []
    original = module.ESD.noisy_point

    def spy(self, sampler_model, *args):
        x_t, t = original(self, sampler_model, *args)
        points.append((x_t, t, sampler_model))
        return x_t, t

    monkeypatch.setattr(module.ESD, "noisy_point", spy)
    monkeypatch.setattr(module, "train_steps", lambda model, loss_fn, *a, **k: captured.update(loss=loss_fn))
    esd.unlearn(model, data, None)
    return captured["loss"], points


def test_esd_loss_and_gradient_match_negative_guidance(sd_folder, monkeypatch, one_thread):
    """One step: loss = MSE(ε_θ(x_t, c), ε_θ*(x_t, ∅) − η (ε_θ*(x_t, c) − ε_θ*(x_t, ∅))) (train-esd.py:239-247),
    recomputed with plain diffusers UNets loaded afresh; the loss and the gradient on ESD-x's weights agree."""
    from diffusers import UNet2DConditionModel

    from unlearn.methods.esd import ESD

    model = _load(sd_folder)
    torch.manual_seed(0)
    loss_fn, points = _capture_loss(
        monkeypatch,
        ESD(steps=1, ddim_steps=4, negative_guidance=1.5, params="xattn"),
        model,
        _data(["a photo of the cat"], [""], ["a photo of the dog"]),
    )
    loss = loss_fn(0)
    loss.backward()
    x_t, t, _ = points[0]

    student = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    frozen = UNet2DConditionModel.from_pretrained(sd_folder / "unet").requires_grad_(False)
    emb_p, _ = reference_text_states(model, ["a photo of the cat"], torch.float64)
    emb_0, _ = reference_text_states(model, [""], torch.float64)
    emb_p, emb_0 = emb_p.float(), emb_0.float()
    t = torch.as_tensor(t).reshape(1)
    with torch.no_grad():
        e_0 = frozen(x_t, t, encoder_hidden_states=emb_0).sample
        e_p = frozen(x_t, t, encoder_hidden_states=emb_p).sample
    e_n = student(x_t, t, encoder_hidden_states=emb_p).sample
    expected = F.mse_loss(e_n, e_0 - 1.5 * (e_p - e_0))
    expected.backward()
    # the same float32 UNet ops on the same inputs: agreement to float32 rounding
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)
    ours = dict(model.unet.named_parameters())
    trained = [n for n, p in ours.items() if p.requires_grad]
    assert trained and all(".attn2." in n for n in trained)
    for name in trained:
        theirs = dict(student.named_parameters())[name].grad
        torch.testing.assert_close(ours[name].grad, theirs, rtol=1e-4, atol=1e-7)  # float32 rounding


def _compvis_ddim_till(unet, alphas, x, cond, uncond, ddim_timesteps, till, guidance):
    """train-esd.py's x_t: its CompVis `DDIMSampler.sample(..., t_start=-1, till_T=till)` (ddim.py:155, 194): run
    ddim_timesteps[:-1] from the top (index = total - i - 1), η = 0, and stop after the step whose index + 1 ==
    till; alphas_prev = [ᾱ_0, ᾱ at ddim_timesteps[:-1]]."""
    used = ddim_timesteps[:-1]
    alphas_prev = [alphas[0]] + [alphas[s] for s in ddim_timesteps[:-1]]
    total = len(used)
    for i, step in enumerate(reversed(used)):
        index = total - i - 1
        t = torch.tensor([step])
        e_u = unet(x, t, encoder_hidden_states=uncond).sample
        e_c = unet(x, t, encoder_hidden_states=cond).sample
        eps = e_u + guidance * (e_c - e_u)
        a_t, a_prev = alphas[ddim_timesteps[index]], alphas_prev[index]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        if index + 1 == till:
            break
    return x


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_esd_bin_sampling_is_train_esd(sd_folder, k, one_thread):
    """`timestep: bin` (the default) gives train-esd.py's x_t for t_enc = k (its CompVis sampler, rewritten above)
    and draws t in [round(kT/S), round((k+1)T/S)) (train-esd.py:226-231); `step` keeps the step's timestep."""
    from unlearn.methods.esd import ESD

    model = _load(sd_folder)
    steps, total = 4, model.num_train_timesteps
    esd = ESD(ddim_steps=steps, start_guidance=3.0)
    assert (esd.sample_with, esd.timestep) == ("model", "bin")
    sampler = model.sampler(steps)
    with torch.no_grad():
        cond, uncond = model.encode(["a photo of the cat"]), model.encode([""])
        torch.manual_seed(1)
        x_t, t = esd.noisy_point(model, cond, uncond, sampler, k, random.Random(0))
        torch.manual_seed(1)
        noise = torch.randn(model.latent_shape(1))
        ddim_timesteps = sorted(int(s) for s in sampler.timesteps)  # CompVis order (SD: 1, 21, ..., 981)
        expected = _compvis_ddim_till(
            model.unet, model.scheduler.alphas_cumprod, noise, cond, uncond, ddim_timesteps, k, 3.0
        )
    # the same UNet calls, DDIM's update written two ways: float32 rounding
    torch.testing.assert_close(x_t, expected, rtol=1e-5, atol=1e-5)
    low, high = round(k * total / steps), round((k + 1) * total / steps)
    rng = random.Random(0)
    drawn = {esd.noisy_point(model, cond, uncond, sampler, k, rng)[1] for _ in range(20)}
    assert all(low <= d < high for d in drawn) and len(drawn) > 1
    with torch.no_grad():
        _, t_step = ESD(ddim_steps=steps, timestep="step").noisy_point(model, cond, uncond, sampler, k, rng)
    assert int(t_step) == int(sampler.timesteps[k])


def test_esd_samples_with_the_model_or_the_frozen_copy(sd_folder, monkeypatch, one_thread):
    """train-esd.py draws x_t with the model being trained (its `model`, `sampler`), esd_sd.py with the frozen
    base UNet: `sample_with` picks which, and the frozen copy is what e_0 / e_c come from."""
    from unlearn.errors import ConfigError
    from unlearn.methods.esd import ESD

    data = _data(["a photo of the cat"], [""], ["a photo of the dog"])
    for who in ("model", "frozen"):
        model = _load(sd_folder)
        loss_fn, points = _capture_loss(monkeypatch, ESD(steps=1, ddim_steps=2, sample_with=who), model, data)
        loss_fn(0)
        assert (points[0][2] is model) == (who == "model")
        assert (points[0][2].unet is model.unet) == (who == "model")
        monkeypatch.undo()
    with pytest.raises(ConfigError, match="sample_with"):
        ESD(sample_with="teacher")
    with pytest.raises(ConfigError, match="timestep"):
        ESD(timestep="middle")


# -- ESD-u's parameter set --------------------------------------------------------------------------------------

# The reference's `--train_method noxattn` (train-esd.py:167-168) skips CompVis names that start with `out.` or
# contain `attn2` or `time_embed`. What it trains, spelt in diffusers names (SD v1.x layout).
ESD_U_GLOBS = [
    "conv_in.*",
    "*resnets.*",
    "*samplers.*",
    "*attentions.*.norm.*",
    "*attentions.*.proj_in.*",
    "*attentions.*.proj_out.*",
    "*transformer_blocks.*.norm1.*",
    "*transformer_blocks.*.attn1.*",
    "*transformer_blocks.*.norm2.*",
    "*transformer_blocks.*.norm3.*",
    "*transformer_blocks.*.ff.*",
]


def test_noxattn_is_the_reference_esd_u_set_on_an_sd_unet():
    import fnmatch

    from diffusers import UNet2DConditionModel

    from unlearn.models.diffusion import Diffusion

    with torch.device("meta"):  # SD v1.x's layout (the default config), no memory
        unet = UNet2DConditionModel(cross_attention_dim=768)
    model = Diffusion(unet, None, text_encoder=torch.nn.Identity(), tokenizer=object())
    names = [n for n, _ in unet.named_parameters()]
    expected = {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in ESD_U_GLOBS)}
    assert set(model.parameters_named("noxattn")) == expected
    loose = set(model.parameters_named("all_but_xattn"))
    assert loose - expected == {
        n for n in names if n.startswith(("time_embedding.", "conv_norm_out.", "conv_out."))
    }
    assert not any("attn2" in n for n in loose)


def test_noxattn_on_the_tiny_pipeline_leaves_time_embedding_and_output_alone(sd_folder):
    model = _load(sd_folder)
    chosen = model.train_only("noxattn")
    frozen = {n for n, p in model.unet.named_parameters() if not p.requires_grad}
    assert frozen and set(chosen).isdisjoint(frozen)
    assert {n.split(".")[0] for n in frozen if ".attn2." not in n} == {
        "time_embedding",
        "conv_norm_out",
        "conv_out",
    }
