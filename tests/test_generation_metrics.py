"""Generation metrics against independent NumPy / SciPy / clean-fid computations, all offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from torch import nn

from unlearn.errors import CheckpointError, ConfigError
from unlearn.metrics import generation
from unlearn.metrics.generation import (
    clip_score,
    fid,
    fid_from_features,
    grid_image,
    image_features,
    judge_labels,
    load_judge,
    save_grid,
)
from unlearn.models.classifier import build_classifier


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance written out with scipy.linalg.sqrtm."""
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root))


class _Judge(nn.Module):
    """A tiny classifier with dropout, so eval mode matters."""

    def __init__(self, pixels: int, classes: int = 4):
        super().__init__()
        self.drop = nn.Dropout(0.9)
        self.fc = nn.Linear(pixels, classes)

    def forward(self, x):
        return self.fc(self.drop(x.flatten(1)))


# ---------------------------------------------------------------------------------------------------------
# Judge


def test_judge_labels_batches_in_eval_mode_and_restores_mode():
    torch.manual_seed(0)
    judge = _Judge(1 * 5 * 5).train()
    images = torch.rand(10, 1, 5, 5)
    with torch.no_grad():
        expected = judge.eval()(images).argmax(dim=1)
    judge.train()
    labels = judge_labels(judge, images, batch_size=3)
    assert labels.dtype == torch.long and labels.shape == (10,)
    assert torch.equal(labels, expected)
    assert judge.training  # mode restored
    assert torch.equal(
        judge_labels(lambda x: x.flatten(1)[:, :4], images), images.flatten(1)[:, :4].argmax(1)
    )


def test_load_judge_from_folder_factory_and_callable(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_classifier("digits_cnn", 10).eval()
    model.save(tmp_path / "judge")
    judge = load_judge(tmp_path / "judge")  # number of classes read from the folder
    images = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(judge(images), model(images))
    assert torch.equal(judge_labels(judge, images), model(images).argmax(1))

    (tmp_path / "my_judges.py").write_text(
        "def make():\n    return lambda x: x.flatten(1)[:, :3]\n\ndef broken():\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    factory_judge = load_judge("my_judges:make")
    assert torch.equal(factory_judge(images), images.flatten(1)[:, :3])

    def fn(x):
        return x

    assert load_judge(fn) is fn


@pytest.mark.parametrize(
    "spec, error, words",
    [
        ("no/such/folder", ConfigError, "neither an existing classifier folder"),
        ("no_such_module_xyz:make", ConfigError, "cannot import module"),
        ("math:no_such_function", ConfigError, "no callable"),
        ("math:pi", ConfigError, "no callable"),
        ("my_judges:broken", ConfigError, "not a callable"),
        (3, ConfigError, "must be a folder"),
    ],
)
def test_load_judge_rejects_bad_specs(tmp_path, monkeypatch, spec, error, words):
    (tmp_path / "my_judges.py").write_text("def broken():\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(error, match=words):
        load_judge(spec)


def test_load_judge_rejects_files_and_unknown_folders(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file"):
        load_judge(tmp_path / "weights.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="number of classes"):
        load_judge(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------
# FID


def test_fid_from_features_matches_scipy_and_clean_fid():
    from cleanfid.fid import fid_from_feats

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) * 0.7 + 1.5
    value = fid_from_features(a, b)
    assert value == pytest.approx(_reference_fid(a, b), rel=1e-8)
    assert value == pytest.approx(float(fid_from_feats(a, b)), rel=1e-12)
    assert value > 1.0
    assert abs(fid_from_features(a, a)) < 1e-6


# The untrained judge has dead ReLU units: its feature covariance is singular, as Inception's is with fewer
# than 2048 images; sqrtm warns but the distance is well defined.
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_fid_with_judge_features_and_cached_reference(tmp_path):
    torch.manual_seed(0)
    judge = build_classifier("digits_cnn", 10).eval()
    real, fake = torch.rand(300, 1, 8, 8), torch.rand(200, 1, 8, 8) * 0.5  # more images than the 128 features
    with torch.no_grad():
        feats_real, feats_fake = judge.features(real).double().numpy(), judge.features(fake).double().numpy()
    expected = _reference_fid(feats_real, feats_fake)
    assert np.allclose(image_features(real, judge.features, batch_size=7), feats_real, atol=1e-6)

    cache = tmp_path / "stats" / "real.npz"
    value = fid(real, fake, extractor=judge.features, cache=cache, batch_size=64)
    assert value == pytest.approx(expected, rel=1e-5)
    with np.load(cache) as stats:
        assert np.allclose(stats["mu"], feats_real.mean(0), atol=1e-6)
        assert np.allclose(stats["sigma"], np.cov(feats_real, rowvar=False), atol=1e-6)
    assert sorted(p.name for p in cache.parent.iterdir()) == ["real.npz"]  # no temp files left
    # The cached statistics are used: the real images are not needed any more.
    assert fid(None, fake, extractor=judge.features, cache=cache) == pytest.approx(value, rel=1e-9)
    assert fid(real, real, extractor=judge.features) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="unknown FID extractor"):
        fid(real, fake, extractor="vgg")


def test_fid_inception_refuses_to_download(tmp_path, monkeypatch):
    import cleanfid.features

    def no_build(*args, **kwargs):
        raise AssertionError("clean-fid must not be asked to build (and download) Inception")

    monkeypatch.setattr(generation, "INCEPTION_WEIGHTS", tmp_path / "inception-2015-12-05.pt")
    monkeypatch.setattr(cleanfid.features, "build_feature_extractor", no_build)
    images = torch.rand(4, 3, 8, 8)
    with pytest.raises(ConfigError, match="inception-2015-12-05.pt.*custom feature extractor"):
        fid(images, images, extractor="inception")


@pytest.mark.parametrize("channels", [1, 3])
def test_fid_inception_path_matches_clean_fid_folder_pipeline(tmp_path, monkeypatch, channels):
    """Our in-memory "clean" path against clean-fid's own: PNG files, its reader and its resizer."""
    import cleanfid.features
    from cleanfid.fid import get_folder_features

    seen = []

    def stub_inception(batch: torch.Tensor) -> torch.Tensor:  # stands in for the 2048-d Inception
        seen.append(batch)
        return torch.cat([batch.mean(dim=(2, 3)), batch.std(dim=(2, 3)), batch[:, :, 150, 150]], dim=1)

    def build(mode, device=None, use_dataparallel=True):
        assert mode == "clean"
        return stub_inception

    weights = tmp_path / "inception-2015-12-05.pt"
    weights.write_bytes(b"")
    monkeypatch.setattr(generation, "INCEPTION_WEIGHTS", weights)
    monkeypatch.setattr(cleanfid.features, "build_feature_extractor", build)

    torch.manual_seed(0)
    real, fake = torch.rand(6, channels, 8, 8), torch.rand(5, channels, 8, 8) ** 2
    value = fid(real, fake, extractor="inception", batch_size=4)
    assert all(b.shape[1:] == (3, 299, 299) and b.dtype == torch.float32 for b in seen)
    assert min(float(b.min()) for b in seen) >= 0 and max(float(b.max()) for b in seen) > 1  # [0, 255]

    def folder(images, name):
        path = tmp_path / name
        path.mkdir()
        for i, image in enumerate((images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image[:, :, 0] if channels == 1 else image).save(path / f"{i:02d}.png")
        return get_folder_features(
            str(path), stub_inception, num_workers=0, batch_size=4, device=torch.device("cpu"), verbose=False
        )

    reference = _reference_fid(
        folder(real, "real").astype(np.float64), folder(fake, "fake").astype(np.float64)
    )
    assert value == pytest.approx(reference, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# CLIP score

_VOCAB = [
    "l",
    "o",
    "w",
    "e",
    "r",
    "s",
    "t",
    "i",
    "d",
    "n",
    "lo",
    "l</w>",
    "w</w>",
    "r</w>",
    "t</w>",
    "low</w>",
]
_VOCAB += ["er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(_VOCAB)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<unk>", model_max_length=77
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    layers = {"intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2, "hidden_size": 32}
    config = CLIPConfig(
        text_config={**layers, "vocab_size": len(_VOCAB), "bos_token_id": 21, "eos_token_id": 22},
        vision_config={**layers, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(folder))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return model, tokenizer, image_processor


def _hand_clip_score(model, tokenizer, image_processor, images, prompts) -> float:
    """max(100 * mean cosine, 0) by hand: uint8 rescaled to [0, 1] and normalised with the processor's
    mean/std (its 32x32 resize and crop are identities here), then the two towers and their projections."""
    pixels = (images.expand(-1, 3, -1, -1) * 255).round() / 255
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_emb = model.visual_projection(
            model.vision_model(pixel_values=(pixels - mean) / std).pooler_output
        )
        text_emb = model.text_projection(model.text_model(**tokens).pooler_output)
    a, b = image_emb.double().numpy(), text_emb.double().numpy()
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return max(100.0 * float(cosine.mean()), 0.0)


def test_clip_score_matches_hand_computation(tmp_path):
    model, tokenizer, image_processor = _tiny_clip(tmp_path / "clip")
    torch.manual_seed(1)
    images = torch.rand(4, 1, 32, 32)  # grey: repeated to RGB
    prompts = ["lower newer", "lowest", "wider", "low"]

    expected = _hand_clip_score(model, tokenizer, image_processor, images, prompts)
    assert expected > 0  # the clamp does not hide the comparison
    assert clip_score(images, prompts, tmp_path / "clip", batch_size=3) == pytest.approx(expected, rel=1e-4)

    colour = torch.rand(2, 3, 32, 32)
    expected = _hand_clip_score(model, tokenizer, image_processor, colour, ["lowest", "lowest"])
    assert clip_score(colour, "lowest", tmp_path / "clip") == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Grids


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_pixel_layout(tmp_path, channels):
    torch.manual_seed(0)
    images = torch.rand(5, channels, 2, 3)
    scale, nrow = 2, 3
    grid = np.asarray(grid_image(images, nrow=nrow, scale=scale))
    assert grid.shape[:2] == (2 * (2 * scale) + 1, 3 * (3 * scale) + 2)  # 2 rows x 3 columns, 1-pixel gaps
    grid = grid.reshape(grid.shape[0], grid.shape[1], -1)

    values = (images.numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    cell_h, cell_w = 2 * scale, 3 * scale
    for k in range(6):
        top, left = (k // nrow) * (cell_h + 1), (k % nrow) * (cell_w + 1)
        cell = grid[top : top + cell_h, left : left + cell_w]
        if k < len(images):
            expected = values[k].repeat(scale, axis=0).repeat(scale, axis=1)  # nearest-neighbour upscale
            assert np.array_equal(cell, expected)
        else:
            assert (cell == 255).all()  # the unused cell stays blank
    assert (grid[cell_h] == 255).all()  # the gap row
    assert (grid[:, cell_w] == 255).all() and (grid[:, 2 * cell_w + 1] == 255).all()  # the gap columns

    path = save_grid(images, tmp_path / "grids" / "samples.png", nrow=nrow, scale=scale)
    assert path == tmp_path / "grids" / "samples.png"
    assert sorted(p.name for p in path.parent.iterdir()) == ["samples.png"]
    with Image.open(path) as saved:
        assert saved.mode == ("L" if channels == 1 else "RGB")
        assert np.array_equal(np.asarray(saved).reshape(grid.shape), grid)


def test_generative_metric_names_are_in_the_diffusion_catalogue():
    from unlearn.harness import DiffusionHarness

    names = {"erasure_rate", "erasure_rate_paraphrase", "retain_accuracy", "fid", "clip_score"}
    assert names <= set(DiffusionHarness.metric_names())


def test_fid_cache_names_carry_the_judge_so_another_judge_never_reads_them():
    """A GAN or diffusion run with another judge on the digits data once read 10-d statistics cached by a toy
    judge ("feature sizes differ"); the cache's name now carries the judge's weights."""
    from unlearn.metrics.generation import extractor_fingerprint

    torch.manual_seed(0)
    one, other = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    assert extractor_fingerprint(one) == extractor_fingerprint(one)
    assert extractor_fingerprint(one) != extractor_fingerprint(other)
    assert extractor_fingerprint(one.forward) == extractor_fingerprint(one)  # a bound method: its module
    other.load_state_dict(one.state_dict())
    assert extractor_fingerprint(one) == extractor_fingerprint(other)
