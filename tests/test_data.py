"""Datasets and forget / retain / test splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn.data import forget_classes, forget_fraction
from unlearn.datasets import ImageTensorDataset, load_dataset
from unlearn.errors import CheckpointNotFoundError, DataError, UnlearnError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


# ----------------------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_and_stratified(digits):
    train, test = digits
    assert (len(train), len(test)) == (1437, 360)
    assert train.num_classes == test.num_classes == 10
    assert train.images.shape == (1437, 1, 8, 8) and train.images.dtype == torch.float32
    assert 0.0 <= float(train.images.min()) and float(train.images.max()) <= 1.0
    image, label = train[0]
    assert image.shape == (1, 8, 8) and label.dtype == torch.long

    again_train, again_test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert torch.equal(train.images, again_train.images) and torch.equal(train.labels, again_train.labels)
    assert torch.equal(test.images, again_test.images) and torch.equal(test.labels, again_test.labels)

    # Stratified 80/20: every class has (almost exactly) a fifth of its examples in the test split.
    from sklearn.datasets import load_digits

    full = load_digits()
    all_counts = np.bincount(full.target, minlength=10)
    test_counts = np.bincount(test.labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1)
    assert np.array_equal(test_counts + np.bincount(train.labels.numpy(), minlength=10), all_counts)

    # The two splits partition the 1,797 images (no image in both).
    flat = np.concatenate([train.images.flatten(1).numpy(), test.images.flatten(1).numpy()])
    reference = (full.images.reshape(len(full.images), -1) / 16.0).astype(np.float32)
    assert sorted(map(bytes, flat)) == sorted(map(bytes, reference))


def test_unknown_dataset_and_split():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", "train")
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", "validation")


# --------------------------------------------------------------------------------- forget_classes


def test_forget_classes_moves_every_example_of_the_class(digits):
    train, test = digits
    data = forget_classes(train, test, [3])
    assert data.forget_classes == (3,) and data.num_classes == 10
    assert len(data.forget) == int((train.labels == 3).sum())
    assert torch.all(data.forget.labels == 3)
    assert not torch.any(data.retain.labels == 3)
    assert len(data.forget) + len(data.retain) == len(train)
    assert not torch.any(data.test.labels == 3)
    assert torch.all(data.test_forget.labels == 3)
    assert len(data.test) + len(data.test_forget) == len(test)
    assert len(data.test_forget) == int((test.labels == 3).sum()) > 0
    assert "classes [3]" in data.describe()


def test_forget_several_classes_dedupes_and_sorts(digits):
    train, test = digits
    data = forget_classes(train, test, [7, 2, 7])
    assert data.forget_classes == (2, 7)
    assert set(data.forget.labels.tolist()) == {2, 7}
    assert not set(data.retain.labels.tolist()) & {2, 7}
    assert set(data.test_forget.labels.tolist()) == {2, 7}


@pytest.mark.parametrize(
    "classes, message",
    [
        ([10], "class id 10 is out of range"),
        ([-1], "class id -1 is out of range"),
        ([], "empty"),
        (list(range(10)), "every class"),
    ],
)
def test_forget_classes_refuses_bad_requests(digits, classes, message):
    train, test = digits
    with pytest.raises(DataError, match=message):
        forget_classes(train, test, classes)


def test_forget_class_without_training_examples_is_empty():
    images, labels = torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1])
    train = ImageTensorDataset(images, labels, num_classes=3)
    with pytest.raises(DataError, match="empty"):
        forget_classes(train, train, [2])


# -------------------------------------------------------------------------------- forget_fraction


def test_forget_fraction_is_seeded_disjoint_and_sized(digits):
    train, test = digits
    data = forget_fraction(train, test, 0.1, seed=3)
    assert len(data.forget) == round(0.1 * len(train)) == 144
    assert len(data.retain) == len(train) - 144
    assert data.forget_classes == () and len(data.test_forget) == 0 and len(data.test) == len(test)

    def keys(ds):
        return {bytes(x.numpy()) + bytes([int(y)]) for x, y in zip(ds.images, ds.labels)}

    forget, retain = keys(data.forget), keys(data.retain)
    assert not forget & retain
    assert forget | retain == keys(train)

    again = forget_fraction(train, test, 0.1, seed=3)
    assert torch.equal(again.forget.images, data.forget.images)
    assert torch.equal(again.retain.labels, data.retain.labels)
    other = forget_fraction(train, test, 0.1, seed=4)
    assert not torch.equal(other.forget.images, data.forget.images)
    assert "random examples" in data.describe()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, 1e-6])
def test_forget_fraction_refuses_bad_fractions(digits, fraction):
    train, test = digits
    with pytest.raises(DataError):
        forget_fraction(train, test, fraction)


# ------------------------------------------------------------------------------- torchvision data


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_missing_torchvision_dataset_is_a_clear_error(tmp_path, name):
    with pytest.raises(UnlearnError) as info:
        load_dataset(name, "train", root=str(tmp_path), download=False)
    assert isinstance(info.value, CheckpointNotFoundError)
    assert "download" in str(info.value) and str(tmp_path) in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or written
    with pytest.raises(DataError, match="root"):
        load_dataset(name, "test", root=None)


# ---------------------------------------------------------------------------------- image folders


def _write_image_folder(root, size=(6, 5)):
    """train/ and test/ with classes 'cat' (red-ish, RGB) and 'ant' (grey, L mode) as PNGs."""
    rng = np.random.default_rng(0)
    written = {}
    for split, count in (("train", 3), ("test", 2)):
        for cls, mode in (("cat", "RGB"), ("ant", "L")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
                Image.fromarray(pixels, mode=mode).save(folder / f"{i}.png")
                written[(split, cls, i)] = pixels
    return written


def test_imagefolder_loads_pngs(tmp_path):
    written = _write_image_folder(tmp_path)
    train = load_dataset("imagefolder", "train", root=str(tmp_path))
    test = load_dataset("imagefolder", "test", root=str(tmp_path))
    assert (len(train), len(test)) == (6, 4)
    assert train.num_classes == test.num_classes == 2
    # Classes sorted by folder name: ant -> 0, cat -> 1.
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images.dtype == torch.uint8 and train.images.shape == (6, 3, 5, 6)
    image, label = train[3]
    assert image.dtype == torch.float32 and int(label) == 1
    expected = torch.from_numpy(written[("train", "cat", 0)]).permute(2, 0, 1).float() / 255.0
    assert torch.allclose(image, expected)
    grey, _ = train[1]
    expected_grey = torch.from_numpy(written[("train", "ant", 1)]).float() / 255.0
    assert torch.allclose(grey, expected_grey.expand(3, -1, -1))  # grey images become 3 equal channels

    resized = load_dataset("imagefolder", "train", root=str(tmp_path), image_size=4)
    assert resized.images.shape == (6, 3, 4, 4)

    data = forget_classes(train, test, [1])
    assert len(data.forget) == 3 and len(data.test_forget) == 2 and len(data.test) == 2


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        load_dataset("imagefolder", "train", root=None)
    with pytest.raises(CheckpointNotFoundError):
        load_dataset("imagefolder", "train", root=str(tmp_path / "nowhere"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError):  # no class folders
        load_dataset("imagefolder", "train", root=str(tmp_path))
    (tmp_path / "train" / "a").mkdir()
    with pytest.raises(DataError):  # a class folder without images
        load_dataset("imagefolder", "train", root=str(tmp_path))


def test_image_tensor_dataset_checks_lengths_and_subsets():
    with pytest.raises(DataError, match="3 images but 2 labels"):
        ImageTensorDataset(torch.zeros(3, 1, 2, 2), torch.zeros(2), num_classes=2)
    ds = ImageTensorDataset(
        torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1) * 50, torch.tensor([0, 1, 0, 1]), 2
    )
    sub = ds.subset([3, 1])
    assert sub.labels.tolist() == [1, 1] and sub.num_classes == 2
    assert float(sub[0][0]) == pytest.approx(150 / 255)


def _png(path, value: int, size=(4, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, dtype=np.uint8), mode="L").save(path)


def test_imagefolder_test_split_keeps_train_class_ids(tmp_path):
    """A test/ without a 'bee' folder must still call 'cat' class 2, as train/ does."""
    for cls, value in (("ant", 10), ("bee", 20), ("cat", 30)):
        _png(tmp_path / "train" / cls / "0.png", value)
    _png(tmp_path / "test" / "ant" / "0.png", 10)
    _png(tmp_path / "test" / "cat" / "0.png", 30)
    train = load_dataset("imagefolder", "train", root=str(tmp_path))
    test = load_dataset("imagefolder", "test", root=str(tmp_path))
    assert train.labels.tolist() == [0, 1, 2]
    assert test.labels.tolist() == [0, 2] and test.num_classes == 3
    data = forget_classes(train, test, [2])
    assert torch.equal(data.test_forget.images, test.images[1:])

    _png(tmp_path / "test" / "dog" / "0.png", 40)
    with pytest.raises(DataError, match="dog"):
        load_dataset("imagefolder", "test", root=str(tmp_path))


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    _png(tmp_path / "train" / "a" / "0.png", 10, size=(4, 4))
    _png(tmp_path / "train" / "a" / "1.png", 20, size=(6, 5))
    with pytest.raises(DataError, match="image_size"):
        load_dataset("imagefolder", "train", root=str(tmp_path))
    assert load_dataset("imagefolder", "train", root=str(tmp_path), image_size=3).images.shape == (2, 3, 3, 3)
