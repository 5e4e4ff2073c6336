"""The harness of each family owns its metric catalogue: recipes are checked against it, `unlearn ls metrics`
prints it, and reports and bench tables take their titles from it."""

from __future__ import annotations

import pytest

from unlearn.cli import main
from unlearn.errors import ConfigError
from unlearn.harness import COMMON, HARNESSES
from unlearn.recipe import find_path, load_recipe

RECIPES = {
    "classifier": "recipes/classifier/digits/random_label.yaml",
    "diffusion": "recipes/diffusion/digits_t2i/esd.yaml",
    "gan": "recipes/gan/digits/adapt_then_unlearn.yaml",
}


@pytest.mark.parametrize(
    ("family", "foreign"),
    [("classifier", "erasure_rate"), ("diffusion", "UA"), ("gan", "erasure_rate_paraphrase")],
)
def test_a_metric_of_another_family_is_refused(family, foreign, capsys):
    path = find_path(RECIPES[family])
    with pytest.raises(ConfigError, match=f"'{foreign}' is not a metric of the {family} family"):
        load_recipe(path, [f"eval.metrics=[{foreign}]"])
    assert load_recipe(path).eval.metrics == list(HARNESSES[family].default_metrics)
    assert main(["check", str(path)]) == 0


def test_every_catalogue_entry_is_complete():
    for family, harness in HARNESSES.items():
        for key, info in {**harness.catalogue, **COMMON}.items():
            assert info.title and info.meaning and info.better in ("higher", "lower", "retrain"), (
                family,
                key,
            )
            assert info.unit in ("%", "s", ""), (family, key)
            assert info.requested_by is None or info.requested_by in (
                *harness.metric_names(),
                "eval.reference",
                "model.prune",
                "(always)",
            ), (family, key)
        assert set(harness.default_metrics) <= set(harness.metric_names())
        assert all(harness.info(column) is not None for column in harness.columns), family


def test_ls_metrics_prints_each_familys_catalogue(capsys):
    assert main(["ls", "metrics"]) == 0
    out = capsys.readouterr().out
    for family, harness in HARNESSES.items():
        assert f"{family} (default:" in out
        for name in harness.metric_names():
            assert f"  {name} " in out


def test_patterned_keys_find_their_entry():
    assert HARNESSES["classifier"].info("acc_class_7").requested_by == "per_class"
    assert HARNESSES["diffusion"].info("erasure_rate:three").requested_by == "erasure_rate"
    assert HARNESSES["gan"].info("class_share_3").requested_by == "class_histogram"
    assert HARNESSES["gan"].info("no_such_key") is None
