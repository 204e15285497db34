"""Image data: the embedded Animal-MNIST task written as an image folder, and the splits.

Every dataset, embedded or the user's, is an image folder (one sub-folder per class, the layout
of torchvision's ImageFolder), decoded and resized once per search into uint8 tensors; training
then indexes tensors, which on CPU is far faster than re-decoding files every epoch. Each file's
split comes from a hash of its path, so adding images to a folder moves no other image.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.config import DataConfig

__all__ = [
    "DataError", "ANIMAL_MNIST_CLASSES", "Splits", "prepare_animal_mnist", "load_data", "list_images", "decode_image_file",
    "batches", "num_batches", "normalize", "folder_fingerprint", "BACKGROUND", "AUGMENTS", "random_resized_crop",
]

# Class order as the animal-mnist package documents its labels 0..9.
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKGROUND = 255  # transparent pixels become white, as on a page


class DataError(ValueError):
    """The image folder cannot be split as configured."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, N x 3 x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return Split(images=self.images.to(device), labels=self.labels.to(device))


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    skipped: tuple[str, ...] = ()  # unreadable files left out: "path (reason)"

    def to(self, device: torch.device | str) -> Splits:
        """Every split on `device` once, so that batches never cross the host-device boundary."""
        return Splits(
            train=self.train.to(device), val=self.val.to(device), test=self.test.to(device), classes=self.classes, skipped=self.skipped
        )


def prepare_animal_mnist(root: str | Path) -> Path:
    """Write the animal-mnist wheel's 10,000 silhouettes as `root/<class>/<index>.png` (idempotent)."""
    import animal_mnist  # installed with --no-deps: its metadata declares tensorflow, which it does not need here
    from PIL import Image

    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    package = Path(animal_mnist.__file__).parent / "data" / "Animal_MNIST"
    with gzip.open(package / "animal_data_version_3.gz", "rb") as f:
        images = pickle.load(f)  # a numpy array shipped in the package wheel, not user input
    with gzip.open(package / "animal_label_version_3.gz", "rb") as f:
        labels = pickle.load(f)
    for name in ANIMAL_MNIST_CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode="L").save(root / ANIMAL_MNIST_CLASSES[int(label)] / f"{index:05d}.png")
    done.touch()
    return root


def folder_fingerprint(root: str | Path) -> str:
    """A digest of every image file under `root` (relative path, size, modification time): any
    image added, removed or rewritten changes it, without reading the images."""
    root = Path(root)
    digest = hashlib.sha1()
    for files in list_images(root).values():
        for path in files:
            stat = path.stat()
            digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_images(root: str | Path) -> dict[str, list[Path]]:
    """Class name -> its files (any depth below the class folder), hidden folders and files left
    out (`.ipynb_checkpoints`, `.DS_Store`); classes and files in sorted order."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    return {name: sorted(p for p in (root / name).rglob("*") if p.is_file() and not _hidden(p, root)) for name in classes}


def decode_image_file(path: str | Path, *, size: int) -> torch.Tensor:
    """One image file as uint8 3 x size x size RGB, read by PIL with each mode converted
    explicitly: 16-bit images are scaled to 8 bits (PIL's own `convert("RGB")` clips them to
    white), transparent pixels (RGBA, LA, palette transparency) are composited onto white
    (`BACKGROUND`), CMYK, palette and grayscale become RGB. Raises for a truncated, empty or
    non-image file. (torchvision's PNG decoder prints libpng's complaints about a corrupt file to
    the process's stderr, so it is not used.)"""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I;16") or image.mode == "I":
            scaled = (np.asarray(image, dtype=np.float64) / 65535.0 * 255.0).round().clip(0, 255).astype(np.uint8)
            image = Image.fromarray(scaled, mode="L")
        elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (BACKGROUND,) * 3 + (255,)), rgba).convert("RGB")
        elif image.mode != "L":
            image = image.convert("RGB")
        pixels = np.array(image.resize((size, size), Image.Resampling.BILINEAR))  # antialiased when shrinking
    tensor = torch.from_numpy(pixels)
    return tensor.expand(3, -1, -1).contiguous() if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def _unit(*key: object) -> float:
    """A number in [0, 1) fixed by `key`: the same for a file whatever else is in the folder."""
    return int.from_bytes(hashlib.sha1("\0".join(map(str, key)).encode()).digest()[:8], "big") / 2**64


def _assign(files: list[str], config: DataConfig) -> dict[str, list[str]]:
    """One class's files (relative paths) -> train / val / test, each file by a hash of its path:
    adding or removing images moves no other image between splits. A split the thresholds leave
    empty takes the train file nearest to it (tiny classes still get one val and one test image)."""
    position = {f: _unit("split", config.seed, f) for f in files}
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for f in files:
        u = position[f]
        parts["val" if u < config.val_fraction else "test" if u < config.val_fraction + config.test_fraction else "train"].append(f)
    for name in ("val", "test"):
        if not parts[name] and len(parts["train"]) > 1:
            nearest = min(parts["train"], key=position.__getitem__)
            parts["train"].remove(nearest)
            parts[name].append(nearest)
    return parts


@functools.lru_cache(maxsize=2)
def load_data(config: DataConfig) -> Splits:
    """Decode the image folder at `config.path` (one sub-folder per class) into train / val / test.

    Unreadable files (truncated, empty, not an image) are skipped and listed in `Splits.skipped`,
    or, with `config.on_bad_file == "error"`, raise a DataError naming them."""
    root = Path(config.path)
    if not root.is_dir():
        raise DataError(f"data.path: folder {config.path!r} does not exist")
    listing = list_images(root)
    if len(listing) < 2:
        raise DataError(f"data.path: {config.path} needs at least two class sub-folders, found {len(listing)}")
    if config.max_images_per_class is not None:  # the same images whatever else is in the folder
        listing = {name: sorted(files, key=lambda f: _unit("keep", config.seed, f.relative_to(root).as_posix()))[: config.max_images_per_class]
                   for name, files in listing.items()}  # fmt: skip
    decoded: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for files in listing.values():
        for path in files:
            relative = path.relative_to(root).as_posix()
            try:
                decoded[relative] = decode_image_file(path, size=config.image_size)
            except Exception as error:  # the decoders' errors differ per format; all mean "not a readable image"
                skipped.append(f"{relative} ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else 'unreadable'})")
    if skipped and config.on_bad_file == "error":
        more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
        raise DataError(f"data.path: unreadable file {skipped[0]}{more}; remove them or set data.on_bad_file: skip")
    classes = tuple(listing)
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for label, (name, files) in enumerate(listing.items()):
        readable = sorted(r for r in (f.relative_to(root).as_posix() for f in files) if r in decoded)
        assigned = _assign(readable, config)
        if not all(assigned.values()):
            raise DataError(
                f"data.path: class {name!r} in {config.path} has {len(readable)} readable image(s);"
                " need at least 3 (one each for train, val and test)"
            )
        for split, chosen in assigned.items():
            parts[split] += [(f, label) for f in sorted(chosen)]

    def stack(entries: list[tuple[str, int]]) -> Split:
        return Split(
            images=torch.stack([decoded[f] for f, _ in entries]).contiguous(),
            labels=torch.tensor([label for _, label in entries], dtype=torch.int64),
        )

    return Splits(**{name: stack(entries) for name, entries in parts.items()}, classes=classes, skipped=tuple(skipped))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> ImageNet-normalised float, channels_last (about 2x faster on CPU), on the images' device."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def _batch_bounds(images: int, batch_size: int) -> list[int]:
    bounds = [*range(0, images, batch_size), images]
    if batch_size > 1 and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return bounds


def num_batches(images: int, *, batch_size: int) -> int:
    """How many batches `batches` yields for a split of `images` images."""
    return len(_batch_bounds(images, batch_size)) - 1


# Random-resized-crop of `augment: crop_flip`: the area fraction kept and the aspect ratio range.
# ImageNet's 0.08 lower bound cuts most of a 64 px object away; a third of it still shows the object.
CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
AUGMENTS = ("none", "flip", "crop_flip")


def _crop_boxes(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """n random-resized-crop boxes (top, left, h, w) as torchvision's RandomResizedCrop draws them
    (area fraction in CROP_SCALE, log-uniform aspect ratio in CROP_RATIO), but from `generator`,
    with a fixed 4 draws per image (the box is clamped to the image instead of retried)."""
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    area = height * width * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[:, 0])
    low, high = torch.log(torch.tensor(CROP_RATIO, dtype=torch.float64))
    aspect = torch.exp(low + (high - low) * u[:, 1])
    w = torch.sqrt(area * aspect).round().clamp(1, width)
    h = torch.sqrt(area / aspect).round().clamp(1, height)
    top = ((height - h + 1) * u[:, 2]).floor().clamp(max=height - h)
    left = ((width - w + 1) * u[:, 3]).floor().clamp(max=width - w)
    return torch.stack([top, left, h, w], dim=1).long()


def random_resized_crop(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each uint8 image of N x 3 x H x W cropped at its own random box and resized back to H x W
    (torchvision.transforms.v2's resized_crop, antialiased bilinear), on the images' device."""
    from torchvision.transforms.v2 import functional as TF

    height, width = images.shape[-2:]
    boxes = _crop_boxes(len(images), height, width, generator).tolist()
    return torch.stack([TF.resized_crop(image, t, l, h, w, size=[height, width], antialias=True) for image, (t, l, h, w) in zip(images, boxes)])


def batches(
    split: Split,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augment: str = "none",
    views: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (images, labels, indices into the split), all on the split's device. The order comes
    from a CPU generator seeded by `seed`: the same on every device.

    `augment` (`AUGMENTS`): flip mirrors a random half of each
    batch; crop_flip first crops each image at its own random box and resizes it back
    (`random_resized_crop`), then flips. Drawn from the same generator: a batch's augmentation is
    fixed by `seed`. `views` (with flip only): the yielded index is the row of each image's view in
    a view-major table of per-view values: i for image i as it is, len(split) + i for its mirror
    (e.g. `torch.cat([teacher logits, teacher logits of the mirrors])`).

    A last batch of one image joins the one before (`num_batches`): train-mode BatchNorm cannot
    normalise a single image's 1 x 1 feature maps, which small inputs reach."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if views and augment != "flip":
        raise ValueError(f"views need augment 'flip' (an image has a fixed set of views only then), got {augment!r}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
    device = split.images.device
    bounds = _batch_bounds(len(order), batch_size)
    for start, stop in zip(bounds, bounds[1:]):
        index = order[start:stop].to(device)
        images, labels = split.images[index], split.labels[index]
        if augment == "crop_flip":
            images = random_resized_crop(images, generator)
        if augment != "none":
            mirrored = (torch.rand(len(index), generator=generator) < 0.5).to(device)
            images = torch.where(mirrored.view(-1, 1, 1, 1), images.flip(-1), images)
            if views:
                index = index + len(split) * mirrored.long()
        yield normalize(images), labels, index
