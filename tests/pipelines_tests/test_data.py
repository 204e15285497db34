from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.config import DataConfig
from pipelines.data import (
    ANIMAL_MNIST_CLASSES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Split,
    batches,
    load_data,
    normalize,
    prepare_animal_mnist,
)

# Created in this (unsorted) order; "moth" is the grayscale class.
CLASSES = {"zebra": "RGB", "ant": "RGB", "moth": "L"}
PER_CLASS = 10


def pixel_value(class_index: int, image_index: int) -> int:
    """A distinct constant grey level per image, so every decoded image can be traced to its file."""
    return 5 + class_index * 80 + image_index * 7


def rgb_of(value: int) -> tuple[int, int, int]:
    return (value, 255 - value, 128)


@pytest.fixture(autouse=True)
def _clear_cache():
    load_data.cache_clear()
    yield
    load_data.cache_clear()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for c, (name, mode) in enumerate(CLASSES.items()):
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            v = pixel_value(c, i)
            color = v if mode == "L" else rgb_of(v)
            Image.new(mode, (20, 20), color).save(root / name / f"{i:02d}.png")
    return root


def config(path: Path, **overrides) -> DataConfig:
    fields = dict(path=str(path), image_size=16, val_fraction=0.2, test_fraction=0.2, max_images_per_class=None, seed=0)
    return DataConfig(**{**fields, **overrides})


def identities(split: Split) -> list[tuple[int, int]]:
    """(label, red value of the top-left pixel) per image: unique per source file."""
    return [(int(label), int(image[0, 0, 0])) for image, label in zip(split.images, split.labels)]


def test_shapes_and_dtypes(folder: Path) -> None:
    splits = load_data(config(folder))
    for split in (splits.train, splits.val, splits.test):
        assert split.images.dtype == torch.uint8
        assert split.images.shape[1:] == (3, 16, 16)
        assert split.labels.dtype == torch.int64
        assert len(split) == split.images.shape[0] == split.labels.shape[0]


def test_class_names_sorted(folder: Path) -> None:
    assert load_data(config(folder)).classes == ("ant", "moth", "zebra")


def test_split_sizes_disjoint_and_covering(folder: Path) -> None:
    splits = load_data(config(folder))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)
    for split, per_class in ((splits.train, 6), (splits.val, 2), (splits.test, 2)):
        assert torch.bincount(split.labels, minlength=3).tolist() == [per_class] * 3
    ids = [identities(s) for s in (splits.train, splits.val, splits.test)]
    flat = [x for part in ids for x in part]
    assert len(set(flat)) == 30
    assert all(set(a).isdisjoint(b) for i, a in enumerate(ids) for b in ids[i + 1 :])


def test_images_decoded_to_their_labels(folder: Path) -> None:
    splits = load_data(config(folder))
    sorted_names = sorted(CLASSES)
    created = list(CLASSES)
    for split in (splits.train, splits.val, splits.test):
        for image, label in zip(split.images, split.labels):
            name = sorted_names[int(label)]
            c = created.index(name)
            value = int(image[0, 0, 0])
            assert value in {pixel_value(c, i) for i in range(PER_CLASS)}
            expected = (value, value, value) if CLASSES[name] == "L" else rgb_of(value)
            # Constant images stay constant through the resize; grayscale becomes 3 equal channels.
            for channel, v in enumerate(expected):
                assert torch.all(image[channel] == v)


def test_deterministic_for_a_seed(folder: Path) -> None:
    first = load_data(config(folder))
    load_data.cache_clear()
    second = load_data(config(folder))
    assert first is not second
    for name in ("train", "val", "test"):
        a, b = getattr(first, name), getattr(second, name)
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)


def test_other_seed_gives_other_split(folder: Path) -> None:
    a = load_data(config(folder, seed=0))
    b = load_data(config(folder, seed=1))
    assert set(identities(a.val)) != set(identities(b.val))
    assert set(identities(a.train)) | set(identities(a.val)) | set(identities(a.test)) == set(
        identities(b.train)
    ) | set(identities(b.val)) | set(identities(b.test))


def test_max_images_per_class_caps_each_class(folder: Path) -> None:
    splits = load_data(config(folder, max_images_per_class=5))
    counts = [torch.bincount(s.labels, minlength=3).tolist() for s in (splits.train, splits.val, splits.test)]
    assert counts == [[3, 3, 3], [1, 1, 1], [1, 1, 1]]


def test_class_with_two_images_raises(tmp_path: Path) -> None:
    root = tmp_path / "small"
    for name, n in (("big", 10), ("tiny", 2)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 20), (i, i, i)).save(root / name / f"{i}.png")
    with pytest.raises(ValueError, match="tiny"):
        load_data(config(root))


def test_batches_flip_normalized_channels_last(folder: Path) -> None:
    split = load_data(config(folder)).train
    # Make images asymmetric left-right so a mirror is detectable.
    images = split.images.clone()
    images[..., :8] = 0
    split = Split(images=images, labels=split.labels)
    seen = []
    flipped = 0
    for x, y, index in batches(split, batch_size=4, shuffle=True, seed=3, flip=True):
        assert x.dtype == torch.float32
        assert x.shape[1:] == (3, 16, 16)
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert not x.is_contiguous()
        assert torch.equal(y, split.labels[index])
        plain, mirrored = normalize(split.images[index]), normalize(split.images[index].flip(-1))
        for k in range(len(index)):
            is_plain = torch.allclose(x[k], plain[k])
            is_mirror = torch.allclose(x[k], mirrored[k])
            assert is_plain != is_mirror
            flipped += is_mirror
        seen += index.tolist()
    assert sorted(seen) == list(range(len(split)))
    assert 0 < flipped < len(split)


def test_normalize_values() -> None:
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    x = normalize(images)
    for c in range(3):
        assert torch.allclose(x[0, c], torch.full((2, 2), (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))


def test_batches_without_shuffle_keep_order() -> None:
    split = Split(images=torch.zeros(5, 3, 4, 4, dtype=torch.uint8), labels=torch.arange(5))
    got = [(y.tolist(), i.tolist()) for _, y, i in batches(split, batch_size=2)]
    assert got == [([0, 1], [0, 1]), ([2, 3], [2, 3]), ([4], [4])]


@pytest.fixture(scope="module")
def animal_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_animal_mnist(tmp_path_factory.mktemp("am") / "am")


def test_prepare_animal_mnist_layout(animal_mnist: Path) -> None:
    folders = sorted(p.name for p in animal_mnist.iterdir() if p.is_dir())
    assert folders == sorted(ANIMAL_MNIST_CLASSES)
    for name in ANIMAL_MNIST_CLASSES:
        assert len(list((animal_mnist / name).glob("*.png"))) == 1000
    with Image.open(next((animal_mnist / "cat").glob("*.png"))) as image:
        assert image.mode == "L"
        assert image.size == (28, 28)


def test_prepare_animal_mnist_is_idempotent(animal_mnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: p.stat().st_mtime_ns for p in animal_mnist.rglob("*")}

    def forbidden(*_args, **_kwargs):
        raise AssertionError("second call re-read or re-wrote the data")

    monkeypatch.setattr(gzip, "open", forbidden)
    monkeypatch.setattr(Image.Image, "save", forbidden)
    assert prepare_animal_mnist(animal_mnist) == animal_mnist
    assert {p: p.stat().st_mtime_ns for p in animal_mnist.rglob("*")} == before

