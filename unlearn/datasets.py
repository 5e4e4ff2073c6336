"""Image datasets as tensors: digits (bundled with scikit-learn), CIFAR-10/100, SVHN, image folders.

Every dataset yields `(image, label)` with images as float tensors in [0, 1], shape (C, H, W). Normalisation is
the model's business (it lives inside the classifier adapter, as in the OPTML reference code).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import CheckpointNotFoundError, DataError

DATASETS = ("digits", "digits_canvas", "cifar10", "cifar100", "svhn", "imagefolder")
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


class ImageTensorDataset(Dataset):
    """Images (uint8 0-255 or float 0-1) and integer labels held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str = ""):
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.num_classes = num_classes
        self.name = name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
        return image, self.labels[index]

    def subset(self, indices) -> ImageTensorDataset:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageTensorDataset(self.images[indices], self.labels[indices], self.num_classes, self.name)


def as_image_dataset(dataset, name: str = "dataset", num_classes: int | None = None) -> ImageTensorDataset:
    """Any map-style dataset of `(image, label)` pairs as an `ImageTensorDataset` (read once, into memory).

    Images may be tensors (C, H, W) or (H, W), float in [0, 1] or uint8 in 0..255, or PIL images (a torchvision
    dataset without a transform); labels integers. The number of classes is `num_classes`, else the length of
    the dataset's `classes` attribute (torchvision), else the largest label + 1. A `DataLoader` or an
    iterable-style dataset is refused: the methods batch and shuffle the examples themselves.
    """
    from torch.utils.data import DataLoader, IterableDataset, TensorDataset

    if isinstance(dataset, ImageTensorDataset):
        return dataset
    if isinstance(dataset, DataLoader):
        raise DataError(
            f"the {name} set is a DataLoader; pass its dataset (loader.dataset): the methods batch and shuffle "
            "the examples themselves"
        )
    if (
        isinstance(dataset, IterableDataset)
        or not hasattr(dataset, "__getitem__")
        or not hasattr(dataset, "__len__")
    ):
        raise DataError(
            f"the {name} set must be a map-style dataset of (image, label) pairs (with __len__ and "
            f"__getitem__), got a {type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise DataError(f"the {name} set is empty")
    tensors = dataset.tensors if isinstance(dataset, TensorDataset) else ()
    if len(tensors) == 2 and tensors[0].dim() in (3, 4) and tensors[1].dim() == 1:
        stacked, labels = tensors  # read as a whole, checked as the items would be
        stacked = stacked.unsqueeze(1) if stacked.dim() == 3 else stacked
        _image_tensor(stacked[0], 0, name)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            _label(labels[0], 0, name)
        labels = labels.tolist()
    else:
        images, labels = [], []
        for index in range(len(dataset)):
            item = dataset[index]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise DataError(
                    f"item {index} of the {name} set is a {type(item).__name__}, not an (image, label) pair"
                )
            images.append(_image_tensor(item[0], index, name))
            labels.append(_label(item[1], index, name))
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:
            raise DataError(
                f"the images of the {name} set differ in shape ({sorted(shapes)[:2]}); resize them to one size"
            )
        dtypes = {image.dtype for image in images}
        if len(dtypes) > 1:
            raise DataError(f"the images of the {name} set mix dtypes {sorted(map(str, dtypes))}; use one")
        stacked = torch.stack(images)
    if stacked.is_floating_point():
        low, high = float(stacked.min()), float(stacked.max())
        if low < 0 or high > 1 or not np.isfinite([low, high]).all():
            raise DataError(
                f"the {name} set's images range over [{low:.3g}, {high:.3g}]; give float images in [0, 1] (or "
                "uint8): normalisation is the model's (unlearn.wrap_classifier(module, n, mean=..., std=...))"
            )
        stacked = stacked.float()
    label_tensor = torch.tensor(labels, dtype=torch.long)
    if int(label_tensor.min()) < 0:
        raise DataError(f"the {name} set has a negative label ({int(label_tensor.min())})")
    if num_classes is None:
        classes = getattr(dataset, "classes", None)
        num_classes = len(classes) if isinstance(classes, (list, tuple)) and classes else None
    num_classes = num_classes or int(label_tensor.max()) + 1
    if int(label_tensor.max()) >= num_classes:
        raise DataError(
            f"the {name} set has label {int(label_tensor.max())}, out of range for {num_classes} classes"
        )
    return ImageTensorDataset(stacked, label_tensor, num_classes, name)


def _image_tensor(image, index: int, name: str) -> torch.Tensor:
    """One dataset image as a (C, H, W) tensor (uint8 or float)."""
    if not isinstance(image, torch.Tensor):
        if hasattr(image, "getbands"):  # a PIL image
            from torchvision.transforms.functional import pil_to_tensor

            image = pil_to_tensor(image)
        elif isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image))
        else:
            raise DataError(
                f"image {index} of the {name} set is a {type(image).__name__}; give tensors, arrays or PIL "
                "images"
            )
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3:
        raise DataError(
            f"image {index} of the {name} set has shape {tuple(image.shape)}; give (C, H, W) or (H, W) images"
        )
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise DataError(f"image {index} of the {name} set is {image.dtype}; give float in [0, 1] or uint8")
    return image


def _label(label, index: int, name: str) -> int:
    if (
        isinstance(label, torch.Tensor)
        and label.numel() == 1
        and not label.is_floating_point()
        and label.dtype != torch.bool
    ):
        return int(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        return int(label)
    raise DataError(
        f"label {index} of the {name} set is {label!r}; give integer class ids (not one-hot or float labels)"
    )


def load_dataset(
    name: str, split: str, root: str | None = None, download: bool = False, image_size: int | None = None
) -> ImageTensorDataset:
    """Load `split` ("train" or "test") of a dataset.

    Args:
        name: one of `DATASETS`.
        split: "train" or "test".
        root: where torchvision datasets and image folders live (not needed for digits).
        download: let torchvision download the data; never done unless asked.
        image_size: resize image folders to this square size.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        return _digits(split)
    if name == "digits_canvas":
        return _digits_canvas(split)
    if name in ("cifar10", "cifar100", "svhn"):
        return _torchvision(name, split, root, download)
    if name == "imagefolder":
        return _imagefolder(split, root, image_size)
    raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def _digits_canvas(split: str) -> ImageTensorDataset:
    """The digits × styles world's images: each digit of the digits `split` drawn at 16x16 in each of the five
    styles (`worlds.canvas_text`); labels are (digit, style) combination ids, digit × 5 + style."""
    from .worlds.canvas_text import STYLES, combination, stylize

    digits = _digits(split)
    images = torch.cat([stylize(digits.images, style) for style in STYLES])
    labels = torch.cat([combination(digits.labels, index) for index in range(len(STYLES))])
    return ImageTensorDataset(images, labels, num_classes=10 * len(STYLES), name="digits_canvas")


def _digits(split: str) -> ImageTensorDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0-16), split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    indices = np.arange(len(images))
    train_idx, test_idx = train_test_split(
        indices, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=digits.target
    )
    chosen = np.sort(train_idx if split == "train" else test_idx)
    x = torch.from_numpy(images[chosen]).unsqueeze(1)
    y = torch.from_numpy(digits.target[chosen])
    return ImageTensorDataset(x, y, num_classes=10, name="digits")


def _torchvision(name: str, split: str, root: str | None, download: bool) -> ImageTensorDataset:
    import torchvision

    if root is None:
        raise DataError(f"dataset {name!r} needs data.root (a folder holding it, or where to download it)")
    train = split == "train"
    # torchvision hashes these files before it reads them: a FIFO or a device among them would block forever
    base = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}.get(name)
    files = sorted((Path(root) / base).glob("*")) if base else [Path(root) / f"{split}_32x32.mat"]
    for file in files:
        if file.exists() and not file.is_file() and not file.is_dir():
            raise DataError(
                f"{str(file)!r} of dataset {name} is not a regular file (a FIFO, device or socket); remove it"
            )
    try:
        if name == "cifar10":
            ds = torchvision.datasets.CIFAR10(root, train=train, download=download)
            images, labels, classes = ds.data, ds.targets, 10
        elif name == "cifar100":
            ds = torchvision.datasets.CIFAR100(root, train=train, download=download)
            images, labels, classes = ds.data, ds.targets, 100
        else:
            ds = torchvision.datasets.SVHN(root, split=split, download=download)
            images, labels, classes = ds.data.transpose(0, 2, 3, 1), ds.labels, 10
    except (
        RuntimeError
    ) as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise CheckpointNotFoundError(
            f"{name} not found under {root!r}; set data.download=true to download it"
        ) from err
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return ImageTensorDataset(x, torch.as_tensor(np.asarray(labels)), num_classes=classes, name=name)


def _imagefolder(split: str, root: str | None, image_size: int | None) -> ImageTensorDataset:
    """`root/train/<class>/*.png` and `root/test/<class>/*.png`, classes sorted by folder name."""
    import torchvision
    from torchvision import transforms

    if root is None:
        raise DataError("dataset 'imagefolder' needs data.root")
    folder = Path(root) / split
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"image folder {str(folder)!r} does not exist")
    _check_image_files(folder)
    steps = [transforms.Resize((image_size, image_size))] if image_size else []
    steps.append(transforms.PILToTensor())
    try:
        ds = torchvision.datasets.ImageFolder(str(folder), transform=transforms.Compose(steps))
    except FileNotFoundError as err:  # torchvision: no class folder, or class folders without images
        raise DataError(
            f"image folder {str(folder)!r} holds no images in class subfolders ({err}); put the images of each "
            "class in a subfolder of their own (<class>/*.png)"
        ) from err
    if len(ds) == 0:
        raise DataError(
            f"image folder {str(folder)!r} holds no images; put the images of each class in a subfolder of "
            "their own (<class>/*.png)"
        )
    # Class ids come from train/'s class folders for both splits: a test/ that lacks a class folder must not
    # shift the ids of the classes after it.
    classes, targets = ds.classes, list(ds.targets)
    train_folder = Path(root) / "train"
    if split == "test" and train_folder.is_dir():
        try:
            classes = torchvision.datasets.folder.find_classes(str(train_folder))[0]
        except FileNotFoundError as err:
            raise DataError(f"image folder {str(train_folder)!r} holds no class subfolders") from err
        unknown = sorted(set(ds.classes) - set(classes))
        if unknown:
            raise DataError(
                f"class folders {unknown} of {str(folder)!r} have no match under {str(train_folder)!r}"
            )
        targets = [classes.index(ds.classes[t]) for t in targets]
    try:
        images = torch.stack([_read_image(ds, i) for i in range(len(ds))])
    except RuntimeError as err:  # images of different sizes
        raise DataError(f"images under {str(folder)!r} differ in size; set data.image_size ({err})") from err
    return ImageTensorDataset(images, torch.as_tensor(targets), num_classes=len(classes), name="imagefolder")


def _check_image_files(folder: Path) -> None:
    """Refuse, before any is opened, a class folder entry that is not an image file: a FIFO or a device (reading
    it would block or never end), or a file whose name is not an image's (torchvision would skip it silently,
    and with it data the user meant to use). Hidden files (`.DS_Store`) are ignored, as torchvision does."""
    import os
    import stat

    from torchvision.datasets.folder import IMG_EXTENSIONS

    inside = folder.resolve()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs:  # torchvision follows symlinked folders: one must not loop or lead elsewhere
            link = Path(root) / name
            if link.is_symlink():
                target, parent = link.resolve(), link.parent.resolve()
                if target == parent or target in parent.parents:
                    problem = "loops back to a folder that contains it"
                elif inside not in target.parents:
                    problem = "leads outside the image folder"
                else:
                    continue  # a folder of the dataset, walked where it lies
                raise DataError(
                    f"{str(link)!r} is a symlink that {problem}; replace it with the folder it means"
                )
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            try:
                mode = os.stat(path).st_mode
            except OSError as err:
                raise DataError(
                    f"image {str(path)!r} cannot be read ({err.strerror or err}); fix or remove it"
                ) from None
            if not stat.S_ISREG(mode):
                raise DataError(
                    f"{str(path)!r} in the image folder is not a regular file (a FIFO, device or socket); "
                    "remove it"
                )
            if Path(root) == folder:
                continue  # files beside the class folders are not part of the dataset
            if not name.lower().endswith(IMG_EXTENSIONS):
                raise DataError(
                    f"{str(path)!r} in the image folder is not an image file (expected one of "
                    f"{', '.join(IMG_EXTENSIONS)}); remove it or move it out of the folder"
                )


def _read_image(ds, index: int) -> torch.Tensor:
    """Image `index` of a torchvision `ImageFolder`, or one sentence naming the file that is not an image."""
    from PIL import Image

    path = ds.samples[index][0]
    try:
        return ds[index][0]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # OSError: PIL.UnidentifiedImageError (not an image), a truncated file; DecompressionBombError: an image
        # that declares more pixels than PIL will decode
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"image {path!r} cannot be read ({reason}); fix or remove it") from err


class CaptionedDataset(Dataset):
    """Images paired with captions of their class: `(image, caption)`, for text-to-image training.

    Each image gets one caption, `captions[label][k]`, with `k` drawn once at construction from a generator
    seeded with `seed`; the dataset is thus a fixed list of pairs, and the same seed gives the same pairs.

    Args:
        dataset: an `ImageTensorDataset` (its `.labels` choose the captions).
        captions: the captions of each class id.
        seed: seed of the caption draw.
    """

    def __init__(self, dataset: ImageTensorDataset, captions: dict[int, list[str]], seed: int = 0):
        missing = sorted({int(y) for y in dataset.labels.tolist()} - {k for k, v in captions.items() if v})
        if missing:
            raise DataError(f"no captions for class ids {missing}")
        self.dataset = dataset
        self.labels = dataset.labels
        self.captions = captions
        generator = torch.Generator().manual_seed(seed)
        draws = torch.rand(len(dataset), generator=generator)
        self.texts = [
            captions[int(y)][int(u * len(captions[int(y)]))] for y, u in zip(dataset.labels.tolist(), draws)
        ]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index][0], self.texts[index]
