from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipelines.config import DataConfig
from pipelines.data import (
    ANIMAL_MNIST_CLASSES,
    BACKGROUND,
    DataError,
    decode_image_file,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Split,
    batches,
    load_data,
    normalize,
    num_batches,
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


def test_splits_are_disjoint_cover_every_file_and_hold_every_class(folder: Path) -> None:
    splits = load_data(config(folder))
    for split in (splits.train, splits.val, splits.test):
        assert torch.bincount(split.labels, minlength=3).min() >= 1
    ids = [identities(s) for s in (splits.train, splits.val, splits.test)]
    flat = [x for part in ids for x in part]
    assert len(flat) == len(set(flat)) == 30


def test_adding_images_moves_no_other_image_between_splits(folder: Path) -> None:
    before = load_data(config(folder))
    for i in range(PER_CLASS, 3 * PER_CLASS):
        Image.new("RGB", (20, 20), (250, 250, 250)).save(folder / "ant" / f"new{i:02d}.png")
    load_data.cache_clear()
    after = load_data(config(folder))
    old = lambda split: {x for x in identities(split) if x[1] != 250}  # noqa: E731
    assert [old(s) for s in (before.train, before.val, before.test)] == [old(s) for s in (after.train, after.val, after.test)]


def test_split_fractions_hold_on_a_real_folder(animal_mnist: Path) -> None:
    splits = load_data(DataConfig(path=str(animal_mnist), image_size=16, max_images_per_class=300))
    total = len(splits.train) + len(splits.val) + len(splits.test)
    assert total == 3000 and abs(len(splits.val) / total - 0.15) < 0.02 and abs(len(splits.test) / total - 0.30) < 0.02


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
    counts = sum(torch.bincount(s.labels, minlength=3) for s in (splits.train, splits.val, splits.test))
    assert counts.tolist() == [5, 5, 5] and all(torch.bincount(s.labels, minlength=3).min() >= 1 for s in (splits.val, splits.test))


@pytest.mark.parametrize("count", [0, 2])
def test_a_class_with_too_few_images_is_named(tmp_path: Path, count: int) -> None:
    root = tmp_path / "small"
    for name, n in (("big", 10), ("tiny", count)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 20), (i, i, i)).save(root / name / f"{i}.png")
    with pytest.raises(DataError, match=f"class 'tiny' .* has {count} readable image.*need at least 3"):
        load_data(config(root))


def test_hidden_folders_and_files_are_not_classes_or_images(folder: Path) -> None:
    (folder / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (20, 20)).save(folder / ".ipynb_checkpoints" / "x.png")
    (folder / "ant" / ".DS_Store").write_bytes(b"\0\1junk")
    (folder / "ant" / ".cache").mkdir()
    Image.new("RGB", (20, 20)).save(folder / "ant" / ".cache" / "y.png")
    splits = load_data(config(folder))
    assert splits.classes == ("ant", "moth", "zebra") and splits.skipped == ()
    assert len(splits.train) + len(splits.val) + len(splits.test) == 30


@pytest.fixture
def bad_files(folder: Path) -> list[str]:
    good = (folder / "ant" / "00.png").read_bytes()
    (folder / "ant" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "ant" / "empty.jpg").write_bytes(b"")
    (folder / "zebra" / "notes.txt").write_text("not an image")
    return ["ant/empty.jpg", "ant/truncated.png", "zebra/notes.txt"]


def test_unreadable_files_are_skipped_and_listed(folder: Path, bad_files: list[str]) -> None:
    splits = load_data(config(folder))
    assert [entry.split(" ")[0] for entry in splits.skipped] == bad_files
    assert len(splits.train) + len(splits.val) + len(splits.test) == 30


def test_on_bad_file_error_names_the_file(folder: Path, bad_files: list[str]) -> None:
    with pytest.raises(DataError, match="unreadable file ant/empty.jpg .* and 2 more; .*on_bad_file: skip"):
        load_data(config(folder, on_bad_file="error"))


def _decoded(tmp_path: Path, name: str, image: Image.Image, **save) -> torch.Tensor:
    image.save(tmp_path / name, **save)
    return decode_image_file(tmp_path / name, size=8)


def test_16_bit_images_are_scaled_not_saturated(tmp_path: Path) -> None:
    import numpy as np

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    for name in ("ramp.png", "ramp.tif"):  # torchvision's PNG decoder, PIL's TIFF
        x = _decoded(tmp_path, name, Image.fromarray(ramp))
        assert x.dtype == torch.uint8 and x.shape == (3, 8, 8)
        assert 120 < x.float().mean() < 135 and (x == 255).float().mean() < 0.05


@pytest.mark.parametrize("name", ["a.png", "a.webp"])
def test_transparency_is_composited_onto_white(tmp_path: Path, name: str) -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    image.paste((0, 0, 255, 0), (0, 0, 4, 8))  # the left half fully transparent
    x = _decoded(tmp_path, name, image, **({"lossless": True} if name.endswith("webp") else {}))
    assert x[:, :, 0].tolist() == [[BACKGROUND] * 8] * 3 and x[:, :, 7].tolist() == [[255] * 8, [0] * 8, [0] * 8]


MODES = [("CMYK", ".jpg"), ("L", ".jpg"), ("RGB", ".jpg")] + [(m, s) for m in ("L", "P", "RGB") for s in (".png", ".bmp", ".gif")]


@pytest.mark.parametrize(("mode", "suffix"), MODES)
def test_every_colour_mode_decodes_to_the_rgb_pil_sees(tmp_path: Path, mode: str, suffix: str) -> None:
    colour = {"CMYK": (0, 255, 255, 0), "L": 77, "P": 3, "RGB": (10, 200, 30)}[mode]
    image = Image.new(mode, (8, 8), colour)
    if mode == "P":
        image.putpalette([0, 0, 0, 255, 255, 255, 0, 0, 0, 12, 34, 56] * 64)
    image.save(tmp_path / f"x{suffix}")
    with Image.open(tmp_path / f"x{suffix}") as reference:
        expected = torch.tensor(list(reference.convert("RGB").getpixel((4, 4))))
    got = decode_image_file(tmp_path / f"x{suffix}", size=8)[:, 4, 4]
    assert (got.int() - expected.int()).abs().max() <= (6 if suffix == ".jpg" else 0), (got, expected)


def test_batches_flip_normalized_channels_last(folder: Path) -> None:
    split = load_data(config(folder)).train
    # Make images asymmetric left-right so a mirror is detectable.
    images = split.images.clone()
    images[..., :8] = 0
    split = Split(images=images, labels=split.labels)
    seen = []
    flipped = 0
    for x, y, index in batches(split, batch_size=4, shuffle=True, seed=3, augment="flip"):
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
    split = Split(images=torch.zeros(6, 3, 4, 4, dtype=torch.uint8), labels=torch.arange(6))
    got = [(y.tolist(), i.tolist()) for _, y, i in batches(split, batch_size=4)]
    assert got == [([0, 1, 2, 3], [0, 1, 2, 3]), ([4, 5], [4, 5])]


@pytest.mark.parametrize(("images", "batch_size", "sizes"), [(5, 2, [2, 3]), (9, 4, [4, 5]), (8, 4, [4, 4]), (1, 4, [1]), (3, 1, [1, 1, 1])])
def test_a_last_batch_of_one_image_joins_the_one_before(images: int, batch_size: int, sizes: list[int]) -> None:
    """Train-mode BatchNorm cannot normalise one image's 1 x 1 maps: such a batch joins the previous one."""
    split = Split(images=torch.zeros(images, 3, 4, 4, dtype=torch.uint8), labels=torch.arange(images))
    got = list(batches(split, batch_size=batch_size, shuffle=True, seed=1))
    assert [len(y) for _, y, _ in got] == sizes and num_batches(images, batch_size=batch_size) == len(sizes)
    assert sorted(torch.cat([i for _, _, i in got]).tolist()) == list(range(images))


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

