"""What a search prints while its trials run: one line per trial that ends (finished, stopped by
successive halving, failed) or is retried, and on a terminal one status line at the bottom,
rewritten in place: counts, the best val metric so far, the front's size and an ETA.

Piped or redirected (not a TTY), or with `--verbose` (Ray's own tables write to the same
terminal), there is no status line and no control character: the completion lines carry the
count and the ETA instead. Imports Ray Tune: import this module where Ray is imported already.
"""
from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ray import tune

from search._helpers import format_accuracies, format_count
from search.pareto import Point, pareto_front

__all__ = ["Progress", "progress_callback", "format_eta"]

_CLEAR = "\r\x1b[K"  # to the line's start, erase to its end
_REDRAW_S = 1.0  # on results, redraw at most this often


def format_eta(seconds: float) -> str:
    """41 -> '41s', 190 -> '3m10s', 3900 -> '1h05m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _label(metric: str) -> str:
    return "val bal acc" if metric == "balanced_accuracy" else "val acc"


class Progress(tune.Callback):
    """`total` trials, `concurrency` at a time; `log` prints one line. `stream` (default: the
    current sys.stdout) is where the status line goes, if it is a TTY and not `verbose`. `labels`:
    what the lines call the trial whose `config["job"]` is i (`verify`'s fine-tunes), instead of
    'trial <Tune trial id>'."""

    labels: tuple[str, ...] | None = None  # a class default: a Progress pickled before it existed unpickles without it

    def __init__(
        self,
        total: int,
        log: Callable[[str], None],
        metric: str = "accuracy",
        *,
        concurrency: int = 1,
        stream: TextIO | None = None,
        verbose: bool = False,
        clock: Callable[[], float] = time.time,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.total, self.log, self.metric = total, log, metric
        if labels is not None:
            self.labels = tuple(labels)
        self.concurrency, self.verbose, self.clock = max(1, int(concurrency)), verbose, clock
        self._stream = stream
        self.done = 0  # finished + stopped + failed (+ earlier, from a state that counted only `done`)
        self.finished = self.stopped = self.failed = 0
        self.seconds = 0.0  # wall time of the trials that ended here, for the ETA
        self.timed = 0
        self.points: list[list] = []  # [trial id, val metric, macs ratio] of the finished trials
        self.started: dict[str, float] = {}
        self.running: set[str] = set()
        self._shown = False
        self._drawn_at = -math.inf

    # -- Tune's experiment state: `slimtune resume` continues the counts --------------------------

    def get_state(self) -> dict:
        return {
            "done": self.done,
            "finished": self.finished,
            "stopped": self.stopped,
            "failed": self.failed,
            "seconds": self.seconds,
            "timed": self.timed,
            "points": [list(p) for p in self.points],
        }

    def set_state(self, state: dict) -> None:
        """Also takes the state of a search started before the breakdown existed: only `done`."""
        self.done = int(state["done"])
        self.finished, self.stopped, self.failed = (int(state.get(k, 0)) for k in ("finished", "stopped", "failed"))
        self.seconds, self.timed = float(state.get("seconds", 0.0)), int(state.get("timed", 0))
        self.points = [list(p) for p in state.get("points", [])]

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment: not the terminal
        state = dict(self.__dict__)
        state.update(_stream=None, _shown=False, _drawn_at=-math.inf, running=set())
        return state

    # -- the status line ---------------------------------------------------------------------------

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def live(self) -> bool:
        """Draw the status line: a terminal, and Ray's own output is off."""
        if self.verbose:
            return False
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):  # no isatty, or closed
            return False

    def eta(self) -> float | None:
        """Seconds left: the mean wall time of the trials that ended, for the rest of each running
        trial and for each not started, spread over `concurrency`; None before any trial ended."""
        if not self.timed:
            return None
        left = max(0, self.total - self.done)
        if not left:
            return 0.0
        mean, now = self.seconds / self.timed, self.clock()
        running = [max(0.0, mean - (now - self.started.get(t, now))) for t in self.running][:left]
        queued = left - len(running)
        work = sum(running) + queued * mean
        return max(work / self.concurrency, max(running, default=0.0), mean if queued else 0.0)

    def _eta_text(self) -> str:
        eta = self.eta()
        return "ETA ?" if eta is None else f"ETA {format_eta(eta)}"

    def status(self, width: int | None = None) -> str:
        """E.g. '5/16 done (3 finished, 1 stopped, 1 failed) · 2 running · best val acc 0.934 · front 4 · ETA 3m10s'.

        Longer than `width`: the counts that are 0 go, then the breakdown, then the end of the line."""
        earlier = self.done - self.finished - self.stopped - self.failed  # counted by a state that kept only `done`
        counts = [(self.finished, "finished"), (self.stopped, "stopped"), (self.failed, "failed"), (max(0, earlier), "earlier")]
        rest = [f"{len(self.running)} running"]
        if self.points:
            rest.append(f"best {_label(self.metric)} {max(p[1] for p in self.points):.3f}")
            rest.append(f"front {len(self.front())}")
        if self.done < self.total:
            rest.append(self._eta_text())
        separator = " · "
        try:
            separator.encode(getattr(self.stream, "encoding", None) or "utf-8")
        except (UnicodeEncodeError, LookupError):
            separator = " | "
        done = f"{self.done}/{self.total} done"
        full = ", ".join(f"{n} {what}" for n, what in counts if n or what != "earlier")
        nonzero = ", ".join(f"{n} {what}" for n, what in counts if n)
        for head in (f"{done} ({full})", f"{done} ({nonzero})" if nonzero else done, done):
            line = "  " + separator.join([head, *rest])
            if width is None or len(line) <= width:
                return line
        return line[:width]

    def front(self) -> list[Point]:
        """The Pareto front of the finished trials on (val metric max, MACs ratio min)."""
        return pareto_front([Point(key=str(k), accuracy=float(v), macs=float(m)) for k, v, m in self.points])

    def _draw(self) -> None:
        if not self.live:
            return
        text = self.status(width=max(1, shutil.get_terminal_size().columns - 1))  # never wrap: \r erases only the last line
        self.stream.write(_CLEAR + text)
        self.stream.flush()
        self._shown, self._drawn_at = True, self.clock()

    def _clear(self) -> None:
        if self._shown:
            self.stream.write(_CLEAR)
            self.stream.flush()
            self._shown = False

    def _say(self, line: str) -> None:
        live = self.live
        if live:
            self._clear()
        self.log(line)
        if live:
            self._draw()

    def _name(self, trial: Any) -> str:
        """What the lines call `trial`: its label, else 'trial <Tune trial id>'."""
        job = (getattr(trial, "config", None) or {}).get("job")
        if self.labels is not None and isinstance(job, int) and 0 <= job < len(self.labels):
            return self.labels[job]
        return f"trial {trial.trial_id}"

    def _tick(self) -> None:
        if self.live and self.clock() - self._drawn_at >= _REDRAW_S:
            self._draw()

    # -- Tune's hooks ------------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.started[trial.trial_id] = self.clock()
        self.running.add(trial.trial_id)
        self._draw()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.running.add(trial.trial_id)  # also a retried trial, whichever hooks its restart ran
        self.started.setdefault(trial.trial_id, self.clock())
        self._tick()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._tick()  # the ETA counts down between results

    def _ended(self, trial: Any) -> str:
        """Count the trial's wall time; returns it as text ('41 s')."""
        now = self.clock()
        seconds = now - self.started.pop(trial.trial_id, now)
        self.running.discard(trial.trial_id)
        self.seconds, self.timed = self.seconds + seconds, self.timed + 1
        return f"{seconds:.0f} s"

    def _suffix(self) -> str:
        """Piped: each completion line carries what the status line would show."""
        if self.live:
            return ""
        return f"; {self.done}/{self.total} done" + (f", {self._eta_text()}" if self.done < self.total else "")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        if r.get("failed"):
            self.on_trial_error(iteration, trials, trial)
            return
        elapsed = self._ended(trial)
        self.done += 1
        origin = f", from trial {r['start_from']}" if r.get("start_from") else ""
        if r.get("final"):
            self.finished += 1
            value, ratio = r.get(f"val_{self.metric}"), r.get("macs_ratio")
            if value is not None and ratio is not None and not (math.isnan(value) or math.isnan(ratio)):
                self.points.append([trial.trial_id, float(value), float(ratio)])
            line = (
                f"[{self.done}/{self.total}] {self._name(trial)}: {format_accuracies(r, self.metric)},"
                f" {format_count(r['macs'])} MACs ({r['macs_ratio']:.3f}x teacher),"
                f" proxy {r['proxy_accuracy']:.3f}{origin}, {elapsed}"
            )
        else:
            self.stopped += 1
            line = (
                f"[{self.done}/{self.total}] {self._name(trial)}: stopped after epoch {int(r.get('epoch', 0))}"
                f" ({format_accuracies(r, self.metric, splits=('val',))} at {r.get('macs_ratio', float('nan')):.3f}x MACs), {elapsed}"
            )
        self._say(line + self._suffix())

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        epoch = int(trial.last_result.get("epoch", 0)) if trial.last_result else 0
        self._say(
            f"        {self._name(trial)}: its process or node was lost after epoch {epoch};"
            " retrying it (from its last checkpoint, where it has one)"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        elapsed = self._ended(trial)
        self.done += 1
        self.failed += 1
        self._say(f"[{self.done}/{self.total}] {self._name(trial)}: FAILED after {elapsed} (error in MLflow run tag 'error')" + self._suffix())

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._clear()


def progress_callback(
    total: int,
    log: Callable[[str], None],
    metric: str = "accuracy",
    *,
    concurrency: int = 1,
    verbose: bool = False,
    stream: TextIO | None = None,
    labels: Sequence[str] | None = None,
) -> Progress:
    return Progress(total, log, metric, concurrency=concurrency, verbose=verbose, stream=stream, labels=labels)
