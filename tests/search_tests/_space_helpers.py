"""Shared by the space tests: mutations of a raw space mapping and the one-line error check."""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from search.space import SpaceError, parse_space

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "spaces" / "quickstart.yaml"

DELETE = object()

Mutation = Callable[[Any, Path], Any]


def make_classes(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).mkdir()
    return root


def make_file(path: Path) -> str:
    path.write_text("x")
    return str(path)


def setting(dotted: str, value: Any) -> Mutation:
    """A mutation setting (or, with DELETE, removing) `dotted`, creating mappings on the way."""

    def mutate(raw: Any, tmp_path: Path) -> Any:
        *parents, last = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value(tmp_path) if callable(value) else value
        return raw

    return mutate


def as_root(value: Any) -> Mutation:
    return lambda raw, tmp_path: value


def apply_mutations(raw: dict[str, Any], tmp_path: Path, *mutations: Mutation) -> Any:
    result: Any = copy.deepcopy(raw)
    for mutation in mutations:
        result = mutation(result, tmp_path)
    return result


def assert_space_error(raw: Any, *expected: str) -> SpaceError:
    with pytest.raises(SpaceError) as info:
        parse_space(raw)
    message = str(info.value)
    assert "\n" not in message, message
    for part in expected:
        assert part in message, message
    return info.value
