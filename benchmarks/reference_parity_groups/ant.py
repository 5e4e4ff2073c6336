"""ANT (lileyang1210/ANT): the authors' `gradients_to_mask` (Single/train-scripts/generate_mask.py, extracted with
`ast`, its .to('cuda') read as 'cpu') and `closed_form_refinement` (Multiple/src/cfr_utils.py, imported from the
file) vs our saliency masks and LoRA fusion, on tiny inputs and a tiny Stable-Diffusion pipeline."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch
from common import extract

REPO = "lileyang1210+ANT"
FILES = [(REPO, "Single/train-scripts/generate_mask.py", None), (REPO, "Multiple/src/cfr_utils.py", None)]


def masks(refs, results):
    from unlearn.methods.ant import saliency_intersection, top_share

    src = refs.source(REPO, "Single/train-scripts/generate_mask.py").replace("'cuda'", "'cpu'")
    gradients_to_mask = extract(src, ["gradients_to_mask"], namespace={"torch": torch})["gradients_to_mask"]
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (5, 4), "b": (10,), "c": (3, 2, 5), "odd": (7,), "one": (1,)}
    maps = [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(3)]
    # theirs keeps the smallest values: given 1/|g|, its smallest are our largest |g|
    inverted = [gradients_to_mask({k: 1.0 / v.abs() for k, v in m.items()}, threshold=0.5) for m in maps]
    total = sum(v.numel() for v in maps[0].values())
    single = top_share(maps[0], 0.5)
    results.check(
        "ANT mask of one saliency map, top half (gradients_to_mask of 1/|g|)",
        f"mismatches of {total}",
        sum(int((single[k] != inverted[0][k].bool()).sum()) for k in shapes),
        0,
    )
    ours = saliency_intersection(maps, 0.5).masks
    ref = {k: inverted[0][k] * inverted[1][k] * inverted[2][k] for k in shapes}
    results.check(
        "ANT mask intersection of three maps (product of gradients_to_mask)",
        f"mismatches of {total}",
        sum(int((ours[k] != ref[k].bool()).sum()) for k in shapes),
        0,
    )


def fusion(refs, results, folder: Path, scale: float = 4.3, preserve_scale: float = 0.7, lamb: float = 0.2):
    from tiny_diffusion import load_pipeline

    from unlearn.methods.closed_form import cross_attention, fuse_loras

    spec = importlib.util.spec_from_file_location("cfr_utils", refs.path(REPO, "Multiple/src/cfr_utils.py"))
    cfr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfr)
    ours_model, ref_model, original = load_pipeline(folder), load_pipeline(folder), load_pipeline(folder)
    proj, _, _ = cfr.get_ca_layers(ref_model.unet, with_to_k=True)
    names = {id(m): n for n, m in ref_model.unet.named_modules()}
    proj_names = [names[id(p)] for p in proj]
    same_layers = set(proj_names) == set(cross_attention(ours_model))
    d = proj[0].weight.shape[1]
    g = torch.Generator().manual_seed(0)
    prompts = [
        [torch.randn(12, d, generator=g) for _ in range(2)],
        [torch.randn(12, d, generator=g) for _ in range(3)],
    ]
    deltas = [
        {n: 0.1 * torch.randn(p.weight.shape, generator=g) for n, p in zip(proj_names, proj)} for _ in prompts
    ]
    preserved = torch.randn(30, d, generator=g)
    # theirs: values = the LoRA-fused layers' outputs for every state of every prompt (prepare_k_v_for_lora)
    contexts = [list(states) for states in prompts]
    values = [
        [
            [torch.nn.functional.linear(emb, p.weight + scale * delta[n]) for n, p in zip(proj_names, proj)]
            for emb in states
        ]
        for states, delta in zip(prompts, deltas)
    ]
    cache = {}
    for i, p in enumerate(proj):
        cache[f"{i}_for_mat1"] = p.weight.detach() @ preserved.T @ preserved
        cache[f"{i}_for_mat2"] = preserved.T @ preserved
    cfr.closed_form_refinement(
        proj, contexts, values, lamb=lamb, preserve_scale=preserve_scale, cache_dict=cache
    )
    fuse_loras(
        ours_model,
        [(torch.cat(s), delta) for s, delta in zip(prompts, deltas)],
        scale,
        preserved,
        preserve_scale,
        lamb,
    )
    ours_layers, original_layers = cross_attention(ours_model), cross_attention(original)
    worst = 0.0
    for n, p in zip(proj_names, proj):
        a, b, w0 = ours_layers[n].weight.detach(), p.weight.detach(), original_layers[n].weight.detach()
        worst = max(worst, float((a - b).norm() / (b - w0).norm()))
    results.check(
        f"ANT LoRA fusion (closed_form_refinement) over {len(proj)} projections, same layers {same_layers}",
        "max ||ours - ref||_F / ||ref - W0||_F",
        worst if same_layers else float("inf"),
        2e-6,
    )


def run(refs, results):
    from tiny_diffusion import tiny_sd_pipeline

    masks(refs, results)
    with tempfile.TemporaryDirectory() as tmp:
        fusion(refs, results, tiny_sd_pipeline(Path(tmp) / "pipe", vae=False))
