"""The command line: `vision-ops run | validate | backfill | query ...` (see `--help`)."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from vision_ops.config import (
    RUN_ID_PATTERN,
    EvaluateSpec,
    JobSpec,
    MonitorSpec,
    OutputSpec,
    RuntimeSpec,
    SpecError,
    either,
    load_spec,
)
from vision_ops.embedding import HNSW_MIN_ROWS
from vision_ops.errors import (
    EXIT_BAD_SPEC,
    EXIT_BELOW_THRESHOLD,
    EXIT_CLUSTER_TOO_SMALL,
    EXIT_DRIFT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_SCORED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_TOO_MANY_ERRORS,
    ModelError,
    Terminated,
    VisionOpsError,
    stopped_by_sigterm,
)
from vision_ops.logs import log, log_at
from vision_ops.storage import (
    CREDENTIALS_IN_URI,
    StorageOptions,
    holds_credentials,
    masked_credentials,
    store_error_text,
)

if TYPE_CHECKING:
    from vision_ops.drift import Drift
    from vision_ops.pipeline.run import RunSummary
    from vision_ops.pool import PoolPlan
    from vision_ops.tasks import Task

__all__ = [
    "EXIT_BAD_SPEC",
    "EXIT_CLUSTER_TOO_SMALL",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_TOO_MANY_ERRORS",
    "main",
]


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_LEVEL_VARIABLE = "VISION_OPS_LOG_LEVEL"  # DEBUG also logs an unexpected error's traceback


def main(argv: Sequence[str] | None = None) -> int:
    args = _parsed(argv)
    level = os.environ.get(LOG_LEVEL_VARIABLE, "INFO").strip().upper()
    if level not in LOG_LEVELS:
        message = f"{LOG_LEVEL_VARIABLE}: expected one of {', '.join(LOG_LEVELS)}, found {level!r}"
        return _fail(ValueError(message), EXIT_BAD_SPEC)
    log_at(logging.getLevelName(level))
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except VisionOpsError as err:  # what a user can cause: its message and its exit code
        return _fail(err, err.exit_code)
    except KeyboardInterrupt as err:  # outside a run (`backfill` between its runs)
        return _fail(RuntimeError(STOPPED_BY[stopped_by_sigterm(err)]), _stopped_exit(err))
    except Exception as err:  # anything else: still a message and a failure, not a traceback
        log.debug("%s failed", args.command, exc_info=True)
        return _fail(RuntimeError(store_error_text(err)), EXIT_FAILED)


def _parsed(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line parsed; `query TARGET --format csv "SQL"` too: argparse fills an
    optional positional (the SQL) only before the options, and leaves it unrecognized after."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra[:1] == ["--"]:  # `query T --format csv -- "SQL"`: the SQL past the options
        extra = extra[1:]
    if getattr(args, "sql", "") is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.sql = extra.pop()
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def check_here(spec: JobSpec) -> None:
    """Everything a run on this machine needs before any work (`validate`, `backfill`): the
    model, its files and labels, and the hold-out the run is scored against."""
    from vision_ops.models import check_job  # torch and torchvision: only where a model runs

    check_job(spec)
    check_storage(spec)


def check_for_a_cluster(spec: JobSpec) -> None:
    """What `submit` can check here: the model, not its files or the hold-out (they are in the
    cluster's storage, which this machine may not reach); no file named by a relative path."""
    from vision_ops.models import check_job
    from vision_ops.submission import refuse_relative_paths

    check_job(spec, files=False)
    refuse_relative_paths(spec)


def check_storage(spec: JobSpec) -> None:
    """What `run` checks of storage before any work (`validate` too): a table on local disk is
    not a file (an object store is not asked: `validate` may run where it cannot be reached),
    and the hold-out is there."""
    from vision_ops.storage import TABLE_IS_A_FILE, filesystem, protocol_of

    if spec.output.format == "iceberg":
        from vision_ops.iceberg import require_pyiceberg

        require_pyiceberg()
    if protocol_of(spec.output.uri) == "file":
        fs, path = filesystem(spec.output.uri, spec.storage_options)
        if fs.isfile(path):
            raise SpecError(f"output.uri: {spec.output.uri} {TABLE_IS_A_FILE}")
    check_holdout(spec)


def check_holdout(spec: JobSpec) -> None:
    """The hold-out of the spec's `evaluate:` section is there (SpecError if not): a run must
    not commit and only then find it cannot be scored. (`run` checks only this up front: its
    model is checked while Ray starts.)"""
    from vision_ops.storage import missing
    from vision_ops.tasks import truth_format_of, truth_path_kind

    held = spec.evaluate
    if held is None or held.truth is None:
        return
    truth_format = truth_format_of(spec.task.kind, held.truth_format)
    kind = truth_path_kind(truth_format) if truth_format else None
    if kind is None:
        return
    problem = missing(held.truth, kind, spec.storage_options)
    if problem:
        raise SpecError(f"evaluate.truth: {held.truth} {problem}")


def load_spec_of(args: argparse.Namespace) -> JobSpec:
    """The spec with its overrides, validated (its model not checked); SpecError."""
    overrides = list(args.set or [])
    overrides += [f"run.id={args.run_id}"] if getattr(args, "run_id", None) else []
    overrides += [f"run.date={args.run_date}"] if getattr(args, "run_date", None) else []
    overrides += ["run.incremental=true"] if getattr(args, "incremental", False) else []
    return load_spec(args.spec, overrides)


def output_of(args: argparse.Namespace) -> tuple[str | OutputSpec, StorageOptions]:
    """The table a command reads: TARGET itself (a Parquet table root), or the output of the
    spec TARGET names (any format: an Iceberg table is found through its spec's catalog)."""
    if not args.target.endswith((".yaml", ".yml")):
        return without_credentials("TARGET", args.target), {}
    spec = load_spec(args.target, args.set or [])
    return spec.output, spec.storage_options


def without_credentials(name: str, uri: str) -> str:
    """`uri`, a command's argument `name`; SpecError where it holds credentials (they would
    reach the shell's history, logs and the tables it writes)."""
    if holds_credentials(uri):
        raise SpecError(f"{name}: {CREDENTIALS_IN_URI}")
    return uri


def _fail(err: Exception, code: int) -> int:
    print(f"error: {masked_credentials(str(err))}", file=sys.stderr)
    return code


def _with_spec(
    command: Callable[[JobSpec, argparse.Namespace], int],
    check: Callable[[JobSpec], None] = check_here,
) -> Callable[..., int]:
    """A command on the spec its arguments name, after `check` (SpecError/ModelError: exit 2)."""

    def handler(args: argparse.Namespace) -> int:
        try:
            spec = load_spec_of(args)
            check(spec)
        except (SpecError, ModelError) as err:
            return _fail(err, EXIT_BAD_SPEC)
        return command(spec, args)

    return handler


def validate(spec: JobSpec, args: argparse.Namespace) -> int:
    run_id, run_date = spec.resolved_run()
    print(f"spec ok: {spec.task.kind} with {spec.model.kind} model, run {run_id} ({run_date})")
    if args.cluster and (planned := _plan_on_cluster(spec, args.cluster)) != EXIT_OK:
        return planned
    if args.list_inputs:
        from vision_ops.sources import SourceError, list_inputs, table_apart

        try:
            table = table_apart(spec.input, spec.output.uri, spec.storage_options)
            listing = list_inputs(spec.input, spec.storage_options, table)
        except (SourceError, OSError) as err:
            return _fail(err, EXIT_BAD_SPEC)
        print(f"inputs: {listing.num_rows}")
    return EXIT_OK


def _plan_on_cluster(spec: JobSpec, cluster: str) -> int:
    """The predictor pool the spec gets on a launcher config scaled to its max_workers (with
    `runtime.autoscaling`, as the run sizes it on the head from that config); the driver's
    threads where `runtime.predict_in` asks for them and that cluster allows them."""
    from vision_ops.cluster import (
        ClusterConfigError,
        full_scale_nodes,
        load_cluster_config,
        max_capacity,
    )
    from vision_ops.pool import (
        ClusterTooSmall,
        NotInTheDriver,
        check_in_driver,
        placed_on_cluster,
        plan_pool,
    )

    try:
        config = load_cluster_config(cluster)
        capacity = max_capacity(config)
        nodes = full_scale_nodes(config)
        if spec.runtime.autoscaling:
            plan = plan_pool(spec.runtime, {}, nodes)
        else:
            plan = plan_pool(spec.runtime, capacity)
        check_in_driver(spec.runtime, plan, nodes)
    except (ClusterConfigError, ClusterTooSmall, NotInTheDriver) as err:
        return _fail(err, err.exit_code)
    placed = placed_on_cluster(spec, plan, nodes)
    sized = spec.sized(plan.num_gpus).runtime
    print(
        f"on {cluster} at full scale ({capacity['CPU']:g} CPUs, {capacity['GPU']:g} GPUs): "
        f"{_predictors_planned(placed, plan)}; {sized.images_per_call} images per model call, "
        f"{sized.files_per_read_task} files per read task"
    )
    runner = _runner_planned(spec)
    if runner is not None:
        print(runner)
    return EXIT_OK


def _runner_planned(spec: JobSpec) -> str | None:
    """Where `runtime.runner` takes a run off the cluster, as `validate --cluster` says it."""
    from vision_ops.pool import units_for_the_driver

    runner = spec.runtime.runner
    if runner == "in_process":
        return (
            "runtime.runner: in_process: the run goes in the driver's one process, on its "
            "machine's CPUs, Ray not started: the cluster is not used"
        )
    if runner == "auto" and spec.ray_needed_for() is None:
        return (
            f"runtime.runner: auto: a run listing at most {units_for_the_driver(spec.runtime)} "
            "inputs goes in the driver's one process instead, where RAY_ADDRESS is unset and "
            "the driver's machine has no GPU"
        )
    return None


def _predictors_planned(runtime: RuntimeSpec, plan: PoolPlan) -> str:
    """Where the model will run, as `validate --cluster` prints it: the driver's threads, the
    actor pool, or (`predict_in: auto` on a cluster that allows the driver) either, by the
    run's size."""
    from vision_ops.pool import units_for_the_driver

    threads = (
        f"{plan.max_size} predictor threads in the driver of {plan.threads} torch threads each"
    )
    actors = (
        f"{plan.min_size}-{plan.max_size} predictor actors of {plan.num_cpus:g} CPU, "
        f"{plan.num_gpus:g} GPU"
    )
    if runtime.predict_in == "auto":
        return (
            f"{threads} for a run of at most {units_for_the_driver(runtime)} units to process "
            f"(runtime.predict_in: auto), else {actors}"
        )
    return threads if runtime.predict_in == "driver" else actors


def run(spec: JobSpec, args: argparse.Namespace, after_commit: SigtermNoted | None = None) -> int:
    """Run the spec, say what it committed and check it (exit 0, else the code of the check it
    failed); `after_commit` (a backfill's): whether a SIGTERM came once the run had committed."""
    spec = spec.pinned()  # one run id and date, for the run and for what is said of it here
    late = after_commit or SigtermNoted()
    scored: int | None = None
    try:
        summary = _connect_and_run(spec, late.start)  # from its commit, SIGTERM is noted
    except BaseException as err:
        late.stop()
        return _run_failed(spec, err, args.command)
    try:
        with late:  # the run is committed: a SIGTERM from here is noted, not obeyed
            _say_committed(summary)
        scored = _score_committed(spec, summary)  # a run over the error ratio is scored too
        with late:
            return _committed_outcome(summary, scored, args.max_error_ratio, late)
    except KeyboardInterrupt as err:  # committed, not scored: say so, and how to score it
        stopped = f"{STOPPED_BY[stopped_by_sigterm(err)]} after run {summary.run_id} committed"
        if spec.evaluate is not None and scored is None:
            stopped += (
                f", before it was scored (`vision-ops evaluate SPEC --run-id {summary.run_id}`)"
            )
        return _fail(RuntimeError(stopped), _stopped_exit(err))


def _committed_outcome(
    summary: RunSummary, scored: int, max_error_ratio: float, late: SigtermNoted
) -> int:
    """A committed run's exit code: its score's, else 4 past --max-error-ratio, else 0; with a
    note where a SIGTERM came once it had committed (its outcome stands)."""
    code = scored
    sent, errors = _new_units_and_errors(summary)
    if sent and errors / sent > max_error_ratio:
        of = f"{errors}/{sent} (of new inputs, sent to the model)"
        message = f"error rows {of} exceed --max-error-ratio"
        over = _fail(RuntimeError(message), EXIT_TOO_MANY_ERRORS)
        code = scored or over  # a score below its floor stops a backfill: it comes first
    if late.received:
        print(
            f"note: SIGTERM after run {summary.run_id} committed; its outcome stands (exit {code})",
            file=sys.stderr,
        )
    return code


def _run_failed(spec: JobSpec, err: BaseException, again: str) -> int:
    """A run that raised before its commit, said in one line with its exit code (what it left
    and what resumes it: `again`, the same run or the same backfill); an error of no known
    kind raised again."""
    from vision_ops.storage import OutputNotWritable, StorageError

    if isinstance(err, VisionOpsError):  # a bad spec, model or input (2), a pool too large (3)
        return _fail(err, err.exit_code)
    if isinstance(err, OutputNotWritable):  # found before any work
        return _fail(RuntimeError(f"{err}; nothing was done"), EXIT_FAILED)
    if isinstance(err, StorageError):
        return _fail(RuntimeError(f"{err}; {nothing_committed(spec, again)}"), EXIT_FAILED)
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (Terminated)
        return _fail(RuntimeError(interrupted(spec, err, again)), _stopped_exit(err))
    if isinstance(err, SystemExit) and err.code == signal.SIGTERM:  # Ray's own handler's exit
        return _fail(RuntimeError(interrupted(spec, Terminated(), again)), EXIT_TERMINATED)
    if not isinstance(err, Exception):
        raise err
    from ray.data.exceptions import ExecutionTimeoutError  # imported by the run by now

    stop = _interruption_within(err)
    if stop is not None:  # a Ctrl-C or SIGTERM a library's clean-up raised its own error on
        return _fail(RuntimeError(interrupted(spec, stop, again)), _stopped_exit(stop))

    from vision_ops.errors import (
        FailedInTheDriver,
        raised_as_an_actor_started,
        raised_in_a_worker,
    )

    if isinstance(err, ExecutionTimeoutError):  # Ray Data's stall guard names the stages
        return _fail(RuntimeError(f"{err}; {nothing_committed(spec, again)}"), EXIT_FAILED)
    in_actor = raised_as_an_actor_started(err)  # e.g. weights that are not a state_dict
    if in_actor is not None:
        message, code = in_actor
        return _fail(
            RuntimeError(f"{message} (as the actors started); nothing was committed"), code
        )
    if isinstance(err, FailedInTheDriver):  # in the driver's threads (predict_in, runner)
        log.debug(err.what, exc_info=err.__cause__)
        message = f"{err.what}: {err}; {nothing_committed(spec, again)}"
        return _fail(RuntimeError(message), EXIT_FAILED)
    in_worker = raised_in_a_worker(err)  # e.g. the model failing on a lost device
    if in_worker is not None:
        return _fail(
            RuntimeError(
                f"a worker failed: {in_worker}; {nothing_committed(spec, again)} (the worker's "
                "stack trace: Ray Data's log, in the Ray session's logs/ray-data)"
            ),
            EXIT_FAILED,
        )
    raise err


def _say_committed(summary: RunSummary) -> None:
    """What a run committed, its time and throughput, where its rows are, its drift."""
    from vision_ops.runstats import startup_line

    commit = summary.commit
    retried = f"; {summary.retried} input(s) retried (error rows of earlier runs)"
    print(
        f"\nrun {summary.run_id}: {commit.rows} items, {commit.ok} ok, {commit.errors} errors"
        f"{f', {commit.skipped} skipped' if commit.skipped else ''}"
        f"{f', {commit.resumed} resumed from an earlier attempt' if commit.resumed else ''}"
        f"{retried if summary.retried else ''} "
        f"in {summary.seconds:.1f}s; pipeline {summary.pipeline_seconds:.1f}s, "
        f"{summary.images_per_second:.1f} images/s\n"
        f"{startup_line(summary.startup_seconds or {})}\n"
        f"output: {commit.partition_uri} ({len(commit.files)} file(s))\n"
        f"manifest: {commit.manifest_uri}"
    )
    _print_drift(summary.drift)


class SigtermNoted:
    """SIGTERM once a run has committed (from `start`, the pipeline's call at its commit, or
    `with`): noted, not obeyed. The run is in the table: a scheduler's stop then must not turn
    it into exit 143 ("terminated", read as nothing committed); the command ends with the run's
    own outcome and a note. A second SIGTERM (a scheduler that insists) raises Terminated at
    once. Only from the main thread, as `stop_on_sigterm`; `stop` (leaving the block) sets the
    handler before it again."""

    def __init__(self) -> None:
        self.received = 0
        self._before: Any = None  # the handler it replaced, while its own is set
        self._set = False

    def start(self) -> None:
        """Its handler set, where it is not yet (so `start` and then `with` set it once)."""
        if not self._set and threading.current_thread() is threading.main_thread():
            self._before = signal.signal(signal.SIGTERM, self._noted)
            self._set = True

    def stop(self) -> None:
        if self._set:  # None: one set outside Python, not to be had back
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._before is None else self._before)
            self._set = False

    def __enter__(self) -> SigtermNoted:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _noted(self, signum: int, frame: Any) -> None:
        self.received += 1
        if self.received > 1:
            raise Terminated


def _new_units_and_errors(summary: Any) -> tuple[int, int]:
    """The units a run sent to the model of inputs no run had before, and their error rows:
    what --max-error-ratio bounds. A scene's tiles with no data are neither errors nor answers;
    an --incremental night's retries of earlier error rows were counted the night they failed
    (a broken file would fail every quiet night after), as drift's error rate leaves them."""
    from vision_ops.trend import new_units_sent

    commit = summary.commit
    sent = new_units_sent(commit.rows, commit.skipped, summary.retries)
    return sent, commit.errors - int(summary.retries.get("error_rows", 0))


def _score_committed(spec: JobSpec, summary: Any) -> int:
    """The scheduled job's check of a committed run: its spec's hold-out scored now (exit 5
    below a floor); not where the run left out inputs committed before (--incremental)."""
    if spec.evaluate is None:
        return EXIT_OK
    if summary.skipped_as_done:
        print(
            f"evaluate: not scored: run {summary.run_id} left out {summary.skipped_as_done} "
            "inputs committed before (--incremental), so its rows are not the whole hold-out; "
            "the metrics of the last run that processed it stand (`vision-ops evaluate "
            "--run-id` scores a run)"
        )
        return EXIT_OK
    held = spec.evaluate
    options = spec.storage_options
    return _score(
        spec.output, held.truth, held.truth_format, summary.run_id, options, held.min,
        failed=(EXIT_NOT_SCORED, f"run {summary.run_id} is committed, but not scored: "),
    )  # fmt: skip


# How a command stopped by a signal says so, by whether SIGTERM stopped it (else Ctrl-C).
STOPPED_BY = {False: "interrupted", True: "terminated (SIGTERM)"}


def _stopped_exit(err: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if stopped_by_sigterm(err) else EXIT_INTERRUPTED


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _interruption_within(err: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM (`Terminated`) an error was raised while handling, if any: a lock
    or thread pool torn down by the interruption raises its own (`RuntimeError: release
    unlocked lock`); said as itself, the stopped run read as a failure (exit 1)."""
    seen: set[int] = set()
    found: BaseException | None = err
    while found is not None and id(found) not in seen:
        if isinstance(found, KeyboardInterrupt):
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None


def stop_on_sigterm() -> None:
    """A SIGTERM (a scheduler's stop, `timeout`, Kubernetes) stops the run as Ctrl-C does, in
    the main thread: Ray's own handler, set as it connects, exits 15 at once, with no word of
    what the run left and Ray's crash report on the console. A command called from another
    thread (a workflow runner's) cannot set a handler (nor does Ray there): the process's own
    applies."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def interrupted(spec: JobSpec, err: KeyboardInterrupt | None = None, command: str = "run") -> str:
    """What a Ctrl-C (or SIGTERM) of `run` (or of a `backfill`'s run) left: nothing committed;
    or (a Parquet table, stopped inside its commit: the journal is there) a commit the next run
    on the table finishes or undoes; or (an Iceberg table, stopped while the catalog had the
    commit) a snapshot that may have landed."""
    from vision_ops.errors import InterruptedDuringCommit
    from vision_ops.sink import unfinished_commit

    run_id, _ = spec.resolved_run()
    stopped = STOPPED_BY[err is not None and stopped_by_sigterm(err)]
    if isinstance(err, InterruptedDuringCommit):
        return (
            f"{stopped} during the catalog commit of run {run_id}: its snapshot may have "
            "landed or not (`vision-ops verify` shows the committed run); "
            f"{_the_same(spec, command)} commits the run either way"
        )
    output = spec.output
    try:
        committing = output.format == "parquet" and bool(
            unfinished_commit(output.uri, run_id, spec.storage_options)
        )
    except OSError:  # the store does not answer: say what holds either way
        committing = False
    if committing:
        return (
            f"{stopped} during the commit of run {run_id}: the next run on this table "
            "finishes the commit or undoes it (its manifest says which; `vision-ops verify` "
            "shows the committed run)"
        )
    return f"{stopped}: {nothing_committed(spec, command)}"


def nothing_committed(spec: JobSpec, command: str = "run") -> str:
    """What a run that broke off before its commit left (a Ctrl-C, a worker's failure), and
    what resumes it (`_the_same`)."""
    return (
        "nothing was committed; the rows made durable so far stay staged, and "
        f"{_the_same(spec, command)} resumes from them"
    )


def _the_same(spec: JobSpec, command: str) -> str:
    """What runs a run again: the same command with its run id and date (a default run id is
    the date's, so the same command after midnight would start another run); for a backfill's
    run, the same backfill (its flags are the range: it runs that date again, by its id)."""
    run_id, run_date = spec.resolved_run()
    if command == "backfill":
        return f"the same backfill (from {run_date.isoformat()}, the dates committed skipped)"
    return f"the same command with --run-id {run_id} --run-date {run_date.isoformat()}"


def _connect_and_run(spec: JobSpec, on_commit: Callable[[], None]) -> RunSummary:
    """The run, its start-up timed from here: Ray starts while the driver imports the model
    stack and checks the spec's model (ModelError once Ray is up), unless the run may go in
    this process (`runtime.runner`: then no Ray starts here); `on_commit` as `run_checked_job`
    takes it."""
    from vision_ops.pipeline.connect import connect_while
    from vision_ops.pipeline.in_process import may_run_in_process
    from vision_ops.runstats import StartupClock

    def prepare() -> None:
        from vision_ops.models import check_job  # torch, torchvision

        importlib.import_module("vision_ops.pipeline.run")  # the rest of the pipeline
        check_job(spec)

    clock = StartupClock()
    if may_run_in_process(spec):  # Ray starts later, only where the listing is too long
        prepare()
    else:
        connect_while(prepare, clock, spec.runtime.local_dashboard)
    stop_on_sigterm()
    from vision_ops.pipeline.run import run_checked_job

    return run_checked_job(spec, clock, on_commit)


def _print_drift(drifts: Sequence[Drift] | None) -> None:
    """The drift figures a run recorded in its manifest (report --check fails on them)."""
    from vision_ops.drift import NO_FIGURES

    if drifts is None:
        print("drift: not recorded (see the warning above); report --check computes it")
    elif not drifts:
        print(f"drift: {NO_FIGURES}")
    for found in drifts or []:
        print(f"drift: {'ALERT ' if found.crossed else ''}{found}")


def backfill(spec: JobSpec, args: argparse.Namespace) -> int:
    """Run, in date order, every date of the range that has no committed run yet; a date over
    --max-error-ratio, or one committed whose hold-out could not be scored, is committed and
    the backfill goes on, then exits 7 (any not scored), else 4, naming the dates. With
    --check, then each run it committed is checked for drift (`_check_backfilled`)."""
    from vision_ops.outputs import runs_and_expired_dates
    from vision_ops.storage import OutputNotWritable, require_bucket

    if args.end < args.start:
        return _fail(ValueError(f"--to {args.end} is before --from {args.start}"), EXIT_BAD_SPEC)
    today = dt.datetime.now(dt.timezone.utc).date()
    if args.end > today:
        message = (
            f"--to {args.end} is after today ({today} UTC): a date not yet begun would be "
            "committed, and skipped as done once it has passed; the schedules backfill up to "
            "yesterday"
        )
        return _fail(ValueError(message), EXIT_BAD_SPEC)
    if spec.run.id is not None and args.end > args.start:
        message = (
            f"run.id {spec.run.id!r} is fixed, but a run id names one run on one date and "
            f"{args.start}..{args.end} is several: leave run.id unset (the default is the date "
            "plus the spec's hash) or backfill one date"
        )
        return _fail(ValueError(message), EXIT_BAD_SPEC)
    try:
        require_bucket(spec.output.uri, spec.storage_options)  # before the table's first read
    except OutputNotWritable as err:
        return _fail(RuntimeError(f"{err}; nothing was done"), EXIT_FAILED)
    runs, expired = runs_and_expired_dates(spec.output, spec.storage_options)
    done = {run["run_date"] for run in runs}
    day = args.start
    committed_but: dict[int, list[str]] = {EXIT_NOT_SCORED: [], EXIT_TOO_MANY_ERRORS: []}
    committed: list[str] = []
    while day <= args.end:
        if day.isoformat() in done:
            print(f"{day}: committed already, skipped")
        elif day.isoformat() in expired:  # run again, its rows would be today's inputs'
            print(
                f"{day}: holds the rows of a run whose snapshot was expired, skipped "
                f"(`vision-ops run SPEC --run-date {day}` runs it again)"
            )
        else:
            dated = spec.model_copy(update={"run": spec.run.model_copy(update={"date": day})})
            late = SigtermNoted()
            code = run(dated, args, late)
            if code in COMMITTED_EXITS:
                committed.append(day.isoformat())
            if code in committed_but:
                committed_but[code].append(day.isoformat())
            elif code != EXIT_OK:
                _say_where_the_backfill_stopped(day, args.end)
                return _check_backfilled(spec, args, committed, code)
            if late.received and day < args.end:  # a stop once the run committed: no later date
                run_id, _ = dated.pinned().resolved_run()
                print(f"error: {STOPPED_BY[True]} after run {run_id} committed", file=sys.stderr)
                _say_where_the_backfill_stopped(day, args.end)
                _backfill_outcome(committed_but)  # the dates committed with a problem, said
                return _check_backfilled(spec, args, committed, EXIT_TERMINATED)
        day += dt.timedelta(days=1)
    return _check_backfilled(spec, args, committed, _backfill_outcome(committed_but))


def _say_where_the_backfill_stopped(day: dt.date, end: dt.date) -> None:
    left = (end - day).days
    first = day + dt.timedelta(days=1)
    later = {0: "no later date in the range", 1: f"{end} not run"}.get(
        left, f"{first}..{end} not run ({left} dates)"
    )
    print(f"error: the backfill stopped at {day}: {later}", file=sys.stderr)


# The exit codes of a run that committed (the README's exit table).
COMMITTED_EXITS = (EXIT_OK, EXIT_TOO_MANY_ERRORS, EXIT_BELOW_THRESHOLD, EXIT_NOT_SCORED)


def _check_backfilled(
    spec: JobSpec, args: argparse.Namespace, committed: list[str], outcome: int
) -> int:
    """With --check: the drift of each run this backfill committed against the runs before
    it (the spec's `monitor:`), never of a date it skipped (checked the night it committed:
    a drifted night alerts once, not each night it stays in the range). Exits as the backfill
    did where that was not 0 (its check not run after Ctrl-C), else 6 where a run drifted."""
    from vision_ops.drift import check_runs_of_dates

    if not args.check or outcome in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        return outcome
    if not committed:
        print("drift: this backfill committed no run; none checked")
        return outcome
    try:
        drifts = check_runs_of_dates(spec.output, spec.monitor, spec.storage_options, committed)
    except Exception as err:  # the store's errors are not one type
        message = (
            f"the drift check failed ({store_error_text(err)}; `vision-ops verify` names a "
            f"damaged run); the backfill's runs are committed: {', '.join(committed)}"
        )
        return _fail(RuntimeError(message), outcome or EXIT_FAILED)
    verdict = _drift_verdict(drifts, checked=True)  # said whatever the backfill's exit
    return outcome or verdict


def _backfill_outcome(committed_but: dict[int, list[str]]) -> int:
    """The dates a backfill committed with a problem, said; the exit code of the first kind
    found (not scored before over the error ratio), else 0."""
    said = {
        EXIT_NOT_SCORED: "committed, not scored (`vision-ops evaluate SPEC --run-id ID` scores "
        "each once its hold-out is mended)",
        EXIT_TOO_MANY_ERRORS: "committed over --max-error-ratio",
    }
    found = [code for code in said if committed_but[code]]
    for code in found:
        print(f"error: {said[code]}: {', '.join(committed_but[code])}", file=sys.stderr)
    return found[0] if found else EXIT_OK


def query(args: argparse.Namespace) -> int:
    """SQL over committed runs of an output table (a URI, or a spec whose output it reads); or
    an OCR table's --search, or an embedding table's --similar-to / --duplicates."""
    from vision_ops.outputs import as_output, read_committed
    from vision_ops.query import connect, export, register_views
    from vision_ops.storage import protocol_of

    conflict = _query_conflict(args)
    if conflict:
        return _fail(ValueError(conflict), EXIT_BAD_SPEC)
    try:
        fmt = _query_format(args)
    except ValueError as err:
        return _fail(err, EXIT_BAD_SPEC)
    try:
        table, options = output_of(args)
    except SpecError as err:
        return _fail(err, EXIT_BAD_SPEC)

    def answer() -> str | None:
        connection = connect(options, table_on_s3=protocol_of(as_output(table).uri) == "s3")
        summary = not args.sql  # the task's own question: of its rows alone
        once = args.run_id is None and _of_each_unit_once(args)
        task = register_views(connection, table, options, args.run_id, args.as_of, summary, once)
        relation = _query_relation(connection, task, args)
        if relation is None:  # DDL, SET ...: DuckDB gives no relation
            raise NoRows(NO_ROWS)
        return str(relation) if fmt == "table" else export(relation, fmt, args.out)

    try:
        text = read_committed(answer, table, options)
    except Exception as err:  # its exit code where it has one (no committed run, --as-of of
        return _fail(err, getattr(err, "exit_code", EXIT_FAILED))  # Parquet); DuckDB's: 1
    if text:
        print(text, end="" if text.endswith("\n") else "\n")
    return EXIT_OK


class NoRows(VisionOpsError, ValueError):
    """SQL that returns no relation (DDL, SET)."""

    exit_code = EXIT_BAD_SPEC


NO_ROWS = (
    "query: the SQL returns no rows; expected a query such as SELECT (what a statement "
    "creates or drops lasts only for this command; the table is not changed)"
)


def _query_format(args: argparse.Namespace) -> str:
    """--format, else the ending of --out's file name, else table; ValueError where it is none
    of those, or where --out is given with a format that writes no file (table)."""
    from vision_ops.query import EXPORT_FORMATS, PARQUET_NEEDS_A_FILE

    if args.out is None:
        fmt = args.format or "table"
        if fmt == "parquet":
            raise ValueError(PARQUET_NEEDS_A_FILE)
        if fmt in ("table", *EXPORT_FORMATS):
            return str(fmt)
        raise ValueError(f"--format: expected {either(['table', *EXPORT_FORMATS])}, found {fmt!r}")
    local = "://" not in args.out
    if local and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise ValueError(f"--out {args.out}: expected a file in an existing folder")
    fmt = args.format or os.path.splitext(args.out)[1].lstrip(".").lower()
    if fmt in EXPORT_FORMATS:
        return str(fmt)
    endings = either([f".{name}" for name in EXPORT_FORMATS])
    raise ValueError(
        f"--out {args.out}: expected --format {either(list(EXPORT_FORMATS))}, or a file name "
        f"ending {endings}"
    )


def _query_conflict(args: argparse.Namespace) -> str | None:
    """What `query` was given that it cannot do at once, in words; None if nothing."""
    if args.similar_to or args.duplicates is not None:
        if args.sql or (args.similar_to and args.duplicates is not None):
            found = "SQL and an option" if args.sql else "both"
            return f"query: expected SQL, --similar-to or --duplicates, found {found}"
        return None
    if args.search is not None and args.sql:
        return "query: expected SQL or --search, found both"
    return None


def _of_each_unit_once(args: argparse.Namespace) -> bool:
    """Whether `query` answers over each unit's latest row: its task's summary and an OCR
    search (over every row, a table of nightly runs counted each image once a night). SQL
    reads every committed row; embedding neighbours take each unit's latest vector per model."""
    return not (args.sql or args.similar_to or args.duplicates is not None)


def _query_relation(connection: Any, task: Task, args: argparse.Namespace) -> Any:
    """The DuckDB relation `query` prints: embedding neighbours or duplicate pairs, an OCR
    search, the SQL given, else the task's default query."""
    from vision_ops.query import search_sql

    if args.similar_to or args.duplicates is not None:
        from vision_ops.embedding import TASK, duplicates, similar

        if task.name != TASK:
            raise ValueError(
                f"--similar-to and --duplicates read an {TASK} table; this table's task is "
                f"{task.name}"
            )
        if args.similar_to:
            return similar(connection, args.similar_to, args.k, args.hnsw_min_rows)
        return duplicates(connection, args.duplicates, args.k, args.hnsw_min_rows)
    if args.search is not None:
        return connection.sql(search_sql(connection, task, args.search))
    return connection.sql(args.sql or task.default_query)


def submit(spec: JobSpec, args: argparse.Namespace) -> int:
    """Submit to a cluster's Jobs API; with --wait, follow it to the end and exit as it did."""
    from vision_ops import submission

    try:
        job = submission.submit(spec, args.address, args.env or [], args.max_error_ratio)
        cluster = submission.masked(args.address, args.address)
        print(f"submitted {job.job_id} (run {job.run_id}) to {cluster}")
        if not args.wait:
            return EXIT_OK
        state = submission.wait(args.address, job.job_id, args.timeout)
    except submission.SubmissionError as err:  # exit 2 where refused before the cluster is asked
        return _fail(err, err.exit_code)
    print(f"{job.job_id}: {state}")
    if state == "SUCCEEDED":
        return EXIT_OK
    if state not in submission.TERMINAL:
        message = (
            f"--timeout {args.timeout:g}s passed and job {job.job_id} is still {state}: it was "
            f"not stopped (`vision-ops stop {job.job_id}` stops it)"
        )
        return _fail(RuntimeError(message), EXIT_FAILED)
    tail = submission.logs(args.address, job.job_id).splitlines()[-40:]
    print("\n".join(["last lines of the job's log:", *tail]), file=sys.stderr)
    return submission.exit_code(args.address, job.job_id)


def job_command(args: argparse.Namespace) -> int:
    """status / logs / stop of a submitted job."""
    from vision_ops import submission

    actions = {"status": submission.status, "logs": submission.logs, "stop": submission.stop}
    try:
        result = actions[args.command](args.address, args.job_id)
    except submission.SubmissionError as err:  # exit 2 where refused before the cluster is asked
        return _fail(err, err.exit_code)
    except Exception as err:  # the Jobs API's own errors: unknown job id, ...
        return _fail(RuntimeError(submission.masked(str(err), args.address)), EXIT_FAILED)
    print(result if args.command != "stop" else f"{args.job_id}: stop requested={result}")
    return EXIT_OK


def verify(args: argparse.Namespace) -> int:
    """Re-check a committed run: files, footers, row counts, every unit once."""
    from vision_ops.outputs import verify_run

    try:
        table, options = output_of(args)
    except SpecError as err:
        return _fail(err, EXIT_BAD_SPEC)
    manifest, problems = verify_run(table, args.run_id, options)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        return EXIT_FAILED
    print(f"run {manifest['run_id']} ({manifest['run_date']}): {manifest['rows']} units, "
          f"each once, in {len(manifest['files'])} readable file(s)")  # fmt: skip
    return EXIT_OK


def report(args: argparse.Namespace) -> int:
    """A committed run's report in the terminal, and with --html as a self-contained page;
    --trend: every committed run's figures; --check: exit 6 where the run drifted."""
    from vision_ops.drift import check_run, check_runs_since, render_drift_cards
    from vision_ops.outputs import read_committed
    from vision_ops.report import NoSuchRun, RunReport, build_report, render_html, render_text

    if args.since and not (args.trend or args.check):
        message = "--since: expected it with --trend or --check, found it alone"
        return _fail(SpecError(message), EXIT_BAD_SPEC)
    if args.since and args.check and args.run_id and not args.trend:
        message = "--check: expected --since (every run from a date) or --run-id, found both"
        return _fail(SpecError(message), EXIT_BAD_SPEC)
    if args.trend and args.run_id and not args.check:
        message = "--run-id: with --trend, expected --check (the run checked); the trend shows all"
        return _fail(SpecError(message), EXIT_BAD_SPEC)
    thresholds = list(_threshold_flags(args))
    if thresholds and not args.check:
        message = f"{', '.join(thresholds)}: drift thresholds, expected with --check"
        return _fail(SpecError(message), EXIT_BAD_SPEC)
    if args.samples < 1:
        return _fail(
            SpecError(f"--samples: expected 1 or more, found {args.samples}"), EXIT_BAD_SPEC
        )
    if args.html and not os.path.isdir(os.path.dirname(os.path.abspath(args.html))):
        message = f"--html {args.html}: expected a file in an existing folder"
        return _fail(SpecError(message), EXIT_BAD_SPEC)
    try:
        table, options = output_of(args)
        monitor = _monitor(args)
    except SpecError as err:
        return _fail(err, EXIT_BAD_SPEC)
    if args.trend:
        return _trend(args, table, options, monitor)

    def read() -> tuple[RunReport, list[Drift]]:
        found = build_report(table, args.run_id, options, args.samples)
        if not args.check:
            return found, []
        if args.since:
            return found, check_runs_since(table, monitor, options, args.since)
        return found, check_run(table, monitor, options, found.run_id)

    try:
        found, drifts = read_committed(read, table, options)
    except NoSuchRun as err:
        return _fail(err, EXIT_FAILED)
    print(render_text(found), end="")
    if args.html:
        header = render_drift_cards(drifts) if args.check else ""
        with open(args.html, "w", encoding="utf-8") as page:
            page.write(render_html(found, header))
        print(f"html: {args.html}")
    return _drift_verdict(drifts, args.check)


# report's threshold flags: (flag, its argparse attribute, the MonitorSpec field it sets).
MONITOR_FLAGS = (
    ("--runs", "runs", "runs"),
    ("--max-label-psi", "max_label_psi", "label_psi"),
    ("--max-score-psi", "max_score_psi", "score_psi"),
    ("--max-error-rate-rise", "max_error_rate_rise", "error_rate_rise"),
)


def _threshold_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Each threshold flag given -> its value."""
    given = {flag: getattr(args, name) for flag, name, _ in MONITOR_FLAGS}
    return {flag: value for flag, value in given.items() if value is not None}


def _monitor(args: argparse.Namespace) -> MonitorSpec:
    """The spec's drift thresholds (defaults for a table URI), with the flags' overrides."""
    spec = (
        load_spec(args.target, args.set or []) if args.target.endswith((".yaml", ".yml")) else None
    )
    monitor = spec.monitor if spec is not None else MonitorSpec()
    fields = {flag: field for flag, _, field in MONITOR_FLAGS}
    given = {fields[flag]: value for flag, value in _threshold_flags(args).items()}
    try:
        return MonitorSpec(**(monitor.model_dump() | given))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in err.errors(include_url=False)
        )
        raise SpecError(f"report --check thresholds: {problems}") from None


def _trend(
    args: argparse.Namespace, table: str | OutputSpec, options: StorageOptions, monitor: MonitorSpec
) -> int:
    from vision_ops.drift import drift, render_drift_html
    from vision_ops.outputs import describe
    from vision_ops.trend import render_trend_html, render_trend_text, trend

    points = trend(table, options, args.since)
    since = f" since {args.since}" if args.since else ""
    if not points:
        return _fail(LookupError(f"no committed run in {describe(table)}{since}"), EXIT_FAILED)
    if args.run_id is not None and args.run_id not in {point.run_id for point in points}:
        message = f"no committed run {args.run_id} in {describe(table)}{since}"
        return _fail(LookupError(message), EXIT_FAILED)
    print(render_trend_text(points), end="")
    drifts = drift(points, monitor, args.run_id) if args.check else []
    if args.html:
        header = render_drift_html(drifts) if args.check else ""
        with open(args.html, "w", encoding="utf-8") as page:
            page.write(render_trend_html(points, describe(table), header))
        print(f"html: {args.html}")
    return _drift_verdict(drifts, args.check)


def _drift_verdict(drifts: Sequence[Drift], checked: bool) -> int:
    """Print the drift figures; EXIT_DRIFT where one is over its threshold."""
    from vision_ops.drift import NO_FIGURES

    if checked and not drifts:
        print(f"drift: {NO_FIGURES}")
    for found in drifts:
        print(f"drift: {found}")
    crossed = [found for found in drifts if found.crossed]
    for found in crossed:
        print(f"alert: {found}", file=sys.stderr)
    return EXIT_DRIFT if crossed else EXIT_OK


def evaluate(args: argparse.Namespace) -> int:
    """Score a committed run against ground truth; the metrics land under `_metrics/`. With a
    spec naming a hold-out (`evaluate:`), its truth by default, and exit 5 below its floors."""
    try:
        table, options = output_of(args)
        section = _evaluate_section(args)
        truth = without_credentials("--truth", args.truth) if args.truth else None
    except SpecError as err:
        return _fail(err, EXIT_BAD_SPEC)
    truth = truth or (section.truth if section else None)
    truth_format = args.truth_format or (section.truth_format if section else None)
    if truth is None and truth_format != "imagefolder":
        message = "evaluate needs --truth (all but --truth-format imagefolder) or a spec's evaluate"
        return _fail(ValueError(message), EXIT_BAD_SPEC)
    minimums = section.min if section else {}
    return _score(table, truth, truth_format, args.run_id, options, minimums)


def _score(
    table: str | OutputSpec,
    truth: str | None,
    truth_format: str | None,
    run_id: str | None,
    options: StorageOptions,
    minimums: dict[str, float],
    failed: tuple[int, str] = (EXIT_FAILED, ""),
) -> int:
    """Evaluate a committed run, print its overall metrics; exit 5 where one is below its
    floor in `minimums`; where it cannot be scored, `failed`'s exit code, its text leading
    the message."""
    from vision_ops.errors import EXIT_BELOW_THRESHOLD
    from vision_ops.evaluate import (
        EvaluationError,
        NoScorer,
        below_minimums,
        evaluate_run,
        shown_metric,
    )

    try:
        metrics = evaluate_run(table, truth or "", truth_format, run_id, options)
        below = below_minimums(metrics, minimums)
    except (EvaluationError, OSError, KeyError) as err:
        code, lead = failed
        if isinstance(err, NoScorer):  # asked of such a run (a spec's `evaluate:` is refused)
            code = err.exit_code
        return _fail(RuntimeError(f"{lead}{err}"), code)
    for row in metrics.to_pylist():
        if row["label"] is None:
            print(f"{row['metric']}: {shown_metric(row['metric'], row['value'])}")
    print(f"metrics: {len(metrics)} rows for run {metrics['run_id'][0]}")
    if below:
        message = f"below the spec's evaluate.min: {'; '.join(below)}"
        return _fail(RuntimeError(message), EXIT_BELOW_THRESHOLD)
    return EXIT_OK


def _evaluate_section(args: argparse.Namespace) -> EvaluateSpec | None:
    """The `evaluate:` section of the spec TARGET names (None for a table URI)."""
    if not args.target.endswith((".yaml", ".yml")):
        return None
    return load_spec(args.target, args.set or []).evaluate


def bench(args: argparse.Namespace) -> int:
    """Throughput and peak memory of the pipeline against its ceilings and peers."""
    from pathlib import Path

    from vision_ops.benchmark.report import format_table
    from vision_ops.benchmark.runner import run_bench
    from vision_ops.benchmark.spec import BenchSpec, parse_bench_spec, runtime_overrides

    values = {  # the options named as BenchSpec fields (--only and --spec are parsed below)
        key: value
        for key, value in vars(args).items()
        if key in BenchSpec.model_fields and key != "only" and value is not None
    }
    try:
        if args.only:
            values["only"] = tuple(key.strip() for key in args.only.split(",") if key.strip())
        if args.spec:
            values["runtime"] = runtime_overrides(Path(args.spec))
        spec = parse_bench_spec(values)
        report = run_bench(spec)
    except (SpecError, ModelError) as err:
        return _fail(err, EXIT_BAD_SPEC)
    print("\n" + format_table(report))
    report.write_json(spec.out)
    print(f"\nreport: {spec.out}")
    return EXIT_OK if not report.problems else EXIT_FAILED


def _share(text: str) -> float:
    """A share from 0 to 1 (argparse names the option that refused another, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1, found {text}")
    return value


def _run_id(text: str) -> str:
    """A run id as runs are named (it becomes part of paths; argparse names the option)."""
    if not re.fullmatch(RUN_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"expected letters, digits and . _ - (a letter or digit first, at most 128), "
            f"found {text!r}"
        )
    return text


def _date(text: str) -> dt.date:
    """A calendar date, YYYY-MM-DD (a run's logical date; argparse names the option)."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise argparse.ArgumentTypeError(f"expected a date as YYYY-MM-DD, found {text!r}")
    try:
        return dt.date.fromisoformat(text)
    except ValueError as err:
        message = f"expected a date as YYYY-MM-DD, found {text!r}: {err}"
        raise argparse.ArgumentTypeError(message) from None


def _utc_time(text: str) -> dt.datetime:
    """An ISO 8601 date or time; UTC where it names no offset."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 date or time (2026-12-01, 2026-12-01T02:30:00Z), found {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def _spec_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("spec", help="job spec YAML file")
    sub.add_argument(
        "--set",
        action="append",
        metavar="KEY.PATH=VALUE",
        help="override a spec field, e.g. --set runtime.batch_size=64 (repeatable)",
    )


def _run_outcome_arguments(sub: argparse.ArgumentParser) -> None:
    """The flags of a run's outcome, for `run`, each of a `backfill`'s runs, and the run
    `submit` ships."""
    sub.add_argument(
        "--max-error-ratio",
        type=_share,
        default=1.0,
        help="exit 4 when more than this share of the units of new inputs sent to the model are "
        "error rows (tiles with no data are not sent; --incremental's retries of earlier error "
        "rows are not new; default 1.0: never)",
    )
    sub.add_argument(
        "--incremental",
        action="store_true",
        help="skip units committed before for the same model and input version",
    )


def _parser() -> argparse.ArgumentParser:
    from vision_ops.tasks import truth_formats

    parser = argparse.ArgumentParser(prog="vision-ops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    sub = commands.add_parser("run", help="run a job spec and commit its predictions")
    _spec_arguments(sub)
    sub.add_argument("--run-id", type=_run_id, help="run id (default: run date + spec hash)")
    sub.add_argument("--run-date", type=_date, help="YYYY-MM-DD (default: today UTC)")
    _run_outcome_arguments(sub)
    sub.set_defaults(handler=_with_spec(run, check=check_storage))

    sub = commands.add_parser("validate", help="check a job spec without running it")
    _spec_arguments(sub)
    sub.add_argument("--run-id", type=_run_id, help="run id to check")
    sub.add_argument("--run-date", type=_date, help="YYYY-MM-DD")
    sub.add_argument(
        "--list-inputs",
        action="store_true",
        help="also list the inputs as a run would (every path checked) and print how many",
    )
    sub.add_argument("--cluster", help="a cluster.yaml: validate it and size the pool on it")
    sub.set_defaults(handler=_with_spec(validate))

    sub = commands.add_parser("backfill", help="run each date of a range not yet committed")
    _spec_arguments(sub)
    sub.add_argument(
        "--from", dest="start", type=_date, required=True, help="the first date, YYYY-MM-DD"
    )
    sub.add_argument(
        "--to", dest="end", type=_date, required=True, help="the last date (not after today UTC)"
    )
    _run_outcome_arguments(sub)  # of each date's run; exit 4 once every date has run
    sub.add_argument(
        "--check",
        action="store_true",
        help="then check each run it committed for drift (as report --check): exit 6 where one "
        "drifted past the spec's monitor: thresholds, unless the backfill itself exited non-zero",
    )
    sub.set_defaults(handler=_with_spec(backfill))

    sub = commands.add_parser(
        "query",
        help="SQL over committed runs: the view `predictions` and the task's (detection `boxes`, "
        "segmentation `pixels`)",
    )
    sub.add_argument("target", help="an output table URI, or a job spec (.yaml) to read its output")
    sub.add_argument("sql", nargs="?", help="the query (default: the task's summary)")
    sub.add_argument(
        "--search",
        metavar="WORDS",
        help="instead of SQL: the units whose OCR text matches these words (full-text, BM25), "
        "best first",
    )
    sub.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="spec override")
    sub.add_argument("--run-id", type=_run_id, help="only this run's rows, as its commit left them")
    sub.add_argument(
        "--as-of",
        type=_utc_time,
        help="the table as it was at this time, ISO 8601 (Iceberg tables; default: now)",
    )
    sub.add_argument(
        "--format",
        help="table, csv, json or parquet (default: --out's file name ending, else table)",
    )
    sub.add_argument("--out", help="write the result to this file (needed for parquet)")
    sub.add_argument(
        "--similar-to",
        action="append",
        metavar="URI",
        help="instead of SQL (an embedding table): the nearest units, by cosine similarity, of "
        "the unit of this source URI or item id (repeatable)",
    )
    sub.add_argument(
        "-k",
        type=int,
        default=10,
        help="neighbours per --similar-to; with --duplicates through the index, the neighbours "
        "each unit is compared with (default 10)",
    )
    sub.add_argument(
        "--duplicates",
        type=float,
        metavar="COSINE",
        help="instead of SQL (an embedding table): the pairs of units at least this similar, "
        "e.g. 0.95",
    )
    sub.add_argument(
        "--hnsw-min-rows",
        type=int,
        default=HNSW_MIN_ROWS,
        help="--similar-to and --duplicates search through an HNSW index from this many vectors "
        f"of a model (default {HNSW_MIN_ROWS}); fewer are compared exactly",
    )
    sub.set_defaults(handler=query)

    sub = commands.add_parser("verify", help="re-check a committed run: every unit once")
    sub.add_argument("target", help="an output table URI, or a job spec (.yaml) to read its output")
    sub.add_argument(
        "--run-id", type=_run_id, help="the run to check (default: the latest committed)"
    )
    sub.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="spec override")
    sub.set_defaults(handler=verify)

    sub = commands.add_parser("report", help="a committed run's report (text, and --html)")
    sub.add_argument("target", help="an output table URI, or a job spec (.yaml) to read its output")
    sub.add_argument(
        "--run-id", type=_run_id, help="the run to report (default: the latest committed)"
    )
    sub.add_argument("--html", help="also write a self-contained HTML page with charts here")
    sub.add_argument(
        "--samples", type=int, default=8, help="units per gallery strip in the page (default 8)"
    )
    sub.add_argument(
        "--trend", action="store_true", help="every committed run's figures, by run date"
    )
    sub.add_argument(
        "--since",
        type=_date,
        help="with --trend: the trend from this date (YYYY-MM-DD); with --check and no "
        "--trend: check each run from this date",
    )
    sub.add_argument(
        "--check",
        action="store_true",
        help="compare the run with the runs before it (spec's monitor:); exit 6 on drift",
    )
    sub.add_argument("--runs", type=int, help="earlier runs compared with (monitor.runs)")
    sub.add_argument("--max-label-psi", type=float, help="overrides monitor.label_psi")
    sub.add_argument("--max-score-psi", type=float, help="overrides monitor.score_psi")
    sub.add_argument("--max-error-rate-rise", type=float, help="overrides monitor.error_rate_rise")
    sub.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="spec override")
    sub.set_defaults(handler=report)
    sub = commands.add_parser("evaluate", help="score a committed run against ground truth")
    sub.add_argument("target", help="an output table URI, or a job spec (.yaml) to read its output")
    sub.add_argument(
        "--truth",
        help="labels CSV/Parquet (uri, label), COCO JSON, or a folder of PNG class-id masks",
    )
    sub.add_argument(
        "--truth-format",
        choices=truth_formats(),
        help="default: the run's task's first (classification table, detection coco, "
        "segmentation masks); imagefolder: the class is each image's parent folder (--truth "
        "is then unused)",
    )
    sub.add_argument(
        "--run-id", type=_run_id, help="the run to score (default: the latest committed)"
    )
    sub.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="spec override")
    sub.set_defaults(handler=evaluate)

    sub = commands.add_parser(
        "bench", help="throughput and memory: the pipeline against its ceilings and peers"
    )
    sub.add_argument("--images", type=int, default=64, help="photos (N) every approach classifies")
    sub.add_argument(
        "--architecture",
        help="the torchvision classifier every approach runs, e.g. resnet50 (default: resnet18)",
    )
    sub.add_argument(
        "--batch-size",
        type=int,
        help="images per model call, everywhere (default: the job's, derived from the device)",
    )
    sub.add_argument("--out", default="bench.json", help="the JSON report")
    sub.add_argument(
        "--only",
        help="approaches to run, e.g. a,b,c: a decode ceiling, b model-only ceiling, "
        "c pipeline, d naive Ray Data, e DataLoader, f Daft (default: all)",
    )
    sub.add_argument(
        "--s3",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the pipeline from s3:// on a local SeaweedFS server",
    )
    sub.add_argument(
        "--scale", type=int, default=1, help="also run the pipeline and its peers on K x N"
    )
    sub.add_argument("--workdir", help="photos, weights and outputs (photos are cached there)")
    sub.add_argument("--spec", help="a job spec YAML whose `runtime:` settings the pipeline takes")
    sub.add_argument("--repeats", type=int, default=3, help="timed passes of the model-only run")
    sub.add_argument("--seed", type=int, default=0, help="seeds the photos and the weights")
    sub.set_defaults(handler=bench)

    address_help = "the cluster's Jobs API, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)"
    sub = commands.add_parser("submit", help="submit a job spec to a Ray cluster (Ray Jobs)")
    _spec_arguments(sub)
    sub.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help=address_help)
    sub.add_argument("--run-id", type=_run_id, help="run id (default: run date + spec hash)")
    sub.add_argument("--run-date", type=_date, help="YYYY-MM-DD")
    sub.add_argument("--env", action="append", help="ship this (non-secret) variable too")
    sub.add_argument("--wait", action="store_true", help="follow the job; exit as it ended")
    _run_outcome_arguments(sub)
    sub.add_argument(
        "--timeout",
        type=float,
        default=24 * 3600,
        help="seconds --wait waits; past them it exits 1, leaving the job running",
    )
    sub.set_defaults(handler=_with_spec(submit, check=check_for_a_cluster))
    for name, text in [("status", "a job's state"), ("logs", "a job's logs"), ("stop", "stop it")]:
        sub = commands.add_parser(name, help=text)
        sub.add_argument("job_id")
        sub.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help=address_help)
        sub.set_defaults(handler=job_command)
    return parser


def console() -> None:
    """The command line's entry point (`vision-ops`, `python -m vision_ops.cli`): `main`, then
    the process's exit with its code. A SIGTERM during that exit (Ray shutting the embedded
    cluster down: seconds) is said and not obeyed: the command's outcome is known and stands.
    It raised inside Ray's exit hook: a traceback, and exit 1 or 0 at random for a night that
    had committed and been scored."""
    code = main()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _outcome_stands(code))
    sys.exit(code)


def _outcome_stands(code: int) -> Callable[[int, Any], None]:
    """The SIGTERM handler of an exiting command: the first says so, a second (a scheduler
    that insists: Ray's shutdown may hang) exits at once, with the command's code."""
    received: list[int] = []

    def said(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            os._exit(code)
        print(
            f"note: SIGTERM as the command exits; its outcome stands (exit {code})", file=sys.stderr
        )

    return said


if __name__ == "__main__":
    console()
