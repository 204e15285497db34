from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from _space_helpers import make_classes


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_classes(tmp_path / "images", "cat", "dog")


@pytest.fixture
def raw(folder: Path) -> dict[str, Any]:
    return {"name": "t", "data": {"path": str(folder)}}
