"""What a user watches: the bench table and chart, `unlearn eval`'s table, progress bars, tracker logs, and the
learning-rate schedules and augmentation the training loop uses."""

from __future__ import annotations

import math

import pytest
import torch

from unlearn.bench import _summarize, bench_chart, results_table

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(method: str, seeds: list[int], **values) -> list[dict]:
    """Bench rows of one method: `values[key]` lists one value per seed."""
    return [
        {"method": method, "seed": s, **{k: v[i] for k, v in values.items()}} for i, s in enumerate(seeds)
    ]


def _classifier_results(seeds: list[int]) -> dict:
    n = len(seeds)
    methods = {
        "original": dict(UA=[0.0] * n, RA=[100.0] * n, TA=[98.8] * n, MIA=[0.0] * n, avg_gap=[50.0] * n),
        "retrain": dict(UA=[100.0] * n, RA=[100.0] * n, TA=[99.0] * n, MIA=[100.0] * n, avg_gap=[0.0] * n),
        "salun": dict(
            UA=[99.0, 100.0][:n], RA=[100.0] * n, TA=[99.1] * n, MIA=[100.0] * n, avg_gap=[0.3, 0.1][:n]
        ),
        "grad_ascent": dict(
            UA=[40.0, 70.0][:n], RA=[97.0] * n, TA=[93.0] * n, MIA=[50.0] * n, avg_gap=[25.0, 9.0][:n]
        ),
    }
    times = {
        "original": [0.0] * n,
        "retrain": [7.5, 8.1][:n],
        "salun": [3.1, 2.9][:n],
        "grad_ascent": [0.2, 0.3][:n],
    }
    summary = {m: _summarize(_rows(m, seeds, RTE_s=times[m], **values)) for m, values in methods.items()}
    return {
        "suite": "digits_classwise",
        "family": "classifier",
        "seeds": seeds,
        "reference": "retrain",
        "overrides": ["data.forget_class=[3]", "method.epochs=1"],
        "method_overrides": {"salun": ["method.lr=0.003"]},
        "summary": summary,
    }


# -- the bench table ---------------------------------------------------------------------------------------------


def test_one_seed_shows_n_1_and_no_pretended_spread():
    results = _classifier_results([0])
    assert results["summary"]["salun"]["UA"] == {"mean": 99.0, "std": None, "n": 1}
    table = results_table(results)
    assert table.startswith("## digits_classwise (1 seed, n=1)")
    assert "| salun | 99.00 | 100.00 |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert not any("±" in line for line in rows)  # no "± 0.00" that reads as a measured spread
    assert "n=1: one seed" in table


def test_several_seeds_show_mean_std_and_n():
    results = _classifier_results([0, 1])
    ua = results["summary"]["grad_ascent"]["UA"]
    assert ua["n"] == 2 and ua["mean"] == 55.0 and ua["std"] == pytest.approx(math.sqrt(450.0))  # ddof=1
    table = results_table(results)
    assert table.startswith("## digits_classwise (2 seeds, n=2)")
    assert "| grad_ascent | 55.00 ± 21.21 |" in table
    assert "| original |" in table and "n=1" not in table
    original = next(line for line in table.splitlines() if line.startswith("| original |"))
    assert original.endswith("| – | – |")  # the original took no unlearning time: no RTE, no ratio


def test_results_written_before_n_was_recorded_still_read():
    """benchmarks/results/*.json of earlier versions: std 0.0 and no n; one seed must still show no spread."""
    results = _classifier_results([0])
    for stats in results["summary"].values():
        for stat in stats.values():
            stat.pop("n")
            stat["std"] = 0.0
    assert "±" not in results_table(results).split("\n\n")[1]
    results = _classifier_results([0, 1])
    for stats in results["summary"].values():
        for stat in stats.values():
            stat.pop("n")
    assert "55.00 ± 21.21" in results_table(results)


def test_the_table_names_the_overrides_the_suite_applied():
    table = results_table(_classifier_results([0, 1]))
    assert "Overrides the suite applied to the recipes:" in table
    assert "- every method: `data.forget_class=[3]`, `method.epochs=1`" in table
    assert "- salun: `method.lr=0.003`" in table


def test_columns_no_run_measured_are_left_out():
    header = results_table(_classifier_results([0, 1])).splitlines()[2]
    assert "CKA" not in header and "probe" not in header
    assert header.startswith("| method | UA | RA | TA | MIA | Avg. Gap | RTE (s) |")


# -- the bench chart ---------------------------------------------------------------------------------------------


def test_bench_chart_is_a_png_linked_from_the_table(tmp_path):
    results = _classifier_results([0, 1])
    path = bench_chart(results, tmp_path / "bench.png")
    assert path == tmp_path / "bench.png" and path.read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]  # written atomically: no temporary left
    table = results_table(results, chart=path.name)
    assert "![each method's Avg. Gap against its run time](bench.png)" in table


def test_generative_bench_chart_plots_erasure_and_what_is_kept(tmp_path):
    def stats(**values):
        return {k: {"mean": v, "std": 1.0, "n": 2} for k, v in values.items()}

    results = {
        "suite": "digits_t2i_concept",
        "family": "diffusion",
        "seeds": [0, 1],
        "reference": "retrain",
        "summary": {
            "original": stats(erasure_rate=100.0, retain_accuracy=100.0, RTE_s=0.0),
            "retrain": stats(erasure_rate=8.0, retain_accuracy=100.0, RTE_s=420.0),
            "uce": stats(erasure_rate=0.0, retain_accuracy=99.0, RTE_s=0.03),
        },
    }
    assert bench_chart(results, tmp_path / "bench.png").read_bytes()[:8] == PNG
    assert "erasure (exact) and retained acc. against its run time" in results_table(
        results, chart="bench.png"
    )


# -- unlearn eval's table ----------------------------------------------------------------------------------------


def test_eval_table_sets_the_model_beside_the_original_and_retrain():
    from unlearn.cli import _eval_table

    metrics = {
        "erasure_rate": 0.0,
        "erasure_rate:three": 0.5,
        "fid": 15.71,
        "RTE_s": 134.3,
        "original_erasure_rate": 100.0,
        "original_erasure_rate:three": 100.0,
        "original_fid": 16.19,
        "retrain_erasure_rate": 0.5,
        "retrain_fid": 13.62,
    }
    recorded = {**metrics, "fid": 17.0}
    lines = _eval_table(metrics, recorded, "diffusion").splitlines()
    assert lines[0].split() == ["metric", "model", "original", "Retrain", "in", "the", "run"]
    assert set(lines[1]) == {"-", " "}
    rows = {line.split()[0]: line for line in lines[2:]}
    assert rows["erasure_rate"].split()[-4:] == ["0.00", "100.00", "0.50", "0.00"]
    assert "erasure (exact) (%)" in rows["erasure_rate"]
    assert "erasure (exact): three (%)" in rows["erasure_rate:three"]
    assert rows["fid"].endswith("17.00 *") and not rows["erasure_rate"].endswith("*")
    assert rows["RTE_s"].split()[-3:] == ["–", "–", "134.30"]
    assert "original_fid" not in rows  # shown in the original column, not as a row of its own
    assert lines[-1].startswith("* differs now from the run's metrics.json")
    plain = _eval_table({"UA": 0.001234, "RA": math.nan}, None, "classifier").splitlines()
    assert (
        plain[0].split() == ["metric", "model"] and plain[2].endswith("0.00123") and plain[3].endswith("nan")
    )


# -- progress bars -----------------------------------------------------------------------------------------------


def test_progress_bars_only_on_a_terminal_and_the_first_process(monkeypatch):
    from unlearn import progress as bars

    monkeypatch.setattr(bars.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert bars.show_progress()
    bar = bars.progress(range(3), "judging")
    assert not bar.disable and list(bar) == [0, 1, 2]
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not bars.show_progress() and bars.progress(range(3), "judging").disable
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(bars.sys.stderr, "isatty", lambda: False, raising=False)
    bar = bars.progress(range(3), "judging")
    assert bar.disable and list(bar) == [0, 1, 2]  # a disabled bar still yields everything


def test_judging_and_generating_still_give_their_results_with_a_bar(monkeypatch):
    from unlearn import progress as bars
    from unlearn.metrics.generation import image_features, judge_logits

    monkeypatch.setattr(bars.sys.stderr, "isatty", lambda: True, raising=False)
    images = torch.rand(10, 1, 8, 8)
    judge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    assert torch.allclose(judge_logits(judge, images, batch_size=3), judge(images).detach(), atol=1e-6)
    assert image_features(images, judge, batch_size=4).shape == (10, 3)


# -- trackers ----------------------------------------------------------------------------------------------------


def _tracked_accelerator(folder, name: str):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(
        cpu=True,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(folder), logging_dir=str(folder / "logs")),
    )
    accelerator.init_trackers(name)
    return accelerator


def _scalar_tags(folder) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (folder / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


FAMILY_LOOPS = [
    # (method, family, model kind, settings, a scalar the tracker must hold)
    ("finetune", "classifier", "classifier", dict(epochs=1, batch_size=8), "finetune/loss"),
    ("esd", "diffusion", "sd", dict(steps=2, lr=1e-2, ddim_steps=4, params="xattn"), "esd/loss"),
    ("retrain", "diffusion", "ddpm", dict(steps=2, batch_size=2, warmup_steps=1), "retrain/loss"),
    ("retrain", "gan", "gan", dict(steps=2, batch_size=8), "train_gan/generator"),
]


@pytest.mark.parametrize("name, family, kind, settings, tag", FAMILY_LOOPS, ids=lambda v: str(v)[:12])
def test_every_family_loop_reaches_tensorboard(name, family, kind, settings, tag, tmp_path, request):
    """`train.log_with: tensorboard`: the losses of a classifier's fit, a diffusion method's step loop, a
    diffusion Retrain and a GAN Retrain all reach the tracker's event files."""
    import test_method_matrix as matrix

    from unlearn.methods import get_method
    from unlearn.train import end_trackers

    pipelines = None
    if family == "diffusion":
        from tiny_diffusion import tiny_ddpm_pipeline, tiny_sd_pipeline

        root = tmp_path / "pipelines"
        pipelines = {"sd": tiny_sd_pipeline(root / "sd")} if kind == "sd" else {}
        if kind == "ddpm":
            pipelines["ddpm"] = tiny_ddpm_pipeline(root / "ddpm", num_classes=10)
        settings = {**settings, **matrix.DDPM.get(name, {})} if kind == "ddpm" else settings
    recipe, model, data, _ = matrix._world(name, family, kind, settings, pipelines)
    accelerator = _tracked_accelerator(tmp_path / "run", name)
    torch.manual_seed(0)
    get_method(name, family)(**recipe.method_args).unlearn(model, data, accelerator)
    end_trackers(accelerator)
    tags = _scalar_tags(tmp_path / "run")
    assert tag in tags, tags


# -- schedules and augmentation (deliver 8: torch's and torchvision's, where they give the same results) -------


@pytest.mark.parametrize("total", [1, 7, 100, 391])
def test_lr_schedules_are_torchs_cosine_and_linear_in_closed_form(total):
    """Our LambdaLR multipliers are torch's CosineAnnealingLR and LinearLR (which compute them recursively, so
    they differ in the last bits: see `unlearn.train._lr_factor`)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR

    from unlearn.train import _lr_factor

    def rates(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler, out = make(optimizer), []
        for _ in range(total):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out + [optimizer.param_groups[0]["lr"]]

    torchs = {
        "cosine": lambda o: CosineAnnealingLR(o, T_max=total, eta_min=0.0),
        "linear": lambda o: LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=total),
        "constant": lambda o: LambdaLR(o, lambda step: 1.0),
    }
    for schedule, make in torchs.items():
        ours = rates(lambda o, schedule=schedule: LambdaLR(o, _lr_factor(schedule, total)))
        assert ours == pytest.approx(rates(make), abs=1e-12), schedule
        assert ours[0] == 0.1 and (schedule == "constant" or ours[-1] == pytest.approx(0.0, abs=1e-12))


def test_crop_flip_is_torchvisions_crop_and_flip_per_image():
    """`random_crop_flip` gives each image torchvision's crop of the zero-padded image and its flip, drawn from
    the global RNG per batch; torchvision's RandomCrop on a batch tensor would crop every image alike."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as tvf

    from unlearn.train import random_crop_flip

    images = torch.rand(16, 3, 8, 8)
    torch.manual_seed(3)
    ours = random_crop_flip(images, padding=2)
    torch.manual_seed(3)  # the same draws, in the same order, as random_crop_flip makes them
    dy, dx = torch.randint(0, 5, (16,)), torch.randint(0, 5, (16,))
    flip = torch.rand(16) < 0.5
    for i in range(16):
        crop = tvf.crop(tvf.pad(images[i], [2]), int(dy[i]), int(dx[i]), 8, 8)
        assert torch.equal(ours[i], tvf.horizontal_flip(crop) if flip[i] else crop), i
    shared = v2.RandomCrop(8, padding=2)(images)
    assert all(torch.equal(shared[0] == 0, shared[i] == 0) for i in range(16))  # one crop (zeros) for all
