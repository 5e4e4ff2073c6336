"""The classifier harness: forget / retain / test sets, UA / RA / TA / MIA, per-class and representation
metrics, SalUn's Avg. Gap to Retrain."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data import UnlearnData, forget_classes, forget_fraction
from ..datasets import load_dataset
from ..errors import ConfigError
from ..metrics.classification import accuracy, dataset_accuracy, predict_logits
from ..metrics.functional import GAP_KEYS, gap
from .base import Harness, MetricInfo, Recognition, Scores, class_table


def classifier_task(recipe) -> UnlearnData:
    """The forget / retain / test sets a recipe names: whole classes, or a seeded random share."""
    spec = recipe.data
    train = load_dataset(spec.dataset, "train", spec.root, spec.download, spec.image_size)
    test = load_dataset(spec.dataset, "test", spec.root, spec.download, spec.image_size)
    if spec.forget_class is not None:
        return forget_classes(train, test, spec.forget_class)
    return forget_fraction(train, test, spec.forget_fraction, seed=recipe.seed)


def per_class_of(metrics: dict) -> dict[int, float]:
    """{class: test accuracy} from a run's metric keys `acc_class_<c>`."""
    prefix = "acc_class_"
    found = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    return {int(c): v for c, v in found.items() if c.isdigit()}


@torch.no_grad()
def score_classifier(model, data: UnlearnData, names, batch_size: int = 256, references=None) -> dict:
    """UA, RA, TA, MIA (percent), `forget_test_acc`, `acc_class_<c>` and, given reference models, the
    representation metrics of a classifier on a task (see `ClassifierHarness.catalogue`)."""
    from torchmetrics.classification import MulticlassAccuracy

    from ..metrics.classification import MEMBER, NONMEMBER, TARGET, MIAEfficacy

    ClassifierHarness.check_metrics(names)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    forget = predict_logits(model, data.forget, batch_size, device)
    retain = predict_logits(model, data.retain, batch_size, device)
    test = predict_logits(model, data.test, batch_size, device)
    test_forget = predict_logits(model, data.test_forget, batch_size, device)
    results: dict[str, float] = {}
    if "UA" in names:
        results["UA"] = 100.0 - accuracy(*forget)
    if "RA" in names:
        results["RA"] = accuracy(*retain)
    if "TA" in names:
        results["TA"] = accuracy(*test)
    if data.forget_classes:
        results["forget_test_acc"] = accuracy(*test_forget)
    if "MIA" in names:
        # Members: the first |D_test| retain examples in dataset order (as the reference code takes them).
        members = min(len(data.test), len(data.retain))
        # No sync across processes: scoring sees the whole sets in one process (the pipeline scores on the
        # main process only), and a sync would wait forever for processes that are not computing.
        mia = MIAEfficacy(sync_on_compute=False)
        mia.update(retain[0][:members], retain[1][:members], MEMBER)
        mia.update(*test, NONMEMBER)
        mia.update(*forget, TARGET)
        results["MIA"] = float(mia.compute())
    if "per_class" in names:
        per_class = MulticlassAccuracy(data.num_classes, average=None, sync_on_compute=False)
        logits, labels = torch.cat([test[0], test_forget[0]]), torch.cat([test[1], test_forget[1]])
        per_class.update(logits, labels)
        present = torch.bincount(labels, minlength=data.num_classes) > 0  # a class never seen: NaN, not 0
        for c, value in enumerate(per_class.compute().tolist()):
            results[f"acc_class_{c}"] = 100.0 * value if present[c] else math.nan
    if "representation" in names and references:
        from ..metrics.representation import representation_metrics

        results.update(representation_metrics(model, data, references, batch_size))
    model.train(was_training)
    return results


# An original model is flagged before any training when its test accuracy is below chance plus this share of
# the way from chance to 100 % (32.5 % for 10 classes): such a model was not trained on the data as preprocessed.
POOR_ORIGINAL = 0.25


class ClassifierHarness(Harness):
    family = "classifier"
    catalogue = {
        "UA": MetricInfo("UA", "unlearning accuracy: 100 − accuracy on the forget set", "retrain"),
        "RA": MetricInfo("RA", "remaining accuracy: accuracy on the retain set", "higher"),
        "TA": MetricInfo(
            "TA", "testing accuracy: accuracy on the test set, forgotten classes removed", "higher"
        ),
        "forget_test_acc": MetricInfo(
            "forget test acc.",
            "test accuracy on the forgotten classes (class-wise tasks)",
            "retrain",
            "%",
            "TA",
        ),
        "MIA": MetricInfo(
            "MIA",
            "MIA-efficacy: share of forget examples an SVC attack on true-label confidence calls non-member",
            "retrain",
        ),
        "per_class": MetricInfo("per class", "test accuracy per class (keys acc_class_<c>)", "higher"),
        "acc_class_<c>": MetricInfo("acc. class", "test accuracy of class c", "higher", "%", "per_class"),
        "representation": MetricInfo(
            "representation",
            "linear CKA of penultimate features to the original and Retrain models, and linear probe / 5-NN "
            "accuracy on the forgotten data from frozen features",
            "retrain",
        ),
        **{
            f"CKA_{part}_{ref}": MetricInfo(
                f"CKA {part}→{'orig' if ref == 'original' else 'Retrain'}",
                f"linear CKA of penultimate features on the {part} set to the {ref} model's",
                "retrain",
                "%",
                "representation",
            )
            for part in ("forget", "test")
            for ref in ("original", "retrain")
        },
        "probe_forget": MetricInfo(
            "probe forget",
            "a linear probe on frozen features reads the forgotten data out (accuracy)",
            "retrain",
            "%",
            "representation",
        ),
        "knn_forget": MetricInfo(
            "5-NN forget",
            "5-NN on frozen features on the forgotten data (accuracy)",
            "retrain",
            "%",
            "representation",
        ),
        **{
            f"gap_{key}": MetricInfo(
                f"gap {key}", f"|{key} − Retrain's {key}|", "lower", "%", "eval.reference"
            )
            for key in GAP_KEYS
        },
        "avg_gap": MetricInfo(
            "Avg. Gap",
            "SalUn's Avg. Gap: mean |metric − Retrain| over UA, RA, TA, MIA",
            "lower",
            "%",
            "eval.reference",
        ),
    }
    default_metrics = ("UA", "RA", "TA", "MIA", "per_class", "representation")
    utility_keys = ("RA", "TA")  # the utility guard (`Harness.utility_guard`)
    multi_process = True
    second_judge = None  # a classifier is judged by itself
    columns = (
        "UA",
        "RA",
        "TA",
        "MIA",
        "avg_gap",
        "CKA_forget_original",
        "CKA_forget_retrain",
        "CKA_test_retrain",
        "probe_forget",
        "RTE_s",
    )
    row_extras = ("gap_UA", "gap_RA", "gap_TA", "gap_MIA")
    legend = (
        "UA, RA, TA, MIA in percent (mean ± std over seeds); Avg. Gap = mean |metric − Retrain| over "
        "UA, RA, TA, MIA, per seed; CKA = linear CKA (percent) of penultimate features on the forget / test "
        "set to the original model and to Retrain; probe forget = accuracy of a linear probe on frozen features "
        "on the forgotten data; `original` is the model before unlearning."
    )

    def setup(self):
        from ..models import load_model

        data = classifier_task(self.recipe)
        spec = self.recipe.model
        model = load_model(spec.checkpoint, spec.arch, data.num_classes, spec.family)
        return model.to(self.device), data

    def load_output(self, path: Path, data: UnlearnData):
        from ..models.classifier import load_classifier

        return load_classifier(path, self.recipe.model.arch, data.num_classes).to(self.device)

    def before(self, original, data, reference_dir):
        """The representation metrics compare the unlearned features with the original's and Retrain's."""
        self.references = {}
        self.reference_dir = reference_dir  # its metrics.json: Retrain's per-class accuracy (`save_charts`)
        if "representation" in self.names:
            self.references["original"] = original.frozen_copy()
            if reference_dir is not None and (reference_dir / "model").exists():
                self.references["retrain"] = self.load_output(reference_dir / "model", data)

    def score(self, model, data, original: bool = False) -> Scores:
        references = None if original else getattr(self, "references", None)
        return Scores(score_classifier(model, data, self.names, self.recipe.eval.batch_size, references))

    def save_charts(self, output, scores, original):
        """Test accuracy per class of the original, the unlearned model and Retrain (its run folder's
        `metrics.json`), where the run scored `per_class`; then the common charts."""
        from ..charts import per_class_chart
        from ..runfolder import read_metrics

        reference_dir = getattr(self, "reference_dir", None)
        retrain = {}
        if reference_dir is not None and (reference_dir / "metrics.json").is_file():
            what = f"Retrain run folder {str(reference_dir)!r}"
            retrain = read_metrics(reference_dir / "metrics.json", what)
        accuracy = {
            model: per_class_of(found)
            for model, found in (
                ("original", original.metrics if original else {}),
                ("unlearned", scores.metrics),
                ("Retrain", retrain),
            )
        }
        charts = {}
        if accuracy["unlearned"]:
            forgotten = self.recipe.data.forget_class or []
            path = per_class_chart(accuracy, forgotten, output / "chart_per_class.png")
            caption = "Test accuracy per class: original, unlearned, Retrain (forgotten classes starred)"
            charts[caption] = path.name
        return {**charts, **super().save_charts(output, scores, original)}

    @classmethod
    def compare(cls, metrics: dict, reference: dict | None) -> dict:
        if reference is None:
            return {}
        keys = [k for k in GAP_KEYS if k in metrics and k in reference]
        out = gap(metrics, reference, keys) if keys else {}
        if len(keys) < len(GAP_KEYS):  # SalUn's Avg. Gap is over all four
            out.pop("avg_gap", None)
        out.update({f"retrain_{k}": reference[k] for k in (*GAP_KEYS, "RTE_s") if k in reference})
        out.update({f"retrain_{k}": v for k, v in reference.items() if k.startswith("acc_class_")})
        return out

    def check_original(self, model, data) -> str | None:
        """A sentence when the original model's test accuracy (all classes, as the toolkit preprocesses the
        images) is below `POOR_ORIGINAL`: near chance, the usual sign of a wrong image_mean / image_std, image
        size or channel order, or of a checkpoint that does not fit the dataset's classes."""
        test = torch.utils.data.ConcatDataset([data.test, data.test_forget])
        accuracy = dataset_accuracy(model, test, self.recipe.eval.batch_size)
        chance = 100.0 / data.num_classes
        if math.isnan(accuracy) or accuracy >= chance + POOR_ORIGINAL * (100.0 - chance):
            return None
        return (
            f"the original model scores {accuracy:.1f} % on the {self.recipe.data.dataset} test set as the "
            f"toolkit preprocesses it (chance: {chance:.1f} %): its inputs are likely normalised differently "
            "from its training (image_mean / image_std in its preprocessor_config.json or config, the image "
            "size, the channels), or the checkpoint does not fit this dataset's classes; unlearning it would "
            "measure nothing"
        )

    @torch.no_grad()
    def recognized(self, model, data, *, samples=None, seed=0, images=None, labels=None) -> Recognition:
        """Which held-out examples of the forgotten data the model still classifies correctly (`images` /
        `labels`; default: the test examples of the forgotten classes). The model is its own judge."""
        if images is None:
            if not len(data.test_forget):
                raise ConfigError(
                    "this task has no held-out examples of the forgotten data (random forgetting): give them"
                )
            images = torch.stack([data.test_forget[i][0] for i in range(len(data.test_forget))])
            labels = torch.tensor([int(data.test_forget[i][1]) for i in range(len(data.test_forget))])
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        batch = self.recipe.eval.batch_size
        predicted = torch.cat(
            [model(images[i : i + batch].to(device)).argmax(1).cpu() for i in range(0, len(images), batch)]
        )
        model.train(was_training)
        hits = predicted == torch.as_tensor(labels)
        return Recognition(hits, hits)

    def original_training_steps(self):
        if self.recipe.model.checkpoint == "world:digits":
            from ..worlds.digits import TRAIN_STEPS

            return TRAIN_STEPS
        return None

    def report_header(self, data, metrics):
        recipe = self.recipe
        return [
            f"# {recipe.method} on {recipe.data.dataset}",
            "",
            f"- task: {data.describe()}",
            f"- model: {recipe.model.arch} from `{recipe.model.checkpoint}`",
        ]

    def report_keys(self, metrics: dict) -> list[str]:
        return [k for k in super().report_keys(metrics) if not k.startswith("gap_")]

    def report_sections(self, data, metrics, artifacts):
        lines = []
        if "avg_gap" in metrics:
            lines += ["", f"Average gap to Retrain over UA, RA, TA, MIA: **{metrics['avg_gap']:.2f}**"]
        caption = "Test accuracy per class (forgotten classes marked *):"
        return lines + class_table(metrics, "acc_class_", set(data.forget_classes), caption)

    @classmethod
    def reference_rows(cls, reference: dict) -> tuple[dict, dict]:
        """The original and Retrain rows; their CKA columns come from the Retrain run's CKA to the original
        (CKA is symmetric), and 100 for a model against itself. Their gaps are to the Retrain row."""
        original, retrain = super().reference_rows(reference)
        if "CKA_forget_original" in reference:
            between = {"forget": reference["CKA_forget_original"], "test": reference["CKA_test_original"]}
            for row, own, other in ((original, "original", "retrain"), (retrain, "retrain", "original")):
                row.update({f"CKA_{part}_{own}": 100.0 for part in between})
                row.update({f"CKA_{part}_{other}": value for part, value in between.items()})
        return original, retrain

    @classmethod
    def bench_row(cls, metrics: dict, reference: dict) -> dict:
        row = super().bench_row(metrics, reference)
        row.update({k: v for k, v in cls.compare(metrics, reference).items() if not k.startswith("retrain_")})
        return row
