from __future__ import annotations

import os
from pathlib import Path

from search.layout import Layout
from search.space import parse_space

from _space_helpers import make_classes


def _experiment(folder: Path):
    return parse_space({"name": "t", "data": {"path": str(folder)}})


def test_teacher_folder_changes_with_the_data_files_not_only_the_config(tmp_path: Path) -> None:
    folder = make_classes(tmp_path / "images", "cat", "dog")
    (folder / "cat" / "a.png").write_bytes(b"x")
    layout = Layout.at(tmp_path / "runs", "t")
    first = layout.teacher_dir(_experiment(folder))
    assert layout.teacher_dir(_experiment(folder)) == first  # nothing changed: reused
    (folder / "dog" / "b.png").write_bytes(b"y")
    added = layout.teacher_dir(_experiment(folder))
    os.utime(folder / "cat" / "a.png", ns=(1, 1))
    touched = layout.teacher_dir(_experiment(folder))
    assert len({first, added, touched}) == 3
    assert {p.name.rsplit("-", 1)[0] for p in (first, added, touched)} == {first.name.rsplit("-", 1)[0]}  # same config part
