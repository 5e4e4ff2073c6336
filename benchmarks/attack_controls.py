"""The attacks' sanity controls on the digits worlds, with real Retrain models: an "erasure" that only hides the
output fools the plain erasure rate (`fake_shows_concept`: the percent of its plain draws of the concept judged
as it; for the classifier, its accuracy on the class's held-out examples) and is exposed by the attacks (R near
1).

- classifier: the original with class 3's bias pushed down until no example of it is predicted (UA 100 %),
  attacked by `feature_probe`;
- text-to-image: the original swapping the erased prompts ("three", ...) for the anchor's before its text
  encoder, attacked by `concept_inversion`;
- class-conditional DDPM: the original swapping class 3 for the anchor class, attacked by `concept_inversion`;
- GAN: the original throwing away, after generation, the samples its judge calls 8, attacked by
  `latent_search`.

Needs the robustness suites' Retrain runs (seed 0) under runs/bench/<suite>/runs/retrain/seed0 (run the suites,
or their reference runs, first); skips a family whose Retrain run is missing. One seed per control (n=1).

    OMP_NUM_THREADS=1 python benchmarks/attack_controls.py   # writes benchmarks/results/attack_controls.json
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CONTROLS = {
    "classifier": ("digits_classwise_robust", "feature_probe"),
    "t2i": ("digits_t2i_robust", "concept_inversion"),
    "ddpm": ("digits_ddpm_robust", "concept_inversion"),
    "gan": ("digits_gan_robust", "latent_search"),
}


def fake_of(family: str, original, harness, data):
    from test_attack_controls import rejecting_fake, swapping_fake

    if family == "classifier":
        fake = copy.deepcopy(original)
        with torch.no_grad():
            fake.head.bias[data.forget_classes[0]] -= 100.0
        return fake
    if family == "gan":
        return rejecting_fake(original, harness.judge, data.prompts.concept_label)
    return swapping_fake(original, list(data.prompts.forget), data.prompts.anchor[0])


def control(family: str, suite: str, attack_name: str) -> dict | None:
    from unlearn.attacks.run import attack_models
    from unlearn.harness import HARNESSES
    from unlearn.recipe import load_recipe

    reference = ROOT / "runs" / "bench" / suite / "runs" / "retrain" / "seed0"
    if not (reference / "model").exists():
        print(f"{family}: no Retrain run at {reference}; skipped")
        return None
    recipe = load_recipe(reference / "recipe.yaml")
    harness = HARNESSES[recipe.model.family](recipe, "cpu", lambda message: None)
    original, data = harness.setup()
    harness.before(original, data, reference)
    retrain = harness.load_output(reference / "model", data)
    fake = fake_of(family, original, harness, data)
    attacks = recipe.build_attacks([attack_name])
    started = time.perf_counter()
    models = {"original": original, "retrain": retrain, "unlearned": fake}
    metrics, _ = attack_models(attacks, harness, data, models, [0])
    row = {
        "attack": attack_name,
        "seeds": 1,
        "original_success": metrics[f"original_{attack_name}.success"],
        "retrain_success": metrics[f"retrain_{attack_name}.success"],
        "fake_success": metrics[f"{attack_name}.success"],
        "fake_R": metrics[f"{attack_name}.R"],
    }
    row["fake_shows_concept"] = harness.recognized(fake, data, seed=0).rate  # the plain (pre-attack) reading
    row["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{family}: {row}")
    return row


def main() -> None:
    torch.set_num_threads(1)
    results = {family: control(family, *spec) for family, spec in CONTROLS.items()}
    results = {family: row for family, row in results.items() if row is not None}
    out = ROOT / "benchmarks" / "results" / "attack_controls.json"
    out.write_text(json.dumps({"threads": 1, "controls": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
