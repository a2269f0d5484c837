"""The command line: `vision-ops run | validate | query SPEC.yaml`."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Sequence

from vision_ops.config import JobSpec, SpecError, load_spec
from vision_ops.models import ModelError, check_job

EXIT_OK = 0
EXIT_FAILED = 1  # the run broke off; nothing was committed
EXIT_BAD_SPEC = 2  # the spec, its model or its inputs are wrong; no work was done
EXIT_CLUSTER_TOO_SMALL = 3  # the actor pool cannot be scheduled; no work was done
EXIT_TOO_MANY_ERRORS = 4  # committed, but more error rows than --max-error-ratio allows

log = logging.getLogger("vision_ops")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = list(args.set or [])
    overrides += [f"run.id={args.run_id}"] if args.run_id else []
    overrides += [f"run.date={args.run_date}"] if args.run_date else []
    try:
        spec = load_spec(args.spec, overrides)
        check_job(spec)
    except (SpecError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_SPEC
    if args.command == "validate":
        return _validate(spec, list_inputs=args.list_inputs, cluster=args.cluster)
    if args.command == "query":
        return _query(spec, args.sql)
    return _run(spec, args.max_error_ratio)


def _validate(spec: JobSpec, list_inputs: bool, cluster: str | None) -> int:
    run_id, run_date = spec.resolved_run()
    print(f"spec ok: {spec.task.kind} with {spec.model.kind} model, run {run_id} ({run_date})")
    if cluster and _plan_on_cluster(spec, cluster) != EXIT_OK:
        return EXIT_CLUSTER_TOO_SMALL
    if list_inputs:
        from vision_ops.sources import SourceError
        from vision_ops.sources import list_inputs as list_all

        try:
            listing = list_all(spec.input, spec.storage_options)
        except (SourceError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_SPEC
        print(f"inputs: {listing.num_rows}")
    return EXIT_OK


def _plan_on_cluster(spec: JobSpec, cluster: str) -> int:
    """The predictor pool the spec gets on a launcher config scaled to its max_workers."""
    from vision_ops.cluster import ClusterConfigError, load_cluster_config, max_capacity
    from vision_ops.pipeline import ClusterTooSmall, plan_pool

    try:
        capacity = max_capacity(load_cluster_config(cluster))
        plan = plan_pool(spec.runtime.model_copy(update={"autoscaling": False}), capacity)
    except (ClusterConfigError, ClusterTooSmall) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CLUSTER_TOO_SMALL
    print(
        f"on {cluster} at full scale ({capacity['CPU']:g} CPUs, {capacity['GPU']:g} GPUs): "
        f"{plan.min_size}-{plan.max_size} predictor actors of {plan.num_cpus:g} CPU, "
        f"{plan.num_gpus:g} GPU"
    )
    return EXIT_OK


def _run(spec: JobSpec, max_error_ratio: float) -> int:
    from vision_ops.pipeline import ClusterTooSmall, run_job
    from vision_ops.sources import SourceError

    try:
        summary = run_job(spec)
    except (SourceError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_SPEC
    except ClusterTooSmall as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CLUSTER_TOO_SMALL
    commit = summary.commit
    print(
        f"\nrun {summary.run_id}: {commit.rows} items, {commit.ok} ok, {commit.errors} errors "
        f"in {summary.seconds:.1f}s; pipeline {summary.pipeline_seconds:.1f}s, "
        f"{summary.images_per_second:.1f} images/s\n"
        f"output: {commit.partition_uri} ({len(commit.files)} file(s))\n"
        f"manifest: {commit.manifest_uri}"
    )
    if commit.rows and commit.errors / commit.rows > max_error_ratio:
        print(
            f"error: error rows {commit.errors}/{commit.rows} exceed --max-error-ratio",
            file=sys.stderr,
        )
        return EXIT_TOO_MANY_ERRORS
    return EXIT_OK


def _query(spec: JobSpec, sql: str | None) -> int:
    from vision_ops.query import DEFAULT_QUERIES, connect, register_views

    connection = connect(spec.storage_options)
    register_views(connection, spec.output.uri, spec.task.kind)
    try:
        print(connection.sql(sql or DEFAULT_QUERIES[spec.task.kind]))
    except Exception as err:  # DuckDB's own errors: bad SQL, no files yet
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vision-ops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a job spec and commit its predictions")
    check = commands.add_parser("validate", help="check a job spec without running it")
    query = commands.add_parser(
        "query", help="SQL over a spec's output: views `predictions` and (detection) `boxes`"
    )
    query.add_argument("--sql", help="the query (default: a summary per label)")
    for sub in (run, check, query):
        sub.add_argument("spec", help="job spec YAML file")
        sub.add_argument(
            "--set",
            action="append",
            metavar="KEY.PATH=VALUE",
            help="override a spec field, e.g. --set runtime.batch_size=64 (repeatable)",
        )
        sub.add_argument("--run-id", help="run id (default: run date + spec hash)")
        sub.add_argument(
            "--run-date", type=dt.date.fromisoformat, help="YYYY-MM-DD (default: today UTC)"
        )
    run.add_argument(
        "--max-error-ratio",
        type=float,
        default=1.0,
        help="exit 4 when more than this share of items are error rows (default 1.0: never)",
    )
    check.add_argument(
        "--list-inputs", action="store_true", help="also list the inputs and count them"
    )
    check.add_argument("--cluster", help="a cluster.yaml: validate it and size the pool on it")
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
