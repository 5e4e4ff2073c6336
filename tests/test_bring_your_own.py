"""Bring your own model and data: raw objects a library user already has go into any method and
`unlearn.evaluate`, and every mistake with them gets one typed sentence."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import unlearn
from unlearn.errors import CheckpointError, ConfigError, DataError

CLASSIFIER_METHODS = ("retrain", "finetune", "grad_ascent", "random_label", "salun", "l1_sparse", "laf")


class MyNet(nn.Module):
    """A user's classifier: no adapter, no toolkit base class."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10)

    def forward(self, x):
        return self.fc(self.conv(x).relu().flatten(1))


@pytest.fixture(scope="module")
def tensor_data():
    """The digits splits as plain `TensorDataset`s (what a user has)."""
    train, test = unlearn.load_dataset("digits", "train"), unlearn.load_dataset("digits", "test")
    return TensorDataset(train.images, train.labels), TensorDataset(test.images, test.labels)


def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def small(name: str, family: str | None = None):
    """The method `name` at its smallest budget (one epoch or step)."""
    cls = unlearn.get_method(name, family)
    budget = {
        k: 1 for k in ("epochs", "steps", "unlearn_epochs", "vae_epochs") if k in cls.__dataclass_fields__
    }
    return cls(**budget)


# -- classifiers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSIFIER_METHODS)
def test_every_classifier_method_takes_a_raw_module(name, tensor_data, one_thread):
    torch.manual_seed(0)
    net = MyNet()
    data = unlearn.forget_classes(*tensor_data, [3])
    model = small(name).unlearn(net, data, accelerator())
    assert isinstance(model, unlearn.Classifier)
    assert model.network is net  # wrapped, not copied: the user's module is the network
    scores = unlearn.evaluate(model, data)
    assert 0 <= scores["UA"] <= 100


def test_evaluate_takes_a_raw_module_and_the_wrapper_feeds_images_unchanged(tensor_data, one_thread):
    torch.manual_seed(0)
    net = MyNet().eval()
    data = unlearn.forget_classes(*tensor_data, [3])
    scores = unlearn.evaluate(net, data)
    images, labels = data.test.images.float(), data.test.labels
    with torch.no_grad():
        accuracy = (net(images).argmax(1) == labels).float().mean().item() * 100
        assert torch.equal(unlearn.wrap_classifier(net, 10)(images), net(images))
    assert scores["TA"] == pytest.approx(accuracy, abs=1e-3)


def test_wrap_finds_head_and_features():
    net = MyNet()
    model = unlearn.wrap_classifier(net, 10)
    assert model.head is net.fc and model.channels == 1
    assert model.features(torch.rand(2, 1, 8, 8)).shape == (2, 4 * 64)
    named = unlearn.wrap_classifier(net, 10, head="fc")
    assert named.head is net.fc


def test_a_custom_architecture_reloads_with_module(tmp_path, one_thread):
    model = unlearn.wrap_classifier(MyNet(), 10, mean=(0.5,), std=(0.25,), image_size=8)
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "unlearn_model.json").read_text())
    assert config["format"] == "module" and config["arch"].endswith("MyNet")
    with pytest.raises(CheckpointError, match=r"load_model\(folder, module="):
        unlearn.load_model(tmp_path / "m")
    again = unlearn.load_model(tmp_path / "m", module=MyNet())
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model.eval()(x), again.eval()(x))
    assert again.image_size == 8 and again.source["format"] == "module"
    with pytest.raises(ConfigError, match="module must be a torch.nn.Module"):
        unlearn.load_model(tmp_path / "m", module="MyNet")


def test_image_size_survives_save_and_load(tmp_path, one_thread):
    from unlearn.models import build_classifier

    torch.manual_seed(0)
    resnet = build_classifier("torchvision:resnet18", 10)
    resnet.image_size = 32
    resnet.save(tmp_path / "r")
    again = unlearn.load_model(tmp_path / "r")
    assert again.image_size == 32
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(resnet.eval()(x), again.eval()(x))


def test_module_reloads_a_builtin_folder_as_builtin(tmp_path):
    from unlearn.models import build_classifier
    from unlearn.models.zoo import ARCHITECTURES

    model = build_classifier("digits_cnn", 10)
    model.save(tmp_path / "b")
    again = unlearn.load_model(tmp_path / "b", module=ARCHITECTURES["digits_cnn"][0](10, 1))
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model.eval()(x), again.eval()(x))
    assert again.source["format"] == "builtin" and again.source["arch"] == "digits_cnn"


# -- datasets ------------------------------------------------------------------------------------------------


def test_map_style_datasets_build_tasks(tensor_data):
    train, test = tensor_data
    task = unlearn.forget_classes(train, test, [3])
    assert task.num_classes == 10 and len(task.forget) == int((train.tensors[1] == 3).sum())
    random = unlearn.forget_fraction(train, test, 0.1, seed=0)
    assert len(random.forget) == round(0.1 * len(train))
    assert torch.equal(train.tensors[0], unlearn.load_dataset("digits", "train").images)  # input untouched


def test_a_torchvision_style_dataset_with_pil_images_and_classes():
    from PIL import Image

    class Folder(torch.utils.data.Dataset):
        classes = ["cat", "dog", "bird"]

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return Image.new("RGB", (4, 4), color=(i * 40, 0, 0)), i % 2

    dataset = unlearn.as_image_dataset(Folder())
    assert dataset.num_classes == 3 and dataset.images.dtype == torch.uint8
    assert dataset.images.shape == (6, 3, 4, 4)
    assert dataset[1][0].max() <= 1.0


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1, 8, 8), 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: DataLoader(t, batch_size=4), r"is a DataLoader; pass its dataset \(loader.dataset\)"),
        (lambda t: Stream(), "must be a map-style dataset"),
        (lambda t: TensorDataset(t.tensors[0] * 2 - 1, t.tensors[1]), r"give float images in \[0, 1\]"),
        (lambda t: TensorDataset(t.tensors[0], t.tensors[1].float()), "give integer class ids"),
        (lambda t: TensorDataset(t.tensors[0][:0], t.tensors[1][:0]), "is empty"),
        (lambda t: TensorDataset(t.tensors[0][:, None], t.tensors[1]), "give .C, H, W."),
        (lambda t: [1, 2, 3], "not an \\(image, label\\) pair"),
    ],
    ids=["dataloader", "iterable", "normalised", "float_labels", "empty", "4d_images", "not_pairs"],
)
def test_dataset_mistakes_get_one_sentence(make, message, tensor_data):
    train, test = tensor_data
    with pytest.raises(DataError, match=message) as caught:
        unlearn.forget_classes(make(train), test, [3])
    assert "\n" not in str(caught.value)


# -- raw-object mistakes on methods --------------------------------------------------------------------------


def test_model_mistakes_get_one_sentence(tensor_data):
    data = unlearn.forget_classes(*tensor_data, [3])
    cases = [
        (lambda: small("laf").unlearn(nn.Sequential(nn.Flatten(), nn.Linear(64, 7)), data, None), ConfigError,
         r"head=module.<head>"),
        (lambda: small("laf").unlearn(MyNet(), tensor_data[0], None), DataError,
         r"unlearn.forget_classes\(train, test, classes\)"),
        (lambda: small("esd", "diffusion").unlearn(MyNet(), data, None), ConfigError,
         r"pass a diffusers pipeline"),
        (lambda: small("retrain", "gan").unlearn(MyNet(), data, None), ConfigError,
         r"unlearn.GAN\(generator, discriminator"),
        (lambda: small("esd", "diffusion").unlearn(unlearn.wrap_classifier(MyNet(), 10), data, None),
         ConfigError, "'esd' has no classifier variant"),
        (lambda: unlearn.wrap_classifier(MyNet(), 10, head="nope"), ConfigError, "not a submodule"),
        (lambda: unlearn.wrap_classifier("net", 10), ConfigError, "needs a torch.nn.Module"),
        (lambda: unlearn.evaluate(MyNet(), [1, 2]), DataError, "needs the task"),
    ]  # fmt: skip
    for call, kind, message in cases:
        with pytest.raises(kind, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)


# -- diffusion -----------------------------------------------------------------------------------------------


def tiny_pipeline():
    """A text-to-image pipeline built in memory from configs, in pixel space, with the digits tokenizer."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from unlearn.worlds.digits_text import load_digits_tokenizer

    tokenizer = load_digits_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=tokenizer.model_max_length,
        )
    )
    return StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


PROMPTS = dict(forget=["a handwritten digit three"], anchor=["a handwritten digit"])


@pytest.mark.parametrize("name", ["uce", "esd"])
def test_an_in_memory_pipeline_is_erased_from_prompts_alone_and_saved(name, tmp_path, one_thread):
    from diffusers import StableDiffusionPipeline

    pipe = tiny_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    prompts = unlearn.ConceptPrompts("three", retain=["a handwritten digit seven"], **PROMPTS)
    model = small(name, "diffusion").unlearn(pipe, prompts, accelerator())
    assert isinstance(model, unlearn.Diffusion) and model.unet is pipe.unet
    assert any(not torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    model.save(tmp_path / "out")
    nulls = dict(vae=None, safety_checker=None, feature_extractor=None, image_encoder=None)  # saved as null
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out"), **nulls)
    for key, value in model.unet.state_dict().items():
        assert torch.equal(again.unet.state_dict()[key], value), key


def test_a_diffusion_adapter_built_directly_saves(tmp_path):
    pipe = tiny_pipeline()
    model = unlearn.Diffusion(pipe.unet, pipe.scheduler, pipe.text_encoder, pipe.tokenizer)
    model.save(tmp_path / "direct")
    again = unlearn.load_model(tmp_path / "direct", family="diffusion")
    assert again.conditioning == "text"


def test_diffusion_mistakes_get_one_sentence(tensor_data):
    pipe = tiny_pipeline()
    prompts = unlearn.ConceptPrompts("three", **PROMPTS)
    model = unlearn.Diffusion.from_pipeline(pipe)
    digits = unlearn.forget_classes(*tensor_data, [3])
    cases = [
        (lambda: unlearn.get_method("salun")().unlearn(pipe, prompts, None), ConfigError,
         r"unlearn.get_method\('salun', family='diffusion'\) \(SalUnDiffusion\)"),
        (lambda: unlearn.get_method("salun")().unlearn(model, prompts, None), ConfigError,
         r"family='diffusion'"),
        (lambda: small("salun", "diffusion").unlearn(pipe, prompts, None), DataError,
         r"forget_generated_concept"),
        (lambda: small("esd", "diffusion").unlearn(pipe.unet, prompts, None), ConfigError,
         r"cannot take a UNet2DConditionModel"),
        (lambda: small("laf").unlearn(pipe.unet, digits, None), ConfigError, r"pass the whole diffusers pipeline"),
        (lambda: unlearn.evaluate(pipe, prompts), ConfigError, "not on a diffusers pipeline"),
    ]  # fmt: skip
    for call, kind, message in cases:
        with pytest.raises(kind, match=message) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_the_library_names_are_exported():
    for name in ("ImageTensorDataset", "ConceptPrompts", "Diffusion", "GAN", "wrap_classifier",
                 "forget_generated_concept", "as_image_dataset"):  # fmt: skip
        assert name in unlearn.__all__ and getattr(unlearn, name) is not None
