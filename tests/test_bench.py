"""`unlearn bench`: a tiny suite end to end, and the table arithmetic."""

from __future__ import annotations

import json

import pytest
import yaml

from unlearn.bench import bench, load_suite, results_table
from unlearn.cli import main
from unlearn.errors import ConfigError


def _suite(tmp_path, **extra):
    suite = {
        "name": "tiny",
        "recipes": "recipes/classifier/digits",
        "reference": "retrain",
        "methods": ["finetune", "random_label"],
        "seeds": [0, 1],
        "overrides": ["method.epochs=1", "data.forget_class=[3]", "data.forget_fraction=null"],
        **extra,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_bench_writes_rows_summary_and_table(tmp_path, digits_world):
    out = tmp_path / "out"
    results = bench(_suite(tmp_path), out, log=lambda message: None)
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"].keys() == {"original", "retrain", "finetune", "random_label"}
    rows = saved["rows"]
    assert len(rows) == 2 * 4  # (original + retrain + 2 methods) x 2 seeds
    for row in rows:
        assert {"method", "seed", "UA", "RA", "TA", "MIA", "avg_gap", "RTE_s"} <= row.keys()
        assert all(0 <= row[k] <= 100 for k in ("UA", "RA", "TA", "MIA"))
    for row in rows:
        assert {"CKA_forget_original", "CKA_forget_retrain", "CKA_test_retrain"} <= row.keys()
        if row["method"] == "retrain":
            assert row["avg_gap"] == 0
            assert row["CKA_forget_retrain"] == row["CKA_test_retrain"] == 100
        if row["method"] == "original":
            assert row["CKA_forget_original"] == 100
        if row["method"] == "original":
            assert row["UA"] < 10  # the original still knows class 3
    ft = [r["UA"] for r in rows if r["method"] == "finetune"]
    assert results["summary"]["finetune"]["UA"]["mean"] == pytest.approx(sum(ft) / len(ft))
    table = (out / "results.md").read_text()
    for name in ("original", "retrain", "finetune", "random_label", "RTE / Retrain", "±"):
        assert name in table
    assert "1.00×" in table  # Retrain's own RTE ratio
    # the settings that made the table, and its chart (each method's gap against its run time)
    assert saved["overrides"] == ["method.epochs=1", "data.forget_class=[3]", "data.forget_fraction=null"]
    assert "- every method: `method.epochs=1`" in table and "(2 seeds, n=2)" in table
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](bench.png)" in table


def test_bench_reuses_finished_runs(tmp_path, digits_world):
    out = tmp_path / "out"
    first = bench(_suite(tmp_path, seeds=[0]), out, log=lambda message: None)
    second = bench(_suite(tmp_path, seeds=[0]), out, log=lambda message: None)
    assert first["rows"] == second["rows"]


def test_a_bench_over_some_seeds_leaves_the_results_to_the_bench_over_all(tmp_path, digits_world):
    suite, out = _suite(tmp_path), tmp_path / "out"
    assert main(["bench", str(suite), "-o", str(out), "--seed", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["runs"]  # no results files for part of the suite
    logs = []
    whole = bench(suite, out, log=logs.append)
    assert sum("is already complete" in m for m in logs) == 3  # seed 1's Retrain and two methods
    assert (
        sorted({r["seed"] for r in whole["rows"]}) == json.loads((out / "results.json").read_text())["seeds"]
    )
    assert whole["seeds"] == [0, 1]
    for seeds in ([5], [0, 5], []):
        with pytest.raises(ConfigError, match="among the suite's seeds"):
            bench(suite, out, log=lambda message: None, seeds=seeds)
    assert main(["bench", str(suite), "-o", str(out), "--seed", "5"]) == 2


def test_results_table_mean_std():
    results = {
        "suite": "s",
        "family": "classifier",
        "seeds": [0, 1],
        "reference": "retrain",
        "summary": {
            "retrain": {k: {"mean": 50.0, "std": 1.0} for k in ("UA", "RA", "TA", "MIA", "avg_gap", "RTE_s")},
            "ft": {k: {"mean": 25.0, "std": 0.5} for k in ("UA", "RA", "TA", "MIA", "avg_gap", "RTE_s")},
        },
    }
    table = results_table(results)
    assert "| ft | 25.00 ± 0.50" in table
    assert "0.50×" in table


def test_bad_suite_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "x", "recipes": "recipes/classifier/digits", "methods": ["ft"], "colour": "red"}
        )
    )
    with pytest.raises(ConfigError):
        load_suite(path)
    assert main(["bench", str(path)]) == 2
    path.write_text(
        yaml.safe_dump({"name": "x", "recipes": "recipes/classifier/digits", "methods": ["nope"]})
    )
    assert main(["bench", str(path)]) == 2


def test_shipped_suites_validate():
    for name in ("evals/digits_classwise.yaml", "evals/digits_random10.yaml"):
        assert main(["check", name]) == 0


def test_method_overrides_apply_to_their_method_only(tmp_path):
    from unlearn.bench import check_suite, suite_recipe

    suite = load_suite(_suite(tmp_path, method_overrides={"random_label": ["method.lr=0.003"]}))
    assert suite_recipe(suite, "random_label", 0).method_args["lr"] == 0.003
    assert suite_recipe(suite, "finetune", 0).method_args["lr"] != 0.003
    suite = load_suite(_suite(tmp_path, method_overrides={"salun": ["method.lr=0.003"]}))
    with pytest.raises(ConfigError, match="does not run"):
        check_suite(suite)


def test_generative_suites_get_the_erasure_table():
    """A diffusion suite's table shows the judged erasure columns side by side (no classifier columns)."""
    from unlearn.bench import results_table

    def stats(**values):
        return {k: {"mean": v, "std": 0.0} for k, v in values.items()}

    results = {
        "suite": "digits_t2i_concept",
        "family": "diffusion",
        "seeds": [0],
        "reference": "retrain",
        "summary": {
            "original": stats(
                erasure_rate=100.0, erasure_rate_paraphrase=100.0, retain_accuracy=100.0, fid=6.2, RTE_s=0.0
            ),
            "retrain": stats(
                erasure_rate=1.0, erasure_rate_paraphrase=2.0, retain_accuracy=99.0, fid=7.0, RTE_s=400.0
            ),
            "salun": stats(
                erasure_rate=3.0, erasure_rate_paraphrase=9.0, retain_accuracy=95.0, fid=9.5, RTE_s=100.0
            ),
        },
    }
    lines = results_table(results).splitlines()
    assert "erasure (paraphrase)" in lines[2] and "UA" not in lines[2]
    salun = next(line for line in lines if line.startswith("| salun |"))
    assert "| 9.00 |" in salun and "±" not in salun and "0.25×" in salun  # one seed: no spread shown


def test_multi_concept_suites_get_one_column_per_concept():
    """Erasing several concepts together: each concept's exact and paraphrase erasure gets its own column, and
    the neighbours' accuracy is shown apart."""
    from unlearn.bench import results_table
    from unlearn.harness import DiffusionHarness

    metrics = {
        "erasure_rate": 5.0,
        "erasure_rate:three": 0.0,
        "erasure_rate:seven": 10.0,
        "erasure_rate_paraphrase": 4.0,
        "erasure_rate_paraphrase:three": 8.0,
        "erasure_rate_paraphrase:seven": 0.0,
        "retain_accuracy": 97.0,
        "neighbor_accuracy": 94.0,
        "unrelated_accuracy": 100.0,
        "RTE_s": 10.0,
        "original_erasure_rate": 100.0,
    }
    row = DiffusionHarness.bench_row(metrics, {})
    assert "original_erasure_rate" not in row and row["erasure_rate:seven"] == 10.0
    stats = {k: {"mean": v, "std": 0.0} for k, v in row.items()}
    results = {
        "suite": "digits_t2i_multi",
        "family": "diffusion",
        "seeds": [0],
        "reference": "retrain",
        "summary": {"retrain": stats},
    }
    header, _, line = results_table(results).splitlines()[2:5]
    titles = [cell.strip() for cell in header.split("|")[1:-1]]
    assert titles[1:7] == [
        "erasure (exact)",
        "erasure (paraphrase)",
        "erasure (exact): three",
        "erasure (exact): seven",
        "erasure (paraphrase): three",
        "erasure (paraphrase): seven",
    ]
    assert "neighbours acc." in titles and line.split("|")[5].strip() == "10.00"  # one seed: no ± 0.00
