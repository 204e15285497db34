"""The benchmark tasks: the embedded Animal-MNIST and Fashion-MNIST (Debian's dataset-fashion-mnist)."""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np

from pipelines.data import prepare_animal_mnist

__all__ = ["prepare_fashion_mnist", "prepare_task", "TASKS"]

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
TASKS = ("animal_mnist", "fashion_mnist")


def prepare_fashion_mnist(root: Path, *, per_class: int = 350, counts: dict[str, int] | None = None) -> Path:
    """Write the first `per_class` training images of each class (or `counts[name]` of the classes
    `counts` names) as root/<class>/<index>.png (idempotent).

    The IDX files are parsed directly: Debian's gzip wrapper breaks torchvision's checksum.
    """
    from PIL import Image

    if (root / ".complete").exists():
        return root
    if not FASHION.exists():
        sys.exit("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    wanted = counts if counts is not None else dict.fromkeys(FASHION_CLASSES, per_class)
    written = dict.fromkeys(wanted, 0)
    for index, (image, label) in enumerate(zip(images, labels)):
        name = FASHION_CLASSES[int(label)]
        if name not in wanted or written[name] >= wanted[name]:
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(root / name / f"{index:05d}.png")
        written[name] += 1
    (root / ".complete").touch()
    return root


def prepare_task(task: str, work: Path) -> Path:
    """The ImageFolder root of `task` under `work`."""
    if task == "animal_mnist":
        return prepare_animal_mnist(work / "animal_mnist")
    if task == "fashion_mnist":
        return prepare_fashion_mnist(work / "fashion_mnist")
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
