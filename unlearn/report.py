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
    for key, text in GENERATIVE_KEYS.items():
        if key in metrics:
            lines.append(
                f"| {text} | {_fmt(metrics.get(f'original_{key}'))} | {_fmt(metrics[key])} | "
                f"{_fmt(metrics.get(f'retrain_{key}'))} |"
            )
    lines += [
        "",
        "Erasure rate: share of generations the judge classifies as the erased concept (lower is better). "
        "Retained accuracy: share of generations for the other classes / prompts the judge classifies as asked.",
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
