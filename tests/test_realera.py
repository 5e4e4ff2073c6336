"""RealEra (unlearn/methods/realera.py): each part on its own (neighbour mining, beyond-concept sampling, the
closed form, the LoRA stage) and together, on a tiny Stable-Diffusion pipeline built from configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_diffusion import cat_task, tiny_sd_pipeline
from tiny_diffusion import cpu_accelerator as _accelerator
from tiny_diffusion import load_pipeline as _load


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return tiny_sd_pipeline(tmp_path_factory.mktemp("realera") / "sd")


def _keys(n=6, d=16):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1)) * 3.0


def test_neighbours_lie_inside_the_band_and_the_distance_bound():
    from unlearn.methods.realera import mine_neighbors

    keys = _keys()
    neighbours, source = mine_neighbors(keys, 5, 0.75, 0.8, 0.99, torch.Generator().manual_seed(0))
    assert neighbours.shape == (30, 16) and source.tolist() == [i for i in range(6) for _ in range(5)]
    cos = F.cosine_similarity(keys[source], neighbours, dim=1)
    assert (cos >= 0.8).all() and (cos <= 0.99).all()
    assert ((neighbours - keys[source]).norm(dim=1) <= 0.75 * keys[source].norm(dim=1) + 1e-5).all()
    # an absolute bound too
    absolute, src = mine_neighbors(keys, 3, 2.0, 0.8, 0.999, torch.Generator().manual_seed(0), relative=False)
    assert ((absolute - keys[src]).norm(dim=1) <= 2.0 + 1e-5).all()


def test_beyond_concept_samples_lie_outside_the_band_on_the_keys_norm():
    from unlearn.methods.realera import beyond_concept

    keys = _keys()
    beyond = beyond_concept(keys, 4, 0.75, 1.5, 0.8, torch.Generator().manual_seed(0))
    source = torch.arange(6).repeat_interleave(4)
    assert beyond.shape == (24, 16)
    assert (F.cosine_similarity(keys[source], beyond, dim=1) < 0.8).all()
    torch.testing.assert_close(beyond.norm(dim=1), keys[source].norm(dim=1))


def test_mining_is_seeded():
    from unlearn.methods.realera import beyond_concept, mine_neighbors

    keys = _keys()

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return mine_neighbors(keys, 4, 0.75, 0.8, 0.99, generator)[0], beyond_concept(
            keys, 4, 0.75, 1.5, 0.8, generator
        )

    first, again, other = draw(3), draw(3), draw(4)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize(
    "bad",
    [
        {"min_cosine": 0.95, "max_cosine": 0.9},  # S_1 > S_2
        {"max_distance": 0.0},  # D_1 <= 0
        {"max_distance": -1.0},
        {"min_cosine": -1.5},
        {"max_distance": 0.1, "max_cosine": 0.9},  # ||η|| <= 0.1 ||e|| keeps cos above 0.995: empty band
        {"beyond_distance": 0.5},  # beyond samples must lie farther than D_1
        {"neighbor_share": 2.0},
    ],
)
def test_bad_bounds_raise_config_error(bad):
    from unlearn.errors import ConfigError
    from unlearn.methods.realera import RealEra, mine_neighbors

    with pytest.raises(ConfigError):
        RealEra(**bad)
    if "beyond_distance" not in bad and "neighbor_share" not in bad:
        args = {"max_distance": 0.75, "min_cosine": 0.8, "max_cosine": 0.99, **bad}
        with pytest.raises(ConfigError):
            mine_neighbors(
                _keys(), 2, args["max_distance"], args["min_cosine"], args["max_cosine"], torch.Generator()
            )


def _changed(before: dict, model) -> set[str]:
    after = model.unet.state_dict()
    assert set(after) == set(before), "the UNet's tensors were renamed (a LoRA wrapper left behind?)"
    return {name for name in before if not torch.equal(before[name], after[name])}


def _plain(model) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in model.unet.modules())
    assert not any("lora" in name for name, _ in model.unet.named_parameters())


def test_closed_form_alone_edits_only_key_and_value_projections(pipeline, tmp_path):
    from unlearn.methods.realera import RealEra

    model = _load(pipeline)
    data = cat_task(model)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    forget = list(data.prompts.forget)
    RealEra(lora_steps=0, num_neighbors=4, num_beyond=4).unlearn(model, data, _accelerator(tmp_path))
    changed = _changed(before, model)
    assert changed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)
    assert data.prompts.forget == forget  # inputs untouched


def test_lora_stage_alone_changes_only_cross_attention_and_leaves_a_plain_unet(pipeline, tmp_path):
    from unlearn.methods.realera import RealEra

    model = _load(pipeline)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    method = RealEra(
        closed_form=False, lora_steps=3, lora_batch_size=2, lora_rank=2, lora_lr=1e-2, num_beyond=2
    )
    method.unlearn(model, cat_task(model), _accelerator(tmp_path))
    changed = _changed(before, model)
    assert changed and all(".attn2." in n for n in changed)
    _plain(model)


def test_closed_form_then_lora_keeps_its_promises(pipeline, tmp_path):
    from unlearn.methods.realera import RealEra

    model = _load(pipeline)
    data = cat_task(model)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    RealEra(num_neighbors=4, num_beyond=4, lora_steps=3, lora_batch_size=2, lora_lr=1e-2).unlearn(
        model, data, _accelerator(tmp_path)
    )
    changed = _changed(before, model)
    assert any(n.endswith("attn2.to_q.weight") for n in changed)  # the LoRA reached past the closed form
    assert all(".attn2." in n for n in changed)
    assert all(torch.isfinite(p).all() for p in model.unet.parameters())
    _plain(model)
    model.save(tmp_path / "out")  # a plain diffusers pipeline again
    reloaded = _load(tmp_path / "out")
    for name, tensor in model.unet.state_dict().items():
        torch.testing.assert_close(reloaded.unet.state_dict()[name], tensor)


def test_neighbour_encodings_replace_only_the_concept_positions(pipeline):
    from unlearn.methods.realera import RealEra, concept_starts

    model = _load(pipeline)
    prompts = ["a photo of the cat", "the cat"]
    with torch.no_grad():
        states = model.encode(prompts)
    method = RealEra()
    mixed = method.perturb(
        model, prompts, states, [True, False], torch.Generator().manual_seed(0), beyond=False
    )
    start = concept_starts(model, prompts)[0]
    assert torch.equal(mixed[0, :start], states[0, :start]) and torch.equal(mixed[1], states[1])
    cos = F.cosine_similarity(mixed[0, start:], states[0, start:], dim=1)
    assert (cos >= method.min_cosine - 1e-5).all() and (cos <= method.max_cosine + 1e-5).all()


def test_registered():
    from unlearn.methods import get_method
    from unlearn.methods.realera import RealEra

    assert get_method("realera", "diffusion") is RealEra
