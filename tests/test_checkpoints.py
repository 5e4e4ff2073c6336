"""Safe checkpoint reading and writing, and `Classifier.save` output that reloads in its own library."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unlearn.checkpoints import load_into, load_state_dict, save_state_dict, write_json
from unlearn.errors import CheckpointError, CheckpointNotFoundError, ConfigError, UnlearnError
from unlearn.models.classifier import CONFIG_NAME, build_classifier, load_classifier
from unlearn.models.zoo import DigitsCNN


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path` itself), keyed by relative name."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


class RunsCode:
    """A pickle payload that would create `marker` if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_code_pickle(path: Path, marker: Path, legacy: bool = False) -> None:
    """A checkpoint that carries code next to real tensors."""
    payload = {"state_dict": DigitsCNN().state_dict(), "extra": RunsCode(marker)}
    if legacy:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    else:
        torch.save(payload, path)


def tiny_vit_folder(path: Path, num_labels: int = 10, channels: int = 1, seed: int = 0) -> Path:
    """A tiny transformers image classifier saved with `save_pretrained`, plus a preprocessor config."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=channels,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=num_labels,
    )
    ViTForImageClassification(config).save_pretrained(str(path))
    processor = {
        "image_processor_type": "ViTImageProcessor",
        "do_normalize": True,
        "do_resize": True,
        "image_mean": [0.3] * channels,
        "image_std": [0.4] * channels,
        "size": {"height": 8, "width": 8},
    }
    (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return path


def images(n: int = 5, channels: int = 1, size: int = 8) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1))


def small_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3, generator=generator),
        "layer.bias": torch.randn(4, generator=generator),
        "count": torch.tensor([7], dtype=torch.int64),
        "half": torch.randn(2, 2, generator=generator).half(),
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_state_dict_round_trip(tmp_path, suffix):
    state = small_state()
    path = tmp_path / f"weights{suffix}"
    save_state_dict(state, path)
    assert_same_state(load_state_dict(path), state)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary files left behind
    if suffix == ".safetensors":
        assert_same_state(load_file(str(path)), state)
    else:
        assert_same_state(torch.load(path, weights_only=True), state)


def test_safetensors_round_trip_with_shared_tensors(tmp_path):
    weight = torch.randn(3, 3)
    state = {"a.weight": weight, "b.weight": weight}  # tied weights share memory; safetensors refuses that
    save_state_dict(state, tmp_path / "tied.safetensors")
    loaded = load_state_dict(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["a.weight"], weight) and torch.equal(loaded["b.weight"], weight)


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model", "net"])
def test_wrappers_are_unwrapped(tmp_path, wrapper):
    state = small_state()
    torch.save({wrapper: state, "epoch": 3}, tmp_path / "wrapped.pt")
    assert_same_state(load_state_dict(tmp_path / "wrapped.pt"), state)


def test_module_prefix_is_removed(tmp_path):
    state = small_state()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    assert_same_state(load_state_dict(tmp_path / "ddp.pth"), state)
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "ddp.safetensors"))
    loaded = load_state_dict(tmp_path / "ddp.safetensors")
    assert set(loaded) == {f"module.{k}" for k in state}  # safetensors files are read as they are
    # ... and a partial prefix is not a DataParallel save: keys stay untouched.
    torch.save({"module.a": torch.zeros(1), "b": torch.ones(1)}, tmp_path / "mixed.pt")
    assert set(load_state_dict(tmp_path / "mixed.pt")) == {"module.a", "b"}


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, legacy, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    write_code_pickle(path, marker, legacy=legacy)
    before = tree_hashes(path)
    with pytest.raises(CheckpointError, match="refusing to unpickle code"):
        load_state_dict(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_classifier(path, "digits_cnn", 10)
    assert not marker.exists()
    assert tree_hashes(path) == before


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 10, b"\x80\x02}q\x00"])
def test_corrupt_files_are_refused(tmp_path, suffix, content):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_state_dict(path)


def test_truncated_files_are_refused(tmp_path):
    for suffix in (".safetensors", ".pt"):
        good = tmp_path / f"good{suffix}"
        save_state_dict(small_state(), good)
        data = good.read_bytes()
        bad = tmp_path / f"bad{suffix}"
        bad.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError):
            load_state_dict(bad)


def test_not_a_state_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_state_dict(tmp_path / "list.pt")
    torch.save({"a": torch.zeros(2), "lr": 0.1}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_state_dict(tmp_path / "mixed.pt")


def test_missing_folder_and_suffix(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as info:
        load_state_dict(tmp_path / "absent.safetensors")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, UnlearnError)
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "absent.pt", "digits_cnn", 10)
    with pytest.raises(CheckpointError, match="is a folder"):
        load_state_dict(tmp_path)
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="suffix '.npz'"):
        load_state_dict(tmp_path / "weights.npz")
    with pytest.raises(CheckpointError, match="neither a transformers model folder"):
        load_classifier(tmp_path, None, 10)


def test_shape_and_key_mismatches(tmp_path):
    net = DigitsCNN(num_classes=10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = DigitsCNN(num_classes=5).state_dict()
    with pytest.raises(CheckpointError, match=r"fc.weight has shape \(5, 128\)"):
        load_into(net, state, "five-classes")
    assert_same_state(net.state_dict(), before)  # nothing was half-loaded
    state = DigitsCNN(num_classes=10).state_dict()
    state.pop("fc.bias")
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="1 missing keys.*1 unexpected"):
        load_into(net, state, "renamed")

    save_state_dict(DigitsCNN(num_classes=5).state_dict(), tmp_path / "five.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        load_classifier(tmp_path / "five.safetensors", "digits_cnn", 10)
    with pytest.raises(ConfigError, match="model.arch"):
        load_classifier(tmp_path / "five.safetensors", None, 5)


# ------------------------------------------------------------ Classifier.save in each format


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_builtin_classifier_save_reloads_in_bare_architecture(tmp_path, suffix):
    torch.manual_seed(0)
    source = tmp_path / f"input{suffix}"
    save_state_dict(DigitsCNN().state_dict(), source)
    before = tree_hashes(source)
    model = load_classifier(source, "digits_cnn", 10).eval()
    with torch.no_grad():
        model.network.fc.bias.add_(1.0)  # an "edit"
    model.save(tmp_path / "out")
    assert tree_hashes(source) == before

    weights = tmp_path / "out" / f"model{suffix}"
    config = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert (
        config["format"] == "builtin" and config["arch"] == "digits_cnn" and config["weights"] == weights.name
    )
    bare = DigitsCNN(num_classes=10).eval()
    state = load_file(str(weights)) if suffix == ".safetensors" else torch.load(weights, weights_only=True)
    bare.load_state_dict(state)
    x = images()
    with torch.no_grad():
        assert torch.equal(bare(model.prepare(x)), model(x))
        again = load_classifier(tmp_path / "out", None, 10).eval()
        assert torch.equal(again(x), model(x))
    assert again.source["weights_suffix"] == suffix

    with pytest.raises(CheckpointError, match="10 classes but the dataset has 4"):
        load_classifier(tmp_path / "out", None, 4)


def test_torchvision_classifier_save_reloads_in_torchvision(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = build_classifier("torchvision:resnet18", num_classes=4).eval()
    assert model.head is model.network.fc
    model.save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert config["format"] == "torchvision" and config["arch"] == "torchvision:resnet18"

    bare = torchvision.models.get_model("resnet18", weights=None, num_classes=4).eval()
    bare.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")))
    x = images(channels=1, size=16)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(bare(model.prepare(x)), expected)
        again = load_classifier(tmp_path / "out", None, 4).eval()
        assert torch.equal(again(x), expected)
        # A bare torchvision weights file with the architecture named loads too.
        save_file(bare.state_dict(), str(tmp_path / "bare.safetensors"))
        from_bare = load_classifier(tmp_path / "bare.safetensors", "torchvision:resnet18", 4).eval()
        assert torch.equal(from_bare(x), expected)
    with pytest.raises(ConfigError, match="unknown torchvision architecture"):
        build_classifier("torchvision:resnet_nope", 4)


@pytest.mark.parametrize("channels", [1, 3])
def test_transformers_classifier_save_reloads_with_from_pretrained(tmp_path, channels):
    from transformers import AutoModelForImageClassification

    source = tiny_vit_folder(tmp_path / "vit", channels=channels)
    before = tree_hashes(source)
    model = load_classifier(source, None, 10).eval()
    assert model.source["format"] == "transformers" and model.image_size == 8 and model.channels == channels
    assert model.mean.flatten().tolist() == pytest.approx([0.3] * channels)
    with torch.no_grad():
        model.head.bias.add_(0.5)  # an "edit"
    model.save(tmp_path / "out")
    assert tree_hashes(source) == before  # the input folder is untouched

    out = tmp_path / "out"
    assert (out / "config.json").exists() and (out / "preprocessor_config.json").exists()
    assert json.loads((out / "preprocessor_config.json").read_text())["image_mean"] == [0.3] * channels
    reloaded = AutoModelForImageClassification.from_pretrained(str(out), local_files_only=True).eval()
    x = images(channels=1, size=16)  # grey 16x16 input: the adapter resizes (and repeats channels)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(reloaded(model.prepare(x)).logits, expected)
        original = AutoModelForImageClassification.from_pretrained(str(source), local_files_only=True).eval()
        assert not torch.equal(original(model.prepare(x)).logits, expected)  # the edit was saved
        again = load_classifier(out, None, 10).eval()
        assert torch.equal(again(x), expected)
        assert again.features(x).shape == (5, 32)
    with pytest.raises(CheckpointError, match="10 classes but the dataset has 3"):
        load_classifier(source, None, 3)


def test_bad_saved_folder_config(tmp_path):
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_classifier(tmp_path, None, 10)
    write_json({"format": "onnx", "num_classes": 10}, tmp_path / CONFIG_NAME)
    with pytest.raises(CheckpointError, match="unknown format 'onnx'"):
        load_classifier(tmp_path, None, 10)


def _broken_vit(tmp_path: Path, how: str) -> Path:
    folder = tiny_vit_folder(tmp_path / how)
    if how == "bad-json":
        (folder / "config.json").write_text("{not json")
    elif how == "corrupt-weights":
        (folder / "model.safetensors").write_bytes(b"garbage" * 20)
    elif how == "no-weights":
        (folder / "model.safetensors").unlink()
    elif how == "wrong-shapes":
        config = json.loads((folder / "config.json").read_text())
        config["hidden_size"] = 64
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "not-a-classifier":
        from transformers import BertConfig

        BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
            folder
        )
    return folder


@pytest.mark.parametrize(
    "how", ["bad-json", "corrupt-weights", "no-weights", "wrong-shapes", "not-a-classifier"]
)
def test_broken_transformers_folder_is_a_one_line_checkpoint_error(tmp_path, how):
    folder = _broken_vit(tmp_path, how)
    with pytest.raises(CheckpointError) as info:
        load_classifier(folder, None, 10)
    assert str(folder) in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_transformers_folder_with_pickled_code_is_refused(tmp_path):
    folder = tiny_vit_folder(tmp_path / "vit")
    marker = tmp_path / "pwned"
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**state, "hook": RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to unpickle code"):
        load_classifier(folder, None, 10)
    assert not marker.exists()


@pytest.mark.parametrize("channels", [1, 3])
def test_transformers_folder_without_preprocessor(tmp_path, channels):
    """Without preprocessor_config.json: normalisation 0.5 per channel, size from config.json."""
    from transformers import AutoModelForImageClassification

    source = tiny_vit_folder(tmp_path / "vit", channels=channels)
    (source / "preprocessor_config.json").unlink()
    model = load_classifier(source, None, 10).eval()
    assert model.mean.flatten().tolist() == [0.5] * channels and model.image_size == 8
    x = images(channels=1)
    with torch.no_grad():
        expected = model(x)
        assert expected.shape == (5, 10)
        model.save(tmp_path / "out")
        assert not (tmp_path / "out" / "preprocessor_config.json").exists()
        reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "out")).eval()
        assert torch.equal(reloaded(model.prepare(x)).logits, expected)
        assert torch.equal(load_classifier(tmp_path / "out", None, 10).eval()(x), expected)


@pytest.mark.parametrize(
    "mean, expected",
    [(0.25, [0.25, 0.25, 0.25]), ([0.25], [0.25, 0.25, 0.25]), ([0.1, 0.2], None), ("{broken", None)],
)
def test_preprocessor_normalisation_values(tmp_path, mean, expected):
    source = tiny_vit_folder(tmp_path / "vit", channels=3)
    processor = source / "preprocessor_config.json"
    if mean == "{broken":
        processor.write_text("{broken")
    else:
        spec = json.loads(processor.read_text())
        spec["image_mean"] = mean
        processor.write_text(json.dumps(spec))
    if expected is None:
        with pytest.raises(CheckpointError, match="preprocessor_config.json"):
            load_classifier(source, None, 10)
    else:
        assert load_classifier(source, None, 10).mean.flatten().tolist() == expected


def test_atomic_writes_leave_the_old_file_or_folder_whole_when_interrupted(tmp_path):
    from unlearn.checkpoints import atomic_path, write_json

    target = tmp_path / "metrics.json"
    write_json({"UA": 1.0}, target)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"UA": 2')  # half written, then the writer dies
        raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"UA": 1.0}
    folder = tmp_path / "model"
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("crash")
    assert (folder / "a.txt").read_text() == "old"
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model"]  # no temporary leftovers
