"""The original model's scores are cached (`unlearn.evalcache`): a warm entry gives exactly what scoring gives,
a corrupt or foreign one is scored again, and a bench generates the original's samples once per seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_diffusion import TINY_T2I, TINY_TEXT

from unlearn import evalcache

ROOT = Path(__file__).resolve().parent.parent
T2I = ROOT / "recipes" / "diffusion" / "digits_t2i"
METHODS = ["salun", "esd", "uce", "ant", "realera", "doco", "grad_ascent"]
# (method) -> the fields that make it run about two optimizer steps on the tiny model (as tests/test_method_matrix)
TINY_METHODS = {
    "retrain": ["method.steps=2", "method.batch_size=2", "method.warmup_steps=1"],
    "grad_ascent": ["method.steps=2", "method.batch_size=2"],
    "salun": ["method.steps=2", "method.batch_size=2"],
    "esd": ["method.steps=2", "method.ddim_steps=4"],
    "doco": [
        "method.steps=3",
        "method.warm_up=1",
        "method.batch_size=2",
        "method.num_anchor_images=2",
        "method.anchor_steps=2",
    ],
    "ant": ["method.steps=2", "method.split_step=2", "method.ddim_steps=4", "method.mask_seeds=[0]"],
    "uce": [],
    "realera": [
        "method.num_neighbors=2",
        "method.num_beyond=2",
        "method.lora_steps=2",
        "method.lora_batch_size=2",
    ],
}
TINY_EVAL = ["eval.samples=2", "eval.steps=2", "eval.reference=null"]


@pytest.fixture(scope="module")
def tiny_t2i(tmp_path_factory):
    """The digits world's text-to-image model built from tiny configs (untrained: scoring only has to run)."""
    from unlearn.worlds import digits_diffusion

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(digits_diffusion, "T2I_UNET_CONFIG", TINY_T2I)
        patch.setattr(digits_diffusion, "TEXT_ENCODER_CONFIG", TINY_TEXT)
        model = digits_diffusion.build_t2i(0)
    model.text_encoder.requires_grad_(False)
    folder = tmp_path_factory.mktemp("tiny-t2i") / "t2i"
    model.save(folder)
    return folder


@pytest.fixture
def scores_cache(tmp_path, monkeypatch):
    """An empty cache of original scores for this test alone."""
    folder = tmp_path / "scores"
    monkeypatch.setattr(evalcache, "cache_folder", lambda: folder)
    return folder


def _entry(tmp_path) -> tuple[Path, str, dict, dict]:
    material = {"weights": "abc", "seed": 0}
    key = evalcache.entry_key(material)
    path = tmp_path / f"diffusion-{key[:32]}.safetensors"
    images = {"forget": torch.rand(3, 1, 8, 8), "retain": torch.rand(2, 1, 8, 8)}
    evalcache.write_entry(path, key, material, {"erasure_rate": 50.0, "fid": float("nan")}, images)
    return path, key, material, images


def test_an_entry_reads_back_exactly_and_a_damaged_or_foreign_one_is_refused(tmp_path):
    from unlearn.metrics.generation import grid_image

    path, key, material, written = _entry(tmp_path)
    metrics, images = evalcache.read_entry(path, key, material)
    assert metrics["erasure_rate"] == 50.0 and metrics["fid"] != metrics["fid"]  # NaN survives
    assert images.keys() == {"forget", "retain"} and images["forget"].shape == (3, 1, 8, 8)
    for name, image in images.items():  # kept as the grids' 8-bit pixels: the same grid
        assert (image - written[name]).abs().max() <= 0.5 / 255 + 1e-6
        assert grid_image(image, 2).tobytes() == grid_image(written[name], 2).tobytes()
    assert evalcache.read_entry(path, evalcache.entry_key({"seed": 1}), {"seed": 1}) == (
        "written for other scores (key mismatch)"
    )
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit of an image: safetensors still parses it
    path.write_bytes(bytes(data))
    assert evalcache.read_entry(path, key, material) == "its digest does not match its contents"
    path.write_bytes(bytes(data[:40]))
    assert "not a readable safetensors file" in evalcache.read_entry(path, key, material)
    path.write_bytes(b"\x80\x04pickled")
    assert "not a readable safetensors file" in evalcache.read_entry(path, key, material)


def _run(recipe_path, overrides, output, lines):
    from unlearn.pipeline import run
    from unlearn.recipe import load_recipe

    return run(load_recipe(recipe_path, overrides), output, log=lines.append)


def test_a_second_run_reads_the_original_scores_and_they_equal_scoring_afresh(
    tiny_t2i, digits_world, scores_cache, tmp_path, one_thread
):
    """UCE twice on the same model, task and seed: the second run's log says the original's scores were cached,
    its original_* metrics and "original" sample grids are those of the first; a corrupt entry is scored again
    (same numbers) and replaced; `eval.cache: false` scores afresh and gives the same numbers."""
    base = [f"model.checkpoint={tiny_t2i}", *TINY_EVAL]
    first, second, third, off = [], [], [], []
    cold = _run(T2I / "uce.yaml", base, tmp_path / "cold", first)
    assert any(line.startswith("original scores: stored in the cache (") for line in first)
    [entry] = list(scores_cache.iterdir())
    warm = _run(T2I / "esd.yaml", [*base, *TINY_METHODS["esd"]], tmp_path / "warm", second)
    assert f"original scores: cached ({entry.name.split('-')[1][:12]})" in second
    original = {k: v for k, v in cold.items() if k.startswith("original_")}
    assert original and original == {k: v for k, v in warm.items() if k.startswith("original_")}
    assert list(original) == [k for k in warm if k.startswith("original_")]  # metrics.json's order too
    for name in ("forget", "paraphrase", "retain"):
        grid = f"samples_{name}_original.png"
        assert (tmp_path / "cold" / grid).read_bytes() == (tmp_path / "warm" / grid).read_bytes()

    entry.write_bytes(entry.read_bytes()[:-8])
    again = _run(T2I / "uce.yaml", [*base, "seed=0"], tmp_path / "again", third)
    assert any("original scores: ignoring cache entry" in line for line in third)
    assert {k: v for k, v in again.items() if k.startswith("original_")} == original
    assert isinstance(evalcache.read_entry(entry, *_material_of(entry)), tuple)  # rewritten whole

    fresh = _run(T2I / "uce.yaml", [*base, "eval.cache=false"], tmp_path / "off", off)
    assert not any(line.startswith("original scores:") for line in off)
    assert {k: v for k, v in fresh.items() if k.startswith("original_")} == original


def _material_of(entry: Path) -> tuple[str, dict]:
    from safetensors import safe_open

    with safe_open(str(entry), framework="pt") as handle:
        meta = handle.metadata()
    return meta["key"], json.loads(meta["material"])


def test_another_seed_or_sample_count_is_another_entry(tiny_t2i, digits_world, scores_cache, one_thread):
    """The key changes with what the original's scores depend on, and not with the method."""
    from unlearn.harness import DiffusionHarness
    from unlearn.recipe import load_recipe

    def key(recipe_path, *overrides):
        recipe = load_recipe(recipe_path, [f"model.checkpoint={tiny_t2i}", *TINY_EVAL, *overrides])
        harness = DiffusionHarness(recipe, "cpu", log=lambda message: None)
        model, data = harness.setup()
        harness.before(model, data, None)
        return evalcache.entry_key(harness.cache_material(model, data))

    base = key(T2I / "uce.yaml")
    assert key(T2I / "esd.yaml") == base == key(T2I / "uce.yaml", "eval.attack_seeds=5")
    assert len({base, key(T2I / "uce.yaml", "seed=1"), key(T2I / "uce.yaml", "eval.samples=3")}) == 3
    assert key(T2I / "uce.yaml", "eval.guidance=2.0") != base


def test_generation_is_batched_up_to_eval_batch_size(tiny_t2i, digits_world, monkeypatch, one_thread):
    """Scoring runs the UNet on whole batches of `eval.batch_size` images (both guidance halves in one call),
    not on one prompt at a time."""
    from unlearn.harness import DiffusionHarness
    from unlearn.recipe import load_recipe

    recipe = load_recipe(T2I / "uce.yaml", [f"model.checkpoint={tiny_t2i}", *TINY_EVAL, "eval.batch_size=8"])
    harness = DiffusionHarness(recipe, "cpu", log=lambda message: None)
    model, data = harness.setup()
    harness.before(model, data, None)
    seen = []
    forward = model.unet.forward
    monkeypatch.setattr(model.unet, "forward", lambda x, *a, **k: seen.append(len(x)) or forward(x, *a, **k))
    harness.score(model, data)
    # 2 forget + 2 paraphrase + 2 x 9 retained digits, 2 DDIM steps, guidance doubles the UNet batch
    assert seen == [4, 4, 4, 4] + [16, 16, 16, 16, 4, 4]


def test_a_seven_method_bench_generates_the_original_once_per_seed(
    tiny_t2i, digits_world, scores_cache, tmp_path, monkeypatch, one_thread
):
    """The digits text-to-image suite's seven methods and Retrain over two seeds (tiny model and settings,
    about 17 s on 2 cores): the original model is scored (its samples generated) once per seed; every other run
    reads its scores from the cache, and all of them record the same original_* metrics."""
    import yaml

    from unlearn.bench import bench
    from unlearn.harness import DiffusionHarness

    scored = []
    score = DiffusionHarness.score

    def counting(self, model, data, original=False):
        if original:
            scored.append(self.recipe.seed)
        return score(self, model, data, original=original)

    monkeypatch.setattr(DiffusionHarness, "score", counting)
    suite = {
        "name": "tiny_t2i",
        "recipes": str(T2I),
        "reference": "retrain",
        "methods": METHODS,
        "seeds": [0, 1],
        "overrides": [f"model.checkpoint={tiny_t2i}", "eval.samples=2", "eval.steps=2"],
        "method_overrides": TINY_METHODS,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    lines: list[str] = []
    results = bench(path, tmp_path / "bench", log=lines.append)
    assert sorted(scored) == [0, 1]  # once per seed, not once per method
    assert sum(line.startswith("original scores: cached (") for line in lines) == 2 * len(METHODS)
    for seed in (0, 1):
        assert len([r for r in results["rows"] if r["seed"] == seed and r["method"] in METHODS]) == len(
            METHODS
        )
        originals = []
        for method in ["retrain", *METHODS]:
            metrics = json.loads(
                (tmp_path / "bench" / "runs" / method / f"seed{seed}" / "metrics.json").read_text()
            )
            originals.append({k: v for k, v in metrics.items() if k.startswith("original_")})
        assert originals[0] and all(o == originals[0] for o in originals)


def test_a_damaged_fid_cache_is_computed_again_and_replaced(tmp_path):
    """The real images' FID statistics are cached; an unreadable cache file is not trusted: with the real
    images at hand they are computed again (same FID) and the file replaced, without them it is refused."""
    from unlearn.errors import CheckpointError
    from unlearn.metrics.generation import fid

    torch.manual_seed(0)
    real, fake = torch.rand(40, 1, 8, 8), torch.rand(30, 1, 8, 8)
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    cache = tmp_path / "fid" / "real.npz"
    expected = fid(real, fake, extractor, cache=cache)
    assert fid(None, fake, extractor, cache=cache) == expected  # read back
    cache.write_bytes(b"not an npz")
    with pytest.raises(CheckpointError, match="not an .npz file"):
        fid(None, fake, extractor, cache=cache)
    assert fid(real, fake, extractor, cache=cache) == expected
    assert fid(None, fake, extractor, cache=cache) == expected  # the file was replaced


def test_a_plain_function_judge_is_never_cached(tiny_t2i, digits_world, scores_cache, one_thread):
    """A judge that is a plain function (`eval.judge: module:function` returning one) has no weights to put in
    the key, so the original is scored afresh every time and nothing is stored."""
    from unlearn.harness import DiffusionHarness
    from unlearn.recipe import load_recipe

    lines: list[str] = []
    overrides = [f"model.checkpoint={tiny_t2i}", *TINY_EVAL, "eval.samples=1", "eval.metrics=[erasure_rate]"]
    harness = DiffusionHarness(load_recipe(T2I / "uce.yaml", overrides), "cpu", log=lines.append)
    model, data = harness.setup()
    harness.before(model, data, None)
    module = harness.judge
    harness.judge = lambda images: module(images)
    assert harness.score_original(model, data).metrics["erasure_rate"] >= 0
    assert lines == ["original scores: not cached (the judge is a plain function, which no key can capture)"]
    assert not scores_cache.exists()
