"""The digits diffusion world: captions, tokenizer, captioned data, the training loop, pipeline folders.

Fast tests only (seconds, tiny UNets); building the real world is the one `slow` test at the end.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_diffusion import TINY_DDPM, TINY_T2I, TINY_TEXT

from unlearn.datasets import CaptionedDataset, load_dataset
from unlearn.errors import ConfigError, DataError
from unlearn.worlds import digits_text
from unlearn.worlds.digits_text import CAPTIONS, NUMBER_WORDS, WORDS, concept_prompts, load_digits_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tokenizer_ships_and_reads_every_caption_word_as_one_token(tmp_path):
    folder = digits_text.TOKENIZER_DIR
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    # The shipped files are exactly what the generator writes from the word list.
    digits_text.write_tokenizer_files(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_text() == (folder / name).read_text()
    tokenizer = load_digits_tokenizer()
    assert tokenizer.model_max_length == digits_text.MODEL_MAX_LENGTH
    for word in WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"], word
    for captions in CAPTIONS.values():
        for caption in captions:
            ids = tokenizer(caption).input_ids
            assert len(ids) == len(caption.split()) + 2
            assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
            assert tokenizer.unk_token_id not in ids
    # Unknown words fall back to characters, not to <unk>.
    assert tokenizer.unk_token_id not in tokenizer("a blurry xylophone").input_ids


def test_captions_and_concept_prompts():
    assert set(CAPTIONS) == set(range(10))
    assert all(len(set(c)) == len(c) == 9 for c in CAPTIONS.values())
    label, exact, paraphrases = concept_prompts("three")
    assert label == 3
    assert all("three" in p.split() for p in exact) and "a handwritten digit three" in exact
    assert all("3" in p.split() for p in paraphrases) and "the number 3" in paraphrases
    assert sorted(exact + paraphrases) == sorted(CAPTIONS[3])
    label, exact_n, paraphrases_n = concept_prompts("3")
    assert label == 3 and exact_n == paraphrases and paraphrases_n == exact
    assert concept_prompts("Seven")[0] == 7
    for word in NUMBER_WORDS:
        assert concept_prompts(word)[0] == NUMBER_WORDS.index(word)
    with pytest.raises(ConfigError, match="accepted concepts: zero, one"):
        concept_prompts("eleven")
    with pytest.raises(ConfigError):
        concept_prompts("12")


def test_captioned_dataset_is_deterministic():
    images = load_dataset("digits", "train").subset(range(100))
    a, b = CaptionedDataset(images, CAPTIONS, seed=0), CaptionedDataset(images, CAPTIONS, seed=0)
    other = CaptionedDataset(images, CAPTIONS, seed=1)
    assert len(a) == 100 and torch.equal(a.labels, images.labels)
    assert [a[i][1] for i in range(100)] == [b[i][1] for i in range(100)]
    assert [a[i][1] for i in range(100)] != [other[i][1] for i in range(100)]
    for i in range(100):
        image, caption = a[i]
        assert torch.equal(image, images[i][0]) and caption in CAPTIONS[int(images.labels[i])]
    assert len({a[i][1] for i in range(100)}) > 20  # the captions of a class are all used
    with pytest.raises(DataError, match="no captions"):
        CaptionedDataset(images, {0: ["zero"]})


@pytest.fixture
def tiny(monkeypatch):
    """The world's builders with tiny configs (same code paths, milliseconds per step)."""
    from unlearn.worlds import digits_diffusion

    monkeypatch.setattr(digits_diffusion, "DDPM_UNET_CONFIG", TINY_DDPM)
    monkeypatch.setattr(digits_diffusion, "T2I_UNET_CONFIG", TINY_T2I)
    monkeypatch.setattr(digits_diffusion, "TEXT_ENCODER_CONFIG", TINY_TEXT)
    return digits_diffusion


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["ddpm", "t2i"])
def test_train_diffusion_learns_and_is_deterministic(tiny, kind):
    data = load_dataset("digits", "train").subset(range(256))
    if kind == "t2i":
        data = CaptionedDataset(data, CAPTIONS, seed=0)
    build = tiny.build_ddpm if kind == "ddpm" else tiny.build_t2i
    runs = []
    for _ in range(2):
        model = build(0)
        rng_before = torch.get_rng_state()
        losses = tiny.train_diffusion(
            model, data, steps=40, batch_size=32, lr=3e-3, seed=0, log=None, warmup_steps=5
        )
        runs.append((losses, _weights(model)))
    (losses, weights), (losses2, weights2) = runs
    assert losses == losses2
    assert weights.keys() == weights2.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    if kind == "t2i":  # the text encoder trains jointly with the UNet
        fresh = build(0)
        assert not torch.equal(
            fresh.text_encoder.get_input_embeddings().weight, model.text_encoder.get_input_embeddings().weight
        )
    other = build(0)
    tiny.train_diffusion(other, data, steps=40, batch_size=32, lr=3e-3, seed=1, log=None, warmup_steps=5)
    assert not torch.equal(next(other.unet.parameters()), next(model.unet.parameters()))


@pytest.mark.parametrize("kind", ["ddpm", "t2i"])
def test_world_models_save_as_diffusers_pipelines(tiny, kind, tmp_path):
    from diffusers import DDPMPipeline, DiffusionPipeline, StableDiffusionPipeline

    from unlearn.models.diffusion import load_diffusion

    model = tiny.build_ddpm(0) if kind == "ddpm" else tiny.build_t2i(0)
    model.eval()
    model.save(tmp_path / kind)
    if kind == "ddpm":
        pipeline = DiffusionPipeline.from_pretrained(tmp_path / kind)
        assert isinstance(pipeline, DDPMPipeline) and pipeline.unet.config.num_class_embeds == 11
        conditions = torch.tensor([3, 7])
    else:
        # StableDiffusionPipeline lists its VAE as required: a pixel-space folder (vae null in
        # model_index.json) loads when the VAE is passed as None, as `load_diffusion` does.
        assert json.loads((tmp_path / kind / "model_index.json").read_text())["vae"] == [None, None]
        pipeline = DiffusionPipeline.from_pretrained(tmp_path / kind, vae=None)
        assert isinstance(pipeline, StableDiffusionPipeline) and pipeline.vae is None
        assert pipeline.tokenizer("the number 3").input_ids == model.tokenizer("the number 3").input_ids
        conditions = ["three", "the number 3"]
    loaded = load_diffusion(tmp_path / kind)
    assert loaded.conditioning == model.conditioning
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    images = loaded.generate(conditions, steps=3, guidance=2.0, seed=0)
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, model.generate(conditions, steps=3, guidance=2.0, seed=0))


def test_prepare_refuses_unknown_families_and_classes(tiny, tmp_path):
    from unlearn.worlds import prepare, resolve

    with pytest.raises(ConfigError, match="ddpm, t2i"):
        prepare("digits", families=("vae",))
    with pytest.raises(ConfigError, match="has no 'vae' model"):
        resolve("world:digits/vae")
    with pytest.raises(DataError, match="not digits classes"):
        tiny.prepare_ddpm(tmp_path / "x", exclude_classes=(12,))


@pytest.mark.slow
def test_digits_diffusion_world_builds_and_is_recognized(tmp_path):
    """The real build (about 15 minutes on 2 CPU cores): both models' guided samples are recognized as the
    asked digit by the digits classifier at least 80 % of the time."""
    from unlearn.worlds.digits_diffusion import MIN_JUDGE_ACCURACY, prepare_ddpm, prepare_t2i

    for prepare in (prepare_ddpm, prepare_t2i):
        info = prepare(tmp_path / prepare.__name__)
        assert info["judge_accuracy"] >= MIN_JUDGE_ACCURACY, info
