"""The `slimtune` command line. Heavy imports (torch, Ray, MLflow) happen inside the commands."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from search._helpers import UsageError
from search.report import RUN_COLUMNS  # light: matplotlib and MLflow are imported only when used

EXAMPLES = """examples:
  slimtune search spaces/quickstart.yaml                 # the embedded demo, ~5 min on 2 CPU cores
  slimtune search spaces/quickstart.yaml --smoke-test    # the same pipeline shrunk to about a minute
  slimtune search my_space.yaml --address auto --tracking-uri http://10.0.0.5:5000   # on a Ray cluster
  slimtune resume quickstart                             # continue the newest search that was interrupted or lost its driver
  slimtune pareto quickstart                             # the accuracy-vs-MACs front of the newest finished search
  slimtune runs quickstart --sort val                    # every trial: status, MACs target, accuracies, front
  slimtune fetch quickstart --max-macs 12M -o model/     # the best front model under 12M MACs
  slimtune fetch quickstart --alias knee -o model/       # the registered front model with alias knee
  slimtune verify quickstart --seeds 3                   # train the front again with 2 more seeds; select on the means
  slimtune methods                                       # every criterion, parametrisation, schedule, loss
"""


def _add_search_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--search", default=None, metavar="RUN_ID", help="a search's parent run id (default: the newest finished search)")


def _add_store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=None, metavar="DIR", help="output folder of the search (default: ./slimtune-runs)")
    parser.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow tracking URI (default: sqlite:///DIR/mlflow.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimtune",
        description="Search the accuracy-vs-MACs Pareto front of pruned, distilled versions of a pretrained CNN.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    search = commands.add_parser(
        "search",
        help="run a multi-objective compression search from a space YAML",
        description="Fine-tune the dense teacher once, run the trials (prune -> KD fine-tune -> evaluate -> MACs)"
        " with Ray Tune + Optuna, log everything to MLflow and print the Pareto front.",
        epilog="examples:\n  slimtune search spaces/quickstart.yaml\n  slimtune search spaces/quickstart.yaml --smoke-test --output /tmp/runs\n"
        "  RAY_ADDRESS=auto slimtune search my_space.yaml --num-trials 64 --tracking-uri http://10.0.0.5:5000 --storage s3://bucket/runs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search.add_argument("space", help="search space YAML (see spaces/)")
    search.add_argument("--smoke-test", action="store_true", help="shrink the run to about a minute: tiny data, 1 epoch, 2 trials")
    search.add_argument("--num-trials", type=int, default=None, metavar="N", help="override search.num_trials")
    search.add_argument(
        "--address", default=None, metavar="ADDR", help="join a running Ray cluster: auto or HOST:PORT (or set RAY_ADDRESS); default: a fresh local Ray"
    )
    search.add_argument(
        "--storage", default=None, metavar="URI", help="Ray Tune's storage, which every node must reach (NFS path or s3://...); default: under --output"
    )
    search.add_argument("--resume", action="store_true", help="continue the newest unfinished search of this space's experiment instead (see `resume`)")
    search.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's own output: its start-up logs, the trial workers' output and Tune's status tables"
        " (default: slimtune's progress lines only)",
    )
    _add_store_args(search)

    resume = commands.add_parser(
        "resume",
        help="continue a search that was interrupted (Ctrl-C, SIGTERM) or whose driver was killed",
        description="Continue a search under the same MLflow parent run, Optuna study and Ray Tune experiment:"
        " finished trials are kept (not rerun), interrupted ones continue from their last epoch's checkpoint,"
        " and the search runs on to search.num_trials with the config it was started with."
        " Ray restores its experiment from pickles in its storage: resume only from storage you control.",
        epilog="examples:\n  slimtune resume quickstart\n  slimtune resume quickstart --search 3f2a... --output /tmp/runs\n"
        "  slimtune resume my_space --address auto --tracking-uri http://10.0.0.5:5000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    resume.add_argument("experiment", help="the space's name, which is the MLflow experiment name")
    resume.add_argument("--search", default=None, metavar="RUN_ID", help="the search's parent run id (default: the newest unfinished search)")
    resume.add_argument("--address", default=None, metavar="ADDR", help="join a running Ray cluster: auto or HOST:PORT (default: a fresh local Ray)")
    resume.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's own output: its start-up logs, the trial workers' output and Tune's status tables"
        " (default: slimtune's progress lines only)",
    )
    _add_store_args(resume)

    pareto = commands.add_parser(
        "pareto",
        help="print the Pareto front of an experiment's latest search",
        description="Print the front of the latest search of EXPERIMENT (the space's `name`), read from MLflow.",
        epilog="examples:\n  slimtune pareto quickstart\n  slimtune pareto quickstart --plot front.html   # hover a point for its trial, accuracies, MACs and knobs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pareto.add_argument("experiment", help="the space's name, which is the MLflow experiment name")
    pareto.add_argument(
        "--plot", default=None, metavar="FILE", help="also write the val accuracy vs MACs plot: .html (interactive, self-contained), .png, .svg or .pdf"
    )
    _add_search_arg(pareto)
    _add_store_args(pareto)

    runs = commands.add_parser(
        "runs",
        help="list every trial of a search: status, knobs, accuracies, MACs, front membership",
        description="One line per trial of the newest finished search of EXPERIMENT (or --search): finished, stopped"
        " (by successive halving), failed or killed; what it started from; its MACs target; proxy / val / test"
        " accuracy (and val / test balanced accuracy when it is the search's metric); MACs; params; for front members, the"
        " CPU latency at batch 1 in torch and onnxruntime (ms; batch 32 in --json and --sort); whether it is on the front.",
        epilog="examples:\n  slimtune runs quickstart\n  slimtune runs quickstart --sort val\n  slimtune runs quickstart --json > trials.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    runs.add_argument("experiment", help="the space's name, which is the MLflow experiment name")
    runs.add_argument("--sort", default="macs", choices=RUN_COLUMNS, help="column to sort by (default: macs)")
    runs.add_argument("--json", action="store_true", help="print every trial's knobs and metrics as JSON instead")
    _add_search_arg(runs)
    _add_store_args(runs)

    fetch = commands.add_parser(
        "fetch",
        help="download the most accurate Pareto model under a MACs budget, or a registered one by alias",
        description="Write model.safetensors + channel_spec.json + config.yaml + the per-class table and confusion"
        " matrices (per_class.csv, class_report.json), and the same network as model.onnx, of the front model with the"
        " best val accuracy (balanced accuracy with search.metric: balanced_accuracy) among those with at most"
        " --max-macs MACs (multiply-accumulates per image), or of the version of registered model EXPERIMENT that"
        " --alias names (best, smallest, knee, under-0p1x, ...: they follow the newest published front).",
        epilog="examples:\n  slimtune fetch quickstart --max-macs 12M -o my_model/\n  slimtune fetch quickstart --alias knee -o my_model/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fetch.add_argument("experiment", help="the space's name, which is the MLflow experiment name")
    choice = fetch.add_mutually_exclusive_group(required=True)
    choice.add_argument("--max-macs", metavar="N", help="MACs budget per image, e.g. 12M, 800K, 1.5G")
    choice.add_argument("--alias", metavar="NAME", help="an alias of the registered model EXPERIMENT: best, smallest, knee, under-<budget>x")
    fetch.add_argument(
        "--verified", action="store_true", help="with --max-macs: choose on the means over the seeds of `slimtune verify`, among the members it kept on the front"
    )
    fetch.add_argument("-o", "--to", default="slimtune-model", metavar="DIR", help="where to write the model (default: ./slimtune-model)")
    _add_search_arg(fetch)
    _add_store_args(fetch)

    verify = commands.add_parser(
        "verify",
        help="train the front's members again with other seeds; select the front again on the means",
        description="Train every member of the newest finished search's front (or --search) again through the same"
        " pipeline with trial.seed + 1, ..., + N-1 (same knobs, split and teacher), log the mean and sd of val / test"
        " accuracy and MACs over the N seeds on each member's run, select the front again on the mean val values and"
        " mark the members whose rank changed (tag slimtune.rank) or that left the front (slimtune.verified_front)."
        " Seeds already trained are not trained again. `fetch --verified` then chooses on the means.",
        epilog="examples:\n  slimtune verify quickstart\n  slimtune verify quickstart --seeds 5      # two more seeds after --seeds 3"
        "\n  slimtune fetch quickstart --max-macs 12M --verified -o my_model/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("experiment", help="the space's name, which is the MLflow experiment name")
    verify.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per member in all, the search's own run included (default: 3)")
    verify.add_argument("--address", default=None, metavar="ADDR", help="join a running Ray cluster: auto or HOST:PORT (default: a fresh local Ray)")
    verify.add_argument("--verbose", action="store_true", help="also show Ray's own logs, banners and tables (default: slimtune's progress lines only)")
    _add_search_arg(verify)
    _add_store_args(verify)

    commands.add_parser(
        "methods",
        help="list every criterion, budget parametrisation, schedule, loss and gating option",
        description="Every option a space file can choose by name, with a one-line description and its knobs.",
        epilog="example:\n  slimtune methods",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    prepare = commands.add_parser(
        "prepare-data",
        help="write an embedded dataset as an ImageFolder tree",
        description="Write the embedded Animal-MNIST silhouettes (10 classes x 1000 PNGs) as DIR/<class>/*.png.",
        epilog="example:\n  slimtune prepare-data animal-mnist data/animal_mnist",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument("dataset", choices=["animal-mnist"])
    prepare.add_argument("directory")
    return parser


def _output(args: argparse.Namespace) -> Path:
    from search.layout import DEFAULT_OUTPUT

    return Path(args.output or DEFAULT_OUTPUT)


def _tracker(args: argparse.Namespace):
    from search.layout import Layout
    from search.tracking import Tracker

    if args.tracking_uri is not None:
        return Tracker(args.tracking_uri, args.experiment)
    layout = Layout.at(_output(args), args.experiment)
    if not layout.tracking_db.exists():  # do not create an empty store by looking
        raise UsageError(
            f"no searches in {layout.root}; run `slimtune search SPACE.yaml` here first,"
            " or pass the --output / --tracking-uri the search used"
        )
    return Tracker(layout.tracking_uri, args.experiment)


def _print_front(front, *, header: str) -> None:
    from search.report import front_rows, front_table

    from search._helpers import format_accuracies

    print(header)
    print(front_table(front_rows(front.front), metric=front.metric))
    unfinished = len(front.trials) - len(front.finished) - len(front.stopped)
    objective = "val bal acc" if front.metric == "balanced_accuracy" else "val acc"
    print(
        f"{len(front.finished)} trials finished, {len(front.stopped)} stopped early, {unfinished} failed, killed or interrupted;"
        f" the front is non-dominated on ({objective} max, MACs min)."
    )
    if front.teacher is not None:
        t = front.teacher.metrics
        print(f"dense teacher: {format_accuracies(t, front.metric)}, {t['macs'] / 1e6:.2f}M MACs")
    if front.hypervolume is not None:
        versus = f"; the uniform anchors alone: {front.anchors_hypervolume:.3f}" if front.anchors_hypervolume is not None else ""
        measured = front.metric.replace("_", " ")
        print(f"hypervolume (area under the front's test {measured}, MACs in [0, teacher], {measured} above chance): {front.hypervolume:.3f}{versus}")


def _search(args: argparse.Namespace) -> int:
    import dataclasses

    from search.run import SearchInterrupted, run_search
    from search.space import load_space, validate

    experiment = load_space(args.space)
    if args.resume:
        args.experiment, args.search = experiment.name, None
        return _resume(args)
    if args.smoke_test:
        experiment = experiment.smoke()
    if args.num_trials is not None:
        experiment = validate(dataclasses.replace(experiment, search=dataclasses.replace(experiment.search, num_trials=args.num_trials)))
    try:
        outcome = run_search(
            experiment, output=_output(args), tracking_uri=args.tracking_uri, address=args.address, storage=args.storage, verbose=args.verbose
        )
    except SearchInterrupted as stop:
        return _interrupted(stop, experiment.name, experiment.search.num_trials, args)
    return _finished(outcome, experiment.name, args)


def _resume(args: argparse.Namespace) -> int:
    from search.run import SearchInterrupted, resume_search

    try:
        outcome = resume_search(
            args.experiment, output=_output(args), tracking_uri=args.tracking_uri, address=args.address, search_id=args.search, verbose=args.verbose
        )
    except SearchInterrupted as stop:
        return _interrupted(stop, args.experiment, int(stop.front.search.params.get("num_trials", 0)), args)
    return _finished(outcome, args.experiment, args)


def _store_flags(args: argparse.Namespace) -> str:
    flags = f" --output {args.output}" if args.output else ""
    return flags + (f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else "")


def _interrupted(stop, name: str, num_trials: int, args: argparse.Namespace) -> int:
    front = stop.front
    _print_front(front, header=f"\nPartial Pareto front of {name!r} ({stop}):")
    run_id = front.search.run_id
    print(
        f"\nslimtune: {stop}: {len(front.finished)} of {num_trials} trials finished and are kept in MLflow;"
        f" {len(stop.trial_ids)} running trial(s) ended KILLED with the tag 'slimtune.interrupted'; the search run"
        f" {run_id} ended KILLED with this partial front (slimtune pareto {name} --search {run_id}{_store_flags(args)}).\n"
        f"Continue it, keeping every finished trial:  slimtune resume {name} --search {run_id}{_store_flags(args)}",
        file=sys.stderr,
    )
    return stop.exit_code


def _finished(outcome, name: str, args: argparse.Namespace) -> int:
    _print_front(outcome.front, header=f"\nPareto front of {name!r} (MACs = multiply-accumulates per image):")
    if outcome.tracking_uri.startswith("sqlite:"):
        print(f"\nBrowse the runs:  {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {outcome.tracking_uri} --port 5000")
    else:
        print(f"\nBrowse the runs at {outcome.tracking_uri}")
    if not outcome.front.finished:
        print("slimtune: error: no trial finished; each failed run in MLflow carries its error in the tag 'error'", file=sys.stderr)
        return 1
    if outcome.front.front:
        largest = max(r.metrics["macs"] for r in outcome.front.front)
        print(f"Fetch a model:    slimtune fetch {name} --max-macs {math.ceil(largest / 1e5) / 10:.1f}M -o my_model/{_store_flags(args)}")
    return 0


def _load_front(args: argparse.Namespace, tracker=None, *, say=print):
    """The front `--search` names, else the newest finished search's; says which, and what is newer."""
    from search.front import load_front

    tracker = tracker or _tracker(args)
    front = load_front(tracker, args.experiment, search_id=args.search)
    newest = tracker.latest_search()
    note = f" (a newer search, {newest.run_id}, is {newest.status}: --search {newest.run_id} shows it)" if newest and newest.run_id != front.search.run_id and args.search is None else ""
    partial = "" if front.search.status == "FINISHED" else f" -- {front.search.status}: a partial front"
    say(f"search run {front.search.name} ({front.search.run_id}){partial}{note}")
    return front


def _pareto(args: argparse.Namespace) -> None:
    from search.plots import PLOT_SUFFIXES

    plot = Path(args.plot) if args.plot is not None else None
    if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {plot}: the file's suffix names the format: one of {', '.join(PLOT_SUFFIXES)}")
    front = _load_front(args)
    _print_front(front, header=f"Pareto front of {args.experiment!r} (MACs per image):")
    if plot is None:
        return
    if not front.finished:
        raise UsageError(f"--plot {plot}: search {front.search.run_id} has no finished trial to plot; nothing was written")
    from search.plots import plot_search_front

    try:
        plot_search_front(front, name=args.experiment, path=plot)
    except OSError as error:
        raise UsageError(f"--plot {plot}: cannot write it: {error.strerror or error}") from None
    print(f"plot: wrote {plot}")


def _runs(args: argparse.Namespace) -> None:
    import json

    from search.report import run_columns, run_rows, runs_table

    front = _load_front(args, say=(lambda line: None) if args.json else print)  # --json: nothing but JSON on stdout
    rows = run_rows(front.trials, front=front.front)
    rows.sort(key=lambda row: (row[args.sort] is None, row[args.sort] if row[args.sort] is not None else 0))
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return
    print(runs_table(rows, columns=run_columns(front.metric)))
    counts = {status: sum(row["status"] == status for row in rows) for status in ("finished", "stopped", "failed", "killed")}
    print(", ".join(f"{n} {status}" for status, n in counts.items()) + f"; {len(front.front)} on the front")


def _fetch(args: argparse.Namespace) -> None:
    from pipelines.export import ONNX_FILE
    from search._helpers import format_accuracies, format_count, parse_macs
    from search.fetch import fetch_model
    from search.front import choose_under_budget

    if args.alias is not None:
        if args.verified:
            raise UsageError("--verified: only with --max-macs (an alias names one registered version)")
        tracker = _tracker(args)
        chosen, metric = _registered(args, tracker)
    else:
        budget = parse_macs(args.max_macs)
        tracker = _tracker(args)
        front = _load_front(args, tracker)
        members = front.front
        if args.verified:
            from search.verify import verified_front

            members = verified_front(front.front)
            if not members:
                raise UsageError(f"--verified: search {front.search.run_id} was not verified; run `slimtune verify {args.experiment}` first")
        chosen, metric = choose_under_budget(members, budget, metric=front.metric), front.metric
    destination = Path(args.to)
    onnx_failure = fetch_model(tracker, chosen, destination)
    m = chosen.metrics
    print(
        f"wrote {destination}/ : trial {chosen.trial_id}, {format_accuracies(m, metric)},"
        f" {format_count(m['macs'])} MACs, {format_count(m['params'])} params"
    )
    if isinstance(onnx_failure, OSError):  # the disk filled while exporting: the model is complete, the ONNX copy is not there
        raise UsageError(
            f"-o {destination / ONNX_FILE}: not written ([Errno {onnx_failure.errno}] {onnx_failure.strerror}); the safetensors"
            f" model in {destination} is complete: free some space and fetch again for the ONNX file"
        )
    if onnx_failure is None:
        print(f"wrote {destination / ONNX_FILE} (dynamic batch; mean, std, classes and image_size in its metadata)")
    else:
        print(f"{destination / ONNX_FILE}: not written, the ONNX exporter failed ({type(onnx_failure).__name__}); the safetensors model is complete")


def _registered(args: argparse.Namespace, tracker):
    """The trial run that `--alias` names in registered model EXPERIMENT, and its search's metric."""
    from search.registry import OBJECTIVE_TAG, resolve_alias

    if args.search is not None:
        raise UsageError("--search: not with --alias (an alias names one registered version, whichever search it came from); use --max-macs")
    version = resolve_alias(tracker.client, name=args.experiment, alias=args.alias)
    print(f"registered model {args.experiment!r} version {version.version} (alias {args.alias}, models:/{args.experiment}@{args.alias})")
    return tracker.get(version.run_id), version.tags.get(OBJECTIVE_TAG, "val_accuracy").removeprefix("val_")


def _verify(args: argparse.Namespace) -> None:
    from search.front import METRIC_PARAM
    from search.report import verify_table
    from search.verify import verify_search

    done = verify_search(
        args.experiment, output=_output(args), seeds=args.seeds, tracking_uri=args.tracking_uri, address=args.address, search_id=args.search, verbose=args.verbose
    )
    print(f"\nVerified front of {args.experiment!r} (search {done.search.run_id}), mean +- sd over the seeds:")
    print(verify_table(done.members, metric=done.search.params.get(METRIC_PARAM, "accuracy")))
    changed = sum(m.rank != m.verified_rank for m in done.members)
    left = sum(not m.on_front for m in done.members)
    print(f"{changed} member(s) changed rank (*), {left} left the front selected on the means")
    if done.verified_hypervolume is not None:
        print(f"hypervolume: {done.hypervolume:.3f} on one seed, {done.verified_hypervolume:.3f} on the means")
    if done.failed:
        print(f"slimtune: warning: {done.failed} seed run(s) did not finish (their MLflow runs carry the error); `slimtune verify {args.experiment}` again retries them", file=sys.stderr)
    print(f"Fetch on the means:  slimtune fetch {args.experiment} --max-macs BUDGET --verified -o my_model/{_store_flags(args)}")


def _methods(args: argparse.Namespace) -> None:
    from pipelines.budgets import BUDGETS
    from pipelines.distill import LOSSES
    from pipelines.gating import DESCRIPTION as GATING
    from pipelines.importance import CRITERIA
    from pipelines.schedules import SCHEDULES

    sections = [
        ("importance criteria (search.importance)", CRITERIA.describe()),
        ("budget parametrisations (search.budgets.granularity)", BUDGETS.describe()),
        ("schedules (search.schedule)", SCHEDULES.describe()),
        ("distillation and regularisation losses (search.teacher, search.feature_loss, search.l2sp_alpha)", LOSSES.describe()),
        ("dynamic gating (search.gating_density, search.gating_warmup)", {"gating": GATING}),
    ]
    for title, entries in sections:
        print(f"{title}:")
        width = max(len(name) for name in entries)
        for name, text in entries.items():
            print(f"  {name:<{width}}  {text}")
        print()


def _prepare(args: argparse.Namespace) -> None:
    from pipelines.data import prepare_animal_mnist

    root = prepare_animal_mnist(args.directory)
    print(f"{args.dataset}: ImageFolder at {root}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"search": _search, "resume": _resume, "pareto": _pareto, "runs": _runs, "fetch": _fetch, "verify": _verify, "methods": _methods, "prepare-data": _prepare}
    try:
        return handlers[args.command](args) or 0
    except UsageError as error:
        print(f"slimtune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the trials (the teacher, loading data): nothing partial to keep
        print("slimtune: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        from pipelines.data import DataError
        from pipelines.export import ModelFolderError
        from pipelines.models import WeightsUnavailableError

        if isinstance(error, (DataError, ModelFolderError, WeightsUnavailableError)):
            print(f"slimtune: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
