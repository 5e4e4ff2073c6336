"""report.md of a run folder, and the bench tables."""

from __future__ import annotations

import math
from pathlib import Path

from .checkpoints import write_text

MAIN_KEYS = ("UA", "RA", "TA", "MIA")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def write_report(output: Path, recipe, data, metrics: dict) -> None:
    lines = [
        f"# {recipe.method} on {recipe.data.dataset}",
        "",
        f"- task: {data.describe()}",
        f"- model: {recipe.model.arch} from `{recipe.model.checkpoint}`",
        f"- run time (RTE): {metrics['RTE_s']:.1f} s on {metrics.get('device', '?')}"
        f" ({metrics.get('num_processes', 1)} process(es))",
        "",
        "| metric | original | unlearned | Retrain | gap |",
        "|---|---|---|---|---|",
    ]
    for key in (*MAIN_KEYS, "forget_test_acc"):
        if key in metrics:
            lines.append(
                f"| {key} | {_fmt(metrics.get(f'original_{key}'))} | {_fmt(metrics[key])} | "
                f"{_fmt(metrics.get(f'retrain_{key}'))} | {_fmt(metrics.get(f'gap_{key}'))} |"
            )
    if "avg_gap" in metrics:
        lines += ["", f"Average gap to Retrain over UA, RA, TA, MIA: **{metrics['avg_gap']:.2f}**"]
    per_class = sorted(
        (int(k.rsplit("_", 1)[1]), v) for k, v in metrics.items() if k.startswith("acc_class_")
    )
    if per_class:
        forgotten = set(data.forget_classes)
        lines += [
            "",
            "Test accuracy per class (forgotten classes marked *):",
            "",
            "| class | " + " | ".join(f"{c}{'*' if c in forgotten else ''}" for c, _ in per_class) + " |",
            "|---|" + "---|" * len(per_class),
            "| original | "
            + " | ".join(_fmt(metrics.get(f"original_acc_class_{c}")) for c, _ in per_class)
            + " |",
            "| unlearned | " + " | ".join(_fmt(v) for _, v in per_class) + " |",
        ]
    lines += [
        "",
        "Metrics: UA = 100 - forget accuracy; RA = retain accuracy; TA = test accuracy without the "
        "forgotten classes; MIA = MIA-efficacy (share of forget examples the SVC attack calls non-member).",
        "Files: `model/` (the unlearned model), `recipe.yaml` (resolved), `metrics.json`, `train.jsonl`, "
        "`run.log`.",
        "",
    ]
    write_text("\n".join(lines), output / "report.md")


GENERATIVE_KEYS = {
    "erasure_rate": "erasure rate, exact prompts (%)",
    "erasure_rate_paraphrase": "erasure rate, paraphrases (%)",
    "retain_accuracy": "retained accuracy (%)",
    "neighbor_accuracy": "retained accuracy, neighbours of the erased concept (%)",
    "unrelated_accuracy": "retained accuracy, other kept concepts (%)",
    "fid": "FID, retained classes",
    "clip_score": "CLIP score, retained prompts",
    "clip_score_forget": "CLIP score, forget prompts",
}


def write_generation_report(output: Path, recipe, data, metrics: dict, grids: dict) -> None:
    """report.md of a diffusion run: the scores before / after / Retrain and the sample grids (same seeds)."""
    prompts = data.prompts
    lines = [
        f"# {recipe.method}: erase {prompts.concept!r} from `{recipe.model.checkpoint}`",
        "",
        f"- task: {data.describe()}",
        f"- forget conditions: {', '.join(map(repr, prompts.forget[:6]))}{' ...' if len(prompts.forget) > 6 else ''}",
        f"- anchor: {', '.join(map(repr, dict.fromkeys(prompts.anchor)))}",
        f"- paraphrases (never seen by the method): {', '.join(map(repr, prompts.paraphrases)) or '–'}",
        f"- sampling: {recipe.eval.samples} images per set, {recipe.eval.steps} DDIM steps, guidance "
        f"{recipe.eval.guidance}",
        f"- run time (RTE): {metrics['RTE_s']:.1f} s on {metrics.get('device', '?')}",
        "",
        "| metric | original | unlearned | Retrain |",
        "|---|---|---|---|",
    ]
    per_concept = {  # several concepts erased together: each one's erasure rates
        key: f"{GENERATIVE_KEYS[key.split(':')[0]]}: {key.split(':')[1]}"
        for key in metrics
        if ":" in key and key.split(":")[0] in GENERATIVE_KEYS
    }
    for key, text in {**GENERATIVE_KEYS, **per_concept}.items():
        if key in metrics:
            lines.append(
                f"| {text} | {_fmt(metrics.get(f'original_{key}'))} | {_fmt(metrics[key])} | "
                f"{_fmt(metrics.get(f'retrain_{key}'))} |"
            )
    lines += [
        "",
        "Erasure rate: share of generations the judge classifies as the erased concept (lower is better). "
        "Retained accuracy: share of generations for the other classes / prompts the judge classifies as asked; "
        "neighbours are the classes next to an erased one (over-erasure shows there first).",
    ]
    for name, files in grids.items():
        lines += ["", f"## Samples: {name} conditions (same seeds before and after)", ""]
        if "original" in files:
            lines += ["Original:", "", f"![original {name}]({files['original']})", ""]
        lines += ["Unlearned:", "", f"![unlearned {name}]({files['unlearned']})"]
    lines += [
        "",
        "Files: `model/` (a diffusers pipeline folder), `edit.safetensors` (the changed UNet tensors only), "
        "`recipe.yaml`, `metrics.json`, `train.jsonl`, `run.log`.",
        "",
    ]
    write_text("\n".join(lines), output / "report.md")


GAN_KEYS = {
    "erasure_rate": "erasure rate: samples judged as the erased class (%)",
    "erasure_reduction": "reduction of that share vs the original (%)",
    "confident": "samples judged with confidence >= 0.9 (%)",
    "fid": "FID of retained-class samples vs real retained images",
    "fid_original": "FID of retained-class samples vs the original generator's",
}


def write_gan_report(output: Path, recipe, data, metrics: dict, grids: dict) -> None:
    """report.md of a GAN run: scores before / after, the per-class histogram of the judge and the sample
    grids (same latents before and after)."""
    label = data.prompts.concept_label
    method = getattr(recipe, "method_args", {})
    lines = [
        f"# {recipe.method}: erase class {label} from `{recipe.model.checkpoint}`",
        "",
        f"- repulsion: {method.get('repulsion', 'default')}"
        + (f", gamma {method['gamma']}" if "gamma" in method else ""),
        f"- evaluation: {recipe.eval.samples} samples (seed {recipe.seed}) judged by "
        f"{recipe.eval.judge or 'the digits classifier'}",
        f"- run time (RTE): {metrics['RTE_s']:.1f} s on {metrics.get('device', '?')}",
        "",
        "| metric | original | unlearned |",
        "|---|---|---|",
    ]
    for key, text in GAN_KEYS.items():
        if key in metrics:
            lines.append(f"| {text} | {_fmt(metrics.get(f'original_{key}'))} | {_fmt(metrics[key])} |")
    shares = sorted(int(k.rsplit("_", 1)[1]) for k in metrics if k.startswith("class_share_"))
    if shares:
        lines += [
            "",
            "Share of samples per judged class (percent; the erased class marked *):",
            "",
            "| class | " + " | ".join(f"{c}{'*' if c == label else ''}" for c in shares) + " |",
            "|---|" + "---|" * len(shares),
            "| original | "
            + " | ".join(_fmt(metrics.get(f"original_class_share_{c}")) for c in shares)
            + " |",
            "| unlearned | " + " | ".join(_fmt(metrics.get(f"class_share_{c}")) for c in shares) + " |",
        ]
    lines += ["", "## Samples (same latents before and after)", ""]
    if "original" in grids:
        lines += ["Original:", "", f"![original]({grids['original']})", ""]
    lines += ["Unlearned:", "", f"![unlearned]({grids['unlearned']})"]
    lines += [
        "",
        "Files: `model/` (the unlearned GAN: gan_config.json, generator / discriminator safetensors), "
        "`adapted_generator_<k>.safetensors` (stage 1's adapted weights, reusable with method.adapted_path), "
        "`recipe.yaml`, `metrics.json`, `train.jsonl`, `run.log`.",
        "",
    ]
    write_text("\n".join(lines), output / "report.md")
