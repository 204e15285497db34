"""The progress callback driven in-process: plain lines when piped, a status line rewritten in
place on a terminal, the ETA, and the state Tune saves for `slimtune resume`."""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from search.progress import Progress, format_eta

CLEAR = "\r\x1b[K"


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _screen(out: str) -> tuple[list[str], str]:
    """What a terminal shows after `out`: the finished lines and the current (bottom) one."""
    lines, current = [], ""
    for part in re.split(r"(\r\x1b\[K|\n)", out):
        if part == CLEAR:
            current = ""
        elif part == "\n":
            lines, current = [*lines, current], ""
        else:
            current += part
    return lines, current


def _trial(trial_id: str, **result) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, last_result=result)


def _final(trial_id: str, val: float, ratio: float) -> SimpleNamespace:
    return _trial(
        trial_id, final=True, val_accuracy=val, test_accuracy=val - 0.05, val_balanced_accuracy=val - 0.1,
        test_balanced_accuracy=val - 0.15, macs=ratio * 6e6, macs_ratio=ratio, proxy_accuracy=0.3, epoch=4,
    )


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the status line is cut to the terminal's width


def _progress(tty: bool, total: int = 8, metric: str = "accuracy", concurrency: int = 2) -> tuple[Progress, Stream, Clock]:
    stream, clock = Stream(tty), Clock()
    progress = Progress(total, lambda line: print(line, file=stream), metric, concurrency=concurrency, stream=stream, clock=clock)
    return progress, stream, clock


def _drive(progress: Progress, clock: Clock) -> None:
    """Trials a-f, two at a time: a, b, c finish (c is dominated by a), d is stopped by successive
    halving, e fails, f is retried after a lost worker and still runs."""
    steps = [
        (_final("a", 0.9, 0.5), "complete"),
        (_final("b", 0.8, 0.3), "complete"),
        (_trial("d", epoch=1, val_accuracy=0.4, macs_ratio=0.2), "complete"),
        (_trial("e", failed=True, epoch=2), "complete"),
        (_final("c", 0.7, 0.6), "complete"),
    ]
    for trial, _ in steps:
        progress.on_trial_start(0, [], trial)
        clock.now += 5
        progress.on_trial_result(0, [], trial, trial.last_result)
        clock.now += 5
        progress.on_trial_complete(0, [], trial)
    lost = _trial("f", epoch=1)
    progress.on_trial_start(0, [], lost)
    progress.on_trial_recover(0, [], lost)
    progress.on_trial_start(0, [], lost)


def test_piped_output_is_plain_lines_with_counts_and_eta() -> None:
    progress, stream, clock = _progress(tty=False)
    _drive(progress, clock)
    progress.on_experiment_end([])
    out = stream.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    # 10 s per trial, one at a time here: the ETA spreads the 10 s of each trial left over 2 slots.
    assert lines[0] == "[1/8] trial a: val acc 0.900, test acc 0.850, 3.00M MACs (0.500x teacher), proxy 0.300, 10 s; 1/8 done, ETA 35s"
    assert lines[2] == "[3/8] trial d: stopped after epoch 1 (val acc 0.400 at 0.200x MACs), 10 s; 3/8 done, ETA 25s"
    assert lines[3] == "[4/8] trial e: FAILED after 10 s (error in MLflow run tag 'error'); 4/8 done, ETA 20s"
    assert "trial f: its process or node was lost after epoch 1; retrying it" in lines[5]
    assert len(lines) == 6


@pytest.mark.parametrize(("metric", "best"), [("accuracy", "best val acc 0.900"), ("balanced_accuracy", "best val bal acc 0.800")])
def test_terminal_keeps_a_status_line_at_the_bottom(metric: str, best: str) -> None:
    progress, stream, clock = _progress(tty=True, metric=metric)
    _drive(progress, clock)
    lines, status = _screen(stream.getvalue())
    # The log lines scroll as they are (the status line is cleared before each), without the piped suffix.
    assert [line.split(":")[0] for line in lines] == ["[1/8] trial a", "[2/8] trial b", "[3/8] trial d", "[4/8] trial e", "[5/8] trial c", "        trial f"]
    assert lines[4].endswith("proxy 0.300, 10 s")
    assert status == f"  5/8 done (3 finished, 1 stopped, 1 failed) · 1 running · {best} · front 2 · ETA 15s"
    progress.on_experiment_end([])
    assert stream.getvalue().endswith(CLEAR) and _screen(stream.getvalue())[1] == ""  # the terminal is left clean


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (200, "  5/8 done (3 finished, 1 stopped, 1 failed) · 1 running · best val acc 0.900 · front 2 · ETA 15s"),
        (80, "  5/8 done · 1 running · best val acc 0.900 · front 2 · ETA 15s"),
        (30, "  5/8 done · 1 running · best"),
    ],
)
def test_a_narrow_terminal_drops_the_breakdown_first(monkeypatch: pytest.MonkeyPatch, columns: int, expected: str) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    progress, stream, clock = _progress(tty=True)
    _drive(progress, clock)
    assert _screen(stream.getvalue())[1] == expected and len(expected) < columns


def test_zero_counts_go_before_the_breakdown() -> None:
    progress, _, clock = _progress(tty=False)
    trial = _final("a", 0.9, 0.5)
    progress.on_trial_start(0, [], trial)
    clock.now += 10
    progress.on_trial_complete(0, [], trial)
    assert progress.status(width=80) == "  1/8 done (1 finished) · 0 running · best val acc 0.900 · front 1 · ETA 35s"


def test_results_redraw_the_status_line_at_most_every_second() -> None:
    progress, stream, clock = _progress(tty=True)
    trial = _trial("a", epoch=1)
    progress.on_trial_start(0, [], trial)
    for _ in range(5):
        clock.now += 0.3
        progress.on_trial_result(0, [], trial, trial.last_result)
    assert stream.getvalue().count(CLEAR) == 2  # on start, then once 1 s had passed
    assert stream.getvalue().endswith("  0/8 done (0 finished, 0 stopped, 0 failed) · 1 running · ETA ?")


def test_verbose_draws_no_status_line_even_on_a_terminal() -> None:
    stream = Stream(tty=True)
    progress = Progress(4, lambda line: print(line, file=stream), stream=stream, verbose=True)
    progress.on_trial_start(0, [], _final("a", 0.9, 0.5))
    progress.on_trial_complete(0, [], _final("a", 0.9, 0.5))
    assert "\x1b" not in stream.getvalue() and stream.getvalue().endswith("; 1/4 done, ETA 0s\n")


def test_verify_labels_name_the_member_and_seed_not_the_tune_trial() -> None:
    """`verify` names each fine-tune by what it trains again: the trial's config["job"] indexes `labels`."""
    stream, clock = Stream(tty=False), Clock()
    progress = Progress(3, lambda line: print(line, file=stream), labels=["member 0007 seed 1", "member 0007 seed 2", "member 0011 seed 1"], clock=clock)
    done, failed, lost = _final("f4d89_00001", 0.9, 0.5), _trial("f4d89_00002", failed=True), _trial("f4d89_00000", epoch=1)
    for trial, job in ((done, 1), (failed, 2), (lost, 0)):
        trial.config = {"job": job}
        progress.on_trial_start(0, [], trial)
        clock.now += 10
    progress.on_trial_complete(0, [], done)
    progress.on_trial_complete(0, [], failed)
    progress.on_trial_recover(0, [], lost)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[1/3] member 0007 seed 2: val acc 0.900, test acc 0.850, 3.00M MACs")
    assert lines[1].startswith("[2/3] member 0011 seed 1: FAILED after 20 s")
    assert lines[2].startswith("        member 0007 seed 1: its process or node was lost after epoch 1")
    assert "f4d89" not in stream.getvalue() and "trial" not in stream.getvalue()


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (41.4, "41s"), (190, "3m10s"), (3599, "59m59s"), (3900, "1h05m")])
def test_format_eta(seconds: float, text: str) -> None:
    assert format_eta(seconds) == text


@pytest.mark.parametrize(
    ("concurrency", "ended", "running", "expected"),
    [
        (2, [], [], None),  # nothing ended yet: "ETA ?"
        (2, [60], [20], 80),  # 3 left: 40 s for the running one and 2 x 60 s queued, over 2 slots
        (4, [60], [20], 60),  # 4 slots: no faster than one queued trial's 60 s
        (1, [30, 90], [100], 120),  # a trial running past the mean counts 0 s more
    ],
)
def test_eta(concurrency: int, ended: list[float], running: list[float], expected: float | None) -> None:
    progress, _, clock = _progress(tty=False, total=len(ended) + 3, concurrency=concurrency)
    for i, seconds in enumerate(ended):
        trial = _final(f"e{i}", 0.5, 0.5)
        progress.on_trial_start(0, [], trial)
        clock.now += seconds
        progress.on_trial_complete(0, [], trial)
    start = clock.now
    for i, seconds in enumerate(running):
        clock.now = start - seconds
        progress.on_trial_start(0, [], _trial(f"r{i}"))
    clock.now = start
    assert progress.eta() == expected


def test_resume_continues_the_counts_of_a_saved_state() -> None:
    progress, stream, clock = _progress(tty=True)
    _drive(progress, clock)
    restored, stream, clock = _progress(tty=True)
    restored.set_state(progress.get_state())
    restored.on_trial_start(0, [], _trial("g"))
    assert _screen(stream.getvalue())[1] == "  5/8 done (3 finished, 1 stopped, 1 failed) · 1 running · best val acc 0.900 · front 2 · ETA 15s"


def test_set_state_accepts_a_state_that_counted_only_done() -> None:
    progress, stream, clock = _progress(tty=True, total=16)
    progress.set_state({"done": 3})
    trial = _final("a", 0.9, 0.5)
    progress.on_trial_start(0, [], trial)
    clock.now += 10
    progress.on_trial_complete(0, [], trial)
    assert "[4/16] trial a: val acc 0.900" in stream.getvalue()
    assert progress.status() == "  4/16 done (1 finished, 0 stopped, 0 failed, 3 earlier) · 0 running · best val acc 0.900 · front 1 · ETA 1m00s"


@pytest.mark.parametrize("injected", [False, True])
def test_pickles_without_its_stream(tmp_path: Path, injected: bool) -> None:
    """Tune pickles its callbacks with the experiment (`tuner.pkl`): a terminal or file does not pickle."""
    with open(tmp_path / "out.txt", "w") as file:
        progress = Progress(4, print, stream=file if injected else None)
        progress.on_trial_start(0, [], _trial("a"))
        restored = pickle.loads(pickle.dumps(progress))
    assert restored.total == 4 and restored.stream is not file and restored.running == set()
