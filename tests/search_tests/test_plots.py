"""The front's plots (PNG and self-contained HTML) and the per-group width chart, on hand-made runs."""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from search._helpers import format_count
from search.front import SearchFront, select_front
from search.plots import kept_fractions, plot_front_html, plot_search_front, plot_widths
from search.report import front_rows
from search.tracking import RunRecord

SVG = "{http://www.w3.org/2000/svg}"
TEACHER = {"val_accuracy": 0.95, "test_accuracy": 0.94, "val_balanced_accuracy": 0.93, "test_balanced_accuracy": 0.92, "macs": 40e6, "params": 3.5e6}


def _run(trial: str, *, macs: float, val: float, knobs: dict[str, str] | None = None, kept: dict[str, float] | None = None) -> RunRecord:
    metrics = {
        "val_accuracy": val,
        "test_accuracy": val - 0.01,
        "val_balanced_accuracy": val - 0.05,
        "test_balanced_accuracy": val - 0.06,
        "macs": macs,
        "macs_ratio": macs / TEACHER["macs"],
        "params": macs / 10,
        **{f"kept.{group}": fraction for group, fraction in (kept or {}).items()},
    }
    params = {"lr": f"0.00{len(trial)}", "target_macs": str(macs / TEACHER["macs"]), **(knobs or {})}
    return RunRecord(run_id=f"run-{trial}", name=f"trial-{trial}", status="FINISHED", metrics=metrics, params=params, tags={"slimtune.trial_id": trial})


TRIALS = [
    _run("a1", macs=2e6, val=0.60, knobs={"criterion": "l1 <norm> & co"}),
    _run("b22", macs=5e6, val=0.80),
    _run("c333", macs=8e6, val=0.70),  # dominated by b22: off the front; the uniform anchor
    _run("d4444", macs=20e6, val=0.90),
]
ANCHORS = [TRIALS[2]]


def _plot(tmp_path: Path, metric: str = "accuracy") -> tuple[str, dict[str, ET.Element]]:
    """The HTML file's text and its points by trial id (the teacher's under '')."""
    front = front_rows(select_front(TRIALS, metric))
    path = plot_front_html(TRIALS, front, teacher=TEACHER, anchors=ANCHORS, title="tiny <demo> & co", path=tmp_path / "front.html", metric=metric)
    text = path.read_text(encoding="utf-8")
    svg = ET.fromstring(re.search(r"<svg.*</svg>", text, re.S).group(0))
    points = {g.get("data-trial"): g for g in svg.iter(f"{SVG}g") if "point" in g.get("class", "").split()}
    return text, points


def _tooltip(point: ET.Element) -> str:
    return point.find(f"{SVG}title").text


def _x(point: ET.Element) -> float:
    return float(re.match(r"translate\(([-\d.]+) ", point.get("transform")).group(1))


@pytest.mark.parametrize(("metric", "shown"), [("accuracy", "val acc 0.800, test acc 0.790"), ("balanced_accuracy", "val bal acc 0.750 (acc 0.800)")])
def test_html_has_one_tooltip_per_trial_with_its_values_and_knobs(tmp_path: Path, metric: str, shown: str) -> None:
    text, points = _plot(tmp_path, metric)
    assert not re.search(r"<script|\bsrc=|href=|https?://(?!www\.w3\.org/2000/svg)", text)  # nothing fetched
    svg = ET.fromstring(re.search(r"<svg.*</svg>", text, re.S).group(0))
    titles = [t.text for t in svg.iter(f"{SVG}title")]
    for run in TRIALS:
        trial = run.tags["slimtune.trial_id"]
        (mine,) = [t for t in titles if f"trial {trial}:" in t]
        assert f"lr = {run.params['lr']}" in mine and f"params {format_count(run.metrics['params'])}" in mine
    assert shown in _tooltip(points["b22"]) and "MACs 5.00M (0.125 x teacher)" in _tooltip(points["b22"])
    assert _tooltip(points[""]).startswith("dense teacher") and "MACs 40.00M" in _tooltip(points[""])
    assert len(titles) == len(TRIALS) + 1


def test_html_escapes_knobs_and_title(tmp_path: Path) -> None:
    text, points = _plot(tmp_path)
    assert "criterion = l1 &lt;norm&gt; &amp; co" in text and "<norm>" not in text
    assert "tiny &lt;demo&gt; &amp; co" in text
    assert "criterion = l1 <norm> & co" in _tooltip(points["a1"])  # the tooltip reads it back as written


def test_html_marks_front_members_and_anchors(tmp_path: Path) -> None:
    _, points = _plot(tmp_path)
    front = {t for t, g in points.items() if g.get("data-front") == "true"}
    assert front == {"a1", "b22", "d4444"}
    assert all(("front" in g.get("class").split()) == (t in front) for t, g in points.items())
    assert "off the front, uniform anchor" in _tooltip(points["c333"]) and "anchor" in points["c333"].get("class").split()
    assert "on the Pareto front" in _tooltip(points["a1"])


def test_html_x_axis_is_log_scale(tmp_path: Path) -> None:
    _, points = _plot(tmp_path)
    xs = {t: _x(points[t]) for t in ("a1", "b22", "c333", "d4444")}
    assert xs["a1"] < xs["b22"] < xs["c333"] < xs["d4444"] < _x(points[""])  # more MACs, further right
    # 2M -> 5M of 2M -> 20M: log10(2.5) = 0.40 of the way on a log axis, 3/18 = 0.17 on a linear one
    assert (xs["b22"] - xs["a1"]) / (xs["d4444"] - xs["a1"]) == pytest.approx(math.log10(2.5), abs=0.01)


@pytest.mark.parametrize(("suffix", "magic"), [(".html", b"<!DOCTYPE html>"), (".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_plot_search_front_writes_the_format_its_suffix_names(tmp_path: Path, suffix: str, magic: bytes) -> None:
    teacher = RunRecord("t", "teacher", "FINISHED", dict(TEACHER), {}, {})
    search = RunRecord("s", "search", "FINISHED", {}, {}, {})
    front = SearchFront(search, TRIALS, TRIALS, [], select_front(TRIALS), teacher, ANCHORS, None, None)
    path = plot_search_front(front, name="tiny", path=tmp_path / f"front{suffix}")
    assert path.read_bytes().startswith(magic)


@pytest.mark.parametrize(
    "groups",
    [
        ["features.0.0", "features.1.conv.1", "features.2.conv.0.0", "features.2.conv.2", "features.10.conv.0.0", "features.18.0"],  # mobilenet_v2
        ["conv1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2"],  # resnet
    ],
)
def test_width_chart_is_written_with_groups_in_network_order(tmp_path: Path, groups: list[str]) -> None:
    backwards = {g: 1 / (i + 1) for i, g in reversed(list(enumerate(groups)))}  # whatever order the store returns
    run = _run("e5", macs=3e6, val=0.7, kept=backwards)
    assert list(kept_fractions(run)) == groups and kept_fractions(run)[groups[1]] == 0.5
    path = plot_widths(run, path=tmp_path / "widths.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_a_run_without_kept_metrics_has_no_width_chart(tmp_path: Path) -> None:
    run = _run("f6", macs=3e6, val=0.7)  # not finished, or from a search made before kept.<group> was logged
    assert kept_fractions(run) == {}
    with pytest.raises(ValueError, match="trial f6 .*has no kept.<group> metrics"):
        plot_widths(run, path=tmp_path / "widths.png")
    assert not (tmp_path / "widths.png").exists()
