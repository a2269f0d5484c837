"""The command line: validate and run, exit codes, the summary, RAY_ADDRESS on a 2-node cluster."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml

from vision_ops import models
from vision_ops.cli import (
    EXIT_BAD_SPEC,
    EXIT_CLUSTER_TOO_SMALL,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TOO_MANY_ERRORS,
    main,
)
from vision_ops.pipeline import run as pipeline_run
from vision_ops.runstats import startup_line
from vision_ops.sink import committed_run

pytestmark = pytest.mark.timeout(600)
CONSOLE_SCRIPT = Path(sys.executable).with_name("vision-ops")


@pytest.fixture
def spec_file(tmp_path: Path, photo_paths: list[Path]) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in photo_paths[:2]:
        shutil.copy(path, photos / path.name)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    spec = {
        "input": {"uris": [str(photos)]},
        "task": {"kind": "classification", "top_k": 3},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "vision_ops.zoo:efficientnet_lite0",
            "labels": "imagenet-1k",
            "preprocessing": {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3},
        },
        "runtime": {"batch_size": 4},
        "output": {"uri": str(tmp_path / "table")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_workers_error_is_read_from_the_traceback_ray_passes_on() -> None:
    """Ray passes a worker's error on as its traceback's text: the error user code raised last
    is the one said (not its cause, nor Ray Data's wrapper raised from it), in its first line;
    a block whose frames Ray hid gives its last line; not Ray's error: None."""
    from ray.exceptions import RayTaskError

    from vision_ops.errors import RAISED_FROM, raised_in_a_worker

    def block(frame: str, error: str) -> str:
        return f'Traceback (most recent call last):\n  File "{frame}", line 9\n    x()\n{error}'

    cause = block("store.py", "OSError: [Errno 5] read failed")
    raised = block("model.py", "RuntimeError: device lost\nsecond line of its message")
    wrapper = block("ray/data/map.py", "ray.exceptions.UserCodeException: UDF failed")
    text = f"{cause}\n{RAISED_FROM}\n\n{raised}\n{RAISED_FROM}\n\n{wrapper}"
    assert raised_in_a_worker(RayTaskError("f", text, RuntimeError())) == (
        "RuntimeError: device lost"
    )
    hidden = RayTaskError("f", "ValueError: cannot convert the batch", ValueError())
    assert raised_in_a_worker(hidden) == "ValueError: cannot convert the batch"
    assert raised_in_a_worker(RuntimeError("device lost")) is None


def test_an_actors_failure_as_it_started_is_one_line() -> None:
    """Ray passes an actor's `__init__` error on as its traceback's text: a vision-ops error
    keeps its exit code, any other is its error line (not Ray's 60-line text); an actor lost
    from outside (no traceback) is left to the caller."""
    from ray.exceptions import RayActorError

    from vision_ops.errors import EXIT_FAILED, raised_as_an_actor_started

    def died(error: str) -> RayActorError:
        trace = 'Traceback (most recent call last):\n  File "actor.py", line 9\n    load()\n'
        return RayActorError(error_msg=f"The actor died in its creation task\n{trace}{error}")

    folder = died("IsADirectoryError: [Errno 21] Is a directory: '/w'")
    try:
        raise RuntimeError("the pool failed") from folder
    except RuntimeError as err:
        found = raised_as_an_actor_started(err)
    assert found == ("IsADirectoryError: [Errno 21] Is a directory: '/w'", EXIT_FAILED)
    ours = died("vision_ops.errors.ModelError: model weights /w: not a state_dict")
    assert raised_as_an_actor_started(ours) == ("model weights /w: not a state_dict", EXIT_BAD_SPEC)
    lost = RayActorError(error_msg="The actor died unexpectedly before finishing this task.")
    assert raised_as_an_actor_started(lost) is None


@pytest.mark.parametrize("command", ["verify", "report", "query"])
def test_a_table_uri_with_credentials_is_refused_without_echo(command: str, capsys) -> None:
    assert main([command, "s3://AKIAK:SECRETX@bucket/t"]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert (
        err.startswith(
            "error: TARGET: a URI with credentials in it (a password, a token, a signed query)"
        )
        and "SECRETX" not in err
    )


def test_a_truth_uri_with_credentials_is_refused_without_echo(tmp_path, capsys) -> None:
    truth = "https://h/labels.csv?X-Amz-Signature=SECRETX"
    assert main(["evaluate", str(tmp_path / "t"), "--truth", truth]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert err.startswith("error: --truth: a URI with credentials in it") and "SECRETX" not in err


def test_the_log_level_comes_from_the_environment(tmp_path, monkeypatch, capsys, caplog) -> None:
    """VISION_OPS_LOG_LEVEL (which `submit` ships to the job): DEBUG also logs an unexpected
    error's traceback; a level that is none is refused before any work."""
    import logging

    import vision_ops.outputs

    def broken(*_: object) -> None:
        raise KeyError("files")

    monkeypatch.setattr(vision_ops.outputs, "verify_run", broken)
    root = logging.getLogger()
    monkeypatch.setenv("VISION_OPS_LOG_LEVEL", "debug")
    with caplog.at_level(logging.NOTSET):
        assert main(["verify", str(tmp_path)]) == EXIT_FAILED
        assert (logging.getLogger("vision_ops").level, root.level) == (logging.DEBUG, logging.INFO)
    assert capsys.readouterr().err == "error: KeyError: 'files'\n"
    (failed,) = [r for r in caplog.records if r.message == "verify failed"]
    assert failed.levelno == logging.DEBUG and failed.exc_info[0] is KeyError
    monkeypatch.setenv("VISION_OPS_LOG_LEVEL", "LOUD")
    assert main(["verify", str(tmp_path)]) == EXIT_BAD_SPEC
    assert capsys.readouterr().err == (
        "error: VISION_OPS_LOG_LEVEL: expected one of DEBUG, INFO, WARNING, ERROR, found 'LOUD'\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["backfill", "s.yaml", "--from", "2026-13-01", "--to", "2026-12-01"],
            "argument --from: expected a date as YYYY-MM-DD, found '2026-13-01': month must be "
            "in 1..12",
        ),
        (
            ["run", "s.yaml", "--run-date", "2026-W49-1"],
            "argument --run-date: expected a date as YYYY-MM-DD, found '2026-W49-1'",
        ),
        (
            ["query", "t", "--as-of", "yesterday"],
            "argument --as-of: expected an ISO 8601 date or time (2026-12-01, "
            "2026-12-01T02:30:00Z), found 'yesterday'",
        ),
    ],
)
def test_a_bad_date_option_says_what_was_expected(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == EXIT_BAD_SPEC
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")


def test_a_logged_traceback_has_its_credentials_masked() -> None:
    """At DEBUG an unexpected error's traceback is logged: the URLs in it are masked as the
    `error:` line's are."""
    import logging
    import sys

    from vision_ops.logs import MaskedFormatter

    try:
        raise RuntimeError("cannot reach https://u:SECRET@h/x?X-Amz-Signature=SIG")
    except RuntimeError:
        record = logging.LogRecord("vision_ops", logging.DEBUG, "cli", 1, "run failed", None,
                                   sys.exc_info())  # fmt: skip
    line = MaskedFormatter("%(message)s").format(record)
    assert "Traceback" in line and "https://***@h/x?***" in line
    assert "SECRET" not in line and "SIG" not in line


def test_an_error_quoting_a_url_masks_its_user_and_password(capsys) -> None:
    """The last guard, whatever raised: a store's error or RAY_ADDRESS quoting a URL."""
    from vision_ops.cli import _fail

    _fail(RuntimeError("http://admin:PW1@head:8265 and s3://K:S/ecret@b/k refused"), 1)
    _fail(RuntimeError("https://TOKEN@git.example/x; s3://b/users/j@example.com/p.jpg"), 1)
    _fail(RuntimeError("'HTTP://TOKEN@h/x' 'abfs://container@acct/p'"), 1)
    assert capsys.readouterr().err.splitlines() == [
        "error: http://***@head:8265 and s3://***@b/k refused",
        "error: https://***@git.example/x; s3://b/users/j@example.com/p.jpg",
        "error: 'HTTP://***@h/x' 'abfs://container@acct/p'",
    ]


def test_validate_accepts_a_good_spec(spec_file, capsys) -> None:
    assert main(["validate", str(spec_file), "--list-inputs", "--run-id", "nightly-1"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "spec ok: classification with entrypoint model, run nightly-1" in out
    assert "inputs: 3" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("runtime.batch_size=0", "runtime.batch_size: Input should be greater than 0 (found: 0)"),
        ("runtime.batch_sise=8", "runtime.batch_sise: Extra inputs are not permitted"),
        (
            "model.kind=caffe",
            "model: expected kind: torchvision, torchscript, entrypoint, onnx or ppocr",
        ),
        ("model.entrypoint=nowhere.mod:build", "model.entrypoint: cannot import nowhere.mod:build"),
        ("storage_options.s3.secret=hunter2", "credentials never go in the spec"),
    ],
)
def test_bad_spec_exits_2_and_names_the_field(
    spec_file, capsys, own_ray_root, override, message
) -> None:
    assert main(["run", str(spec_file), "--set", override]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert message in err
    assert "hunter2" not in err
    assert not (spec_file.parent / "table").exists()
    # a model refused while Ray started (the entrypoint): the cluster started for it is gone
    assert not ray.is_initialized()


@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_output_that_is_a_file_exits_2_before_any_work(
    spec_file, capsys, own_ray_root, command
) -> None:
    """It passed `validate`; `run` started Ray, then exited 1 saying rows stay staged."""
    table = spec_file.parent / "table"
    table.write_text("not a folder")
    assert main([command, str(spec_file)]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert err == f"error: output.uri: {table} is a file, expected a table's folder\n"
    assert not ray.is_initialized()


def test_missing_input_exits_2_before_any_work(spec_file, capsys, ray_local) -> None:
    assert main(["run", str(spec_file), "--set", "input.uris=[/no/such/dir]"]) == EXIT_BAD_SPEC
    assert "input /no/such/dir: not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "content", "message"),
    [
        ("model.weights", None, "model.weights: {file} not found"),
        ("model.labels", "[not json", "model.labels: {file}: expected UTF-8 text"),
        ("model.labels", '{"cat": "dog"}', "model.labels: {file}: expected class ids"),
    ],
)
def test_validate_refuses_model_files_that_are_missing_or_unreadable(
    spec_file, capsys, override, content, message
) -> None:
    file = spec_file.parent / ("labels.json" if content else "missing.pt")
    if content is not None:
        file.write_text(content)
    assert main(["validate", str(spec_file), "--set", f"{override}={file}"]) == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert message.format(file=file) in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_holdout_that_is_not_there_is_refused_before_any_work(
    spec_file, capsys, own_ray_root, command
) -> None:
    missing = spec_file.parent / "holdout.csv"
    held = f"evaluate={{truth: {missing}, min: {{accuracy: 0.5}}}}"
    assert main([command, str(spec_file), "--set", held]) == EXIT_BAD_SPEC
    assert f"evaluate.truth: {missing} not found" in capsys.readouterr().err
    assert not (spec_file.parent / "table").exists() and not ray.is_initialized()


def test_a_segmentation_holdout_is_a_folder_of_masks(spec_file, capsys) -> None:
    """A segmentation run's hold-out is a folder of PNG masks (its truth format, `masks`, by
    default): `validate` takes one, and refuses a file where the folder should be (it refused
    every folder, as for a file's truth)."""
    masks = spec_file.parent / "truth-masks"
    masks.mkdir()
    labels = spec_file.parent / "labels.txt"
    labels.write_text("background\nred\ngreen\n")
    model = (
        "model={kind: entrypoint, entrypoint: 'toy_models:colour_segmenter', "
        f"labels: {labels}, preprocessing: {{resize: 64, crop: 64, mean: [0, 0, 0], "
        "std: [1, 1, 1]}}"
    )

    def validate(evaluate: str) -> int:
        overrides = ["task={kind: segmentation}", model, f"evaluate={evaluate}"]
        return main(["validate", str(spec_file), *(a for o in overrides for a in ("--set", o))])

    assert validate(f"{{truth: {masks}, min: {{mean_iou: 0.5}}}}") == 0
    assert validate(f"{{truth: {masks}, truth_format: masks}}") == 0
    capsys.readouterr()
    assert validate(f"{{truth: {labels}, min: {{mean_iou: 0.5}}}}") == EXIT_BAD_SPEC
    assert f"evaluate.truth: {labels} is a file, expected a folder" in capsys.readouterr().err


def test_weights_that_do_not_load_in_the_actors_exit_2_with_the_models_message(
    spec_file, capsys, ray_local
) -> None:
    """A weights file that is there but is not a state_dict passes the driver's check (it
    does not read weights); the actors refuse it as they start, and the command says so."""
    garbage = spec_file.parent / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    code = main(["run", str(spec_file), "--set", f"model.weights={garbage}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == EXIT_BAD_SPEC
    assert err.startswith(f"error: model weights {garbage}: not a loadable state_dict: ")
    assert "with `weights_only` set to `False` will likely succeed" not in err  # torch's advice
    assert err.endswith("(as the actors started); nothing was committed")
    assert committed_run(str(spec_file.parent / "table")) is None


def test_a_catalog_whose_type_needs_a_missing_package_exits_2_without_resume_advice(
    spec_file, capsys, ray_local
) -> None:
    """PyIceberg's SQL catalog without SQLAlchemy: exit 2 naming what to install; it exited 1
    with "the rows made durable so far stay staged ... resumes from them", none staged."""
    import importlib.util

    if importlib.util.find_spec("sqlalchemy") is not None:
        pytest.skip("SQLAlchemy is installed: the SQL catalog opens")
    folder = spec_file.parent
    catalog = f"{{type: sql, uri: 'sqlite:///{folder}/cat.db', warehouse: 'file://{folder}/wh'}}"
    table = f"format: iceberg, table: vision.preds, uri: {folder}/ice"
    code = main(["run", str(spec_file), "--set", f"output={{{table}, catalog: {catalog}}}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == EXIT_BAD_SPEC
    assert err.startswith("error: cannot open catalog vision.preds in catalog sqlite:///")
    assert "SQLAlchemy support not installed" in err and "resumes" not in err
    assert not (folder / "ice").exists()


def test_an_error_a_library_raised_on_a_sigterm_is_said_as_the_sigterm(
    spec_file, capsys, monkeypatch
) -> None:
    """A SIGTERM that a lock's or a thread pool's clean-up answered with its own error (seen:
    `RuntimeError: release unlocked lock` as a backfill's run was stopped): exit 143 saying
    what the run left, as for the SIGTERM itself (it was exit 1, "error: RuntimeError: ...",
    with no word of where the backfill stopped)."""
    from vision_ops import cli
    from vision_ops.cli import EXIT_TERMINATED, main
    from vision_ops.errors import Terminated

    def stopped_in_a_lock(spec, on_commit):  # type: ignore[no-untyped-def]
        try:
            raise Terminated
        except Terminated:
            raise RuntimeError("release unlocked lock") from None

    monkeypatch.setattr(cli, "_connect_and_run", stopped_in_a_lock)
    assert main(["run", str(spec_file), "--run-id", "t1", "--run-date", "2026-11-24"]) == (
        EXIT_TERMINATED
    )
    assert capsys.readouterr().err == (
        "error: terminated (SIGTERM): nothing was committed; the rows made durable so far stay "
        "staged, and the same command with --run-id t1 --run-date 2026-11-24 resumes from them\n"
    )


def test_a_sigterm_after_a_backfills_run_committed_stops_the_backfill_there(
    spec_file, capsys, monkeypatch
) -> None:
    """A SIGTERM as a backfill's run says what it committed: the run stands (exit 0 for it,
    with a note), and the backfill runs no later date, exiting 143 saying where it stopped.
    (The SIGTERM raised out of the backfill: "terminated (SIGTERM)", with no word of the run
    it had committed.)"""
    import signal

    from vision_ops import cli
    from vision_ops.cli import EXIT_TERMINATED

    ran: list[str] = []

    def committed(spec, on_commit):  # type: ignore[no-untyped-def]
        cli.stop_on_sigterm()  # as the run does once Ray is up
        run_id, _ = spec.resolved_run()
        ran.append(run_id)
        on_commit()  # as the pipeline calls it once the run is committed
        return committed_summary(run_id)

    def drift_said(drifts):  # type: ignore[no-untyped-def]
        signal.raise_signal(signal.SIGTERM)  # the scheduler's stop, as the summary is said

    monkeypatch.setattr(cli, "_connect_and_run", committed)
    monkeypatch.setattr(cli, "_print_drift", drift_said)
    args = cli._parsed(["backfill", str(spec_file), "--from", "2026-11-01", "--to", "2026-11-03"])
    code, _ = under_its_own_sigterm(lambda: cli.backfill(cli.load_spec_of(args), args))
    assert code == EXIT_TERMINATED
    [run_id] = ran  # the first date's run, and no other
    assert run_id.startswith("2026-11-01-")
    out, err = capsys.readouterr()
    assert f"run {run_id}: 2 items, 2 ok, 0 errors" in out
    assert err == (
        f"note: SIGTERM after run {run_id} committed; its outcome stands (exit 0)\n"
        f"error: terminated (SIGTERM) after run {run_id} committed\n"
        "error: the backfill stopped at 2026-11-01: 2026-11-02..2026-11-03 not run (2 dates)\n"
    )


def under_its_own_sigterm(command: Callable[[], int]) -> tuple[object, object]:
    """A command's exit code (or the KeyboardInterrupt it let out: not to pytest, which would
    end the session on it) and the SIGTERM handler it left; the handler before set again."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    code: object
    try:
        code = command()
    except KeyboardInterrupt as err:
        code = err
    finally:
        after = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, before)
    return code, after


def committed_summary(run_id: str):  # type: ignore[no-untyped-def]
    """What `run` says of a committed run of 2 ok rows (a RunSummary's fields it reads)."""
    from types import SimpleNamespace

    commit = SimpleNamespace(
        rows=2, ok=2, errors=0, skipped=0, resumed=0, files=["f"], partition_uri="p",
        manifest_uri="m",
    )  # fmt: skip
    return SimpleNamespace(
        run_id=run_id, commit=commit, retried=0, retries={}, seconds=1.0,
        pipeline_seconds=1.0, images_per_second=2.0, startup_seconds={}, drift=[],
        skipped_as_done=0,
    )  # fmt: skip


def test_a_sigterm_as_a_committed_run_releases_its_lock_leaves_its_outcome(
    spec_file, capsys, monkeypatch
) -> None:
    """A SIGTERM once the pipeline has committed but before it returns (as it releases the
    table's run lock) is noted: the run's outcome stands, exit 0, with a note. (It raised in
    the pipeline: exit 143, "nothing was committed", of a committed run.)"""
    import signal

    from vision_ops import cli

    def commits_then_stopped(spec, on_commit):  # type: ignore[no-untyped-def]
        cli.stop_on_sigterm()  # as the run does once Ray is up
        on_commit()  # the pipeline's call as its commit returns
        signal.raise_signal(signal.SIGTERM)  # the scheduler's stop, as the lock is released
        return committed_summary(spec.resolved_run()[0])

    monkeypatch.setattr(cli, "_connect_and_run", commits_then_stopped)
    args = cli._parsed(["run", str(spec_file), "--run-id", "k1", "--run-date", "2026-11-01"])
    code, after = under_its_own_sigterm(lambda: cli.run(cli.load_spec_of(args), args))
    assert code == 0
    assert after is cli._terminate  # the run's own handler set again once it was said
    out, err = capsys.readouterr()
    assert "run k1: 2 items, 2 ok, 0 errors" in out
    assert err == "note: SIGTERM after run k1 committed; its outcome stands (exit 0)\n"


def test_backfill_takes_incremental_as_run_does(spec_file) -> None:
    """`backfill --incremental` makes each of its runs incremental, as `run --incremental`
    does (it was an argparse error: the spec's `run.incremental` was the only way)."""
    from vision_ops import cli

    dates = ["--from", "2026-11-01", "--to", "2026-11-02"]
    for flags, incremental in (([], False), (["--incremental"], True)):
        args = cli._parsed(["backfill", str(spec_file), *dates, *flags])
        assert cli.load_spec_of(args).run.incremental is incremental


def test_sigterm_is_handled_from_the_main_thread_only() -> None:
    """`run` called from a workflow runner's thread cannot set a signal handler (ValueError,
    exit 1 after Ray started): it keeps whatever is set; from the main thread SIGTERM raises
    Terminated, as Ctrl-C raises KeyboardInterrupt."""
    import signal
    import threading

    from vision_ops.cli import stop_on_sigterm
    from vision_ops.errors import Terminated

    before = signal.getsignal(signal.SIGTERM)
    failed: list[BaseException] = []

    def in_a_thread() -> None:
        try:
            stop_on_sigterm()
        except BaseException as err:  # what the thread would have failed with
            failed.append(err)

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert failed == [] and signal.getsignal(signal.SIGTERM) is before
    try:
        stop_on_sigterm()
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_cluster_address_where_nothing_answers_fails_at_once(
    spec_file, capsys, own_ray_root, monkeypatch
) -> None:
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    assert main(["run", str(spec_file)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"error: RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there" in err
    assert not (spec_file.parent / "table").exists() and not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", f"http://admin:SECRETPW@127.0.0.1:{port}")  # as `submit`'s
    assert main(["run", str(spec_file)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"error: RAY_ADDRESS=http://127.0.0.1:{port}: no Ray cluster answers there" in err
    assert "SECRETPW" not in err and "admin" not in err
    for bare in (f"admin:SECRETPW@127.0.0.1:{port}", f":SECRETPW@127.0.0.1:{port}"):  # no scheme
        monkeypatch.setenv("RAY_ADDRESS", bare)
        assert main(["run", str(spec_file)]) == EXIT_FAILED
        err = capsys.readouterr().err
        assert f"error: RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster answers there" in err
        assert "SECRETPW" not in err and "admin" not in err
    # `auto` where no cluster runs (a crontab's setting): Ray's own refusal, said in one line
    # with what a cluster with token authentication needs (it was "ConnectionError: ...")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert main(["run", str(spec_file)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("error: RAY_ADDRESS=auto: Ray could not join the cluster (")
    assert err.endswith("(RAY_AUTH_TOKEN, or ~/.ray/auth_token); nothing was done\n")
    assert not ray.is_initialized()


def test_an_s3_output_without_credentials_is_named_before_any_work(
    spec_file, capsys, own_ray_root, monkeypatch, tmp_path
) -> None:
    """Local photos, an s3:// table, no credentials anywhere: `run` and `backfill` name the
    output and where credentials were looked for, and nothing was done (the table's first read,
    its manifests, gave botocore's bare NoCredentialsError)."""
    _no_aws_credentials(monkeypatch, tmp_path)
    output = ["--set", "output.uri=s3://out/t"]
    output += ["--set", "storage_options={s3: {endpoint_url: 'http://127.0.0.1:9'}}"]
    said = (
        "error: output s3://out/t: no credentials for the store: none found in the environment "
        "(AWS_ACCESS_KEY_ID"
    )
    dates = ["--from", "2026-11-01", "--to", "2026-11-02"]
    for command in (["run", str(spec_file)], ["backfill", str(spec_file), *dates]):
        capsys.readouterr()
        assert main([*command, *output]) == EXIT_FAILED
        [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert line.startswith(said) and line.endswith("; nothing was done"), line


def test_a_model_file_on_s3_without_credentials_is_named(
    spec_file, capsys, own_ray_root, monkeypatch, tmp_path
) -> None:
    """A labels file or weights on S3, no credentials anywhere: the field is named with where
    credentials were looked for, before any work (botocore's bare "Unable to locate
    credentials" reached the user for the labels, as an unexpected error)."""
    _no_aws_credentials(monkeypatch, tmp_path)
    endpoint = ["--set", "storage_options={s3: {endpoint_url: 'http://127.0.0.1:9'}}"]
    for field, said in (
        ("model.labels", "model.labels: s3://b/labels.txt cannot be read: no credentials for"),
        ("model.weights", "model.weights: s3://b/labels.txt cannot be read: no credentials for"),
    ):
        for command in ("validate", "run"):
            capsys.readouterr()
            argv = [command, str(spec_file), "--set", f"{field}=s3://b/labels.txt", *endpoint]
            assert main(argv) == EXIT_BAD_SPEC
            [line] = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
            assert line.startswith(f"error: {said}") and "AWS_ACCESS_KEY_ID" in line, line


def _no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credentials anywhere in botocore's chain for the rest of the test."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_a_ray_client_address_is_refused_before_any_work(
    spec_file, capsys, own_ray_root, monkeypatch
) -> None:
    """Ray Data does not run through Ray Client (a run through one to a live cluster failed as
    its listing started: Ray 2.60), and the model in the driver would run off the cluster:
    refused before any connection, either way the model runs."""
    monkeypatch.setenv("RAY_ADDRESS", "ray://admin:SECRETPW@127.0.0.1:10001")
    for predict_in in ("actors", "driver"):
        args = ["run", str(spec_file), "--set", f"runtime.predict_in={predict_in}"]
        assert main(args) == EXIT_BAD_SPEC
        err = capsys.readouterr().err
        assert (
            "error: RAY_ADDRESS=ray://127.0.0.1:10001: a Ray Client address, through which Ray "
            "Data does not run; expected the cluster's GCS address (host:6379, or auto) from a "
            "node of the cluster, or `vision-ops submit` from elsewhere; nothing was done"
        ) in err
        assert "SECRETPW" not in err and "Traceback" not in err
    assert not (spec_file.parent / "table").exists() and not ray.is_initialized()


@pytest.mark.parametrize("ratio", ["-1", "1.5", "nan", "half"])
def test_an_error_ratio_that_is_not_a_share_is_refused(spec_file, capsys, ratio) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", str(spec_file), "--max-error-ratio", ratio])
    assert exited.value.code == EXIT_BAD_SPEC
    err = capsys.readouterr().err
    assert f"--max-error-ratio: expected a share from 0 to 1, found {ratio}" in err


def test_pool_that_does_not_fit_exits_3(spec_file, capsys, ray_local) -> None:
    code = main(["run", str(spec_file), "--set", "runtime.num_cpus_per_actor=2"])
    assert code == EXIT_CLUSTER_TOO_SMALL
    assert "cannot be scheduled: the cluster has 2 CPUs" in capsys.readouterr().err
    assert not (spec_file.parent / "table").exists()


def test_run_commits_and_prints_a_summary(spec_file, capsys, ray_local, monkeypatch) -> None:
    checked: list[str] = []  # the model check, once (it can read storage or build the model)
    check_for_real = models.check_job

    def check_job(spec) -> None:
        checked.append(spec.model.kind)
        check_for_real(spec)

    for module in (models, pipeline_run):
        monkeypatch.setattr(module, "check_job", check_job, raising=True)
    args = ["run", str(spec_file), "--run-id", "cli-1", "--run-date", "2026-11-23"]
    assert main(args) == EXIT_OK
    assert checked == ["entrypoint"]
    out = capsys.readouterr().out
    assert "run cli-1: 3 items, 2 ok, 1 errors" in out
    assert "images/s" in out
    partition = spec_file.parent / "table" / "run_date=2026-11-23"
    assert f"output: file://{partition} (1 file(s))" in out
    startup = committed_run(str(spec_file.parent / "table"), "cli-1")["startup_seconds"]
    assert f"\n{startup_line(startup)}\noutput: " in out  # the manifest's start-up stages
    assert startup_line(startup).startswith("start-up: Ray connect ")
    table = pq.read_table(partition)
    assert table.num_rows == 3 and set(table["run_id"].to_pylist()) == {"cli-1"}
    sql = "SELECT status, count(*) AS n FROM predictions GROUP BY status ORDER BY status"
    assert main(["query", str(spec_file), sql]) == EXIT_OK
    shown = capsys.readouterr().out
    assert "│ error   │     1 │" in shown and "│ ok      │     2 │" in shown
    assert main(["query", str(spec_file)]) == EXIT_OK  # the default summary per label
    assert "mean_score" in capsys.readouterr().out


def test_error_ratio_above_the_limit_exits_4(spec_file, ray_local) -> None:
    args = ["run", str(spec_file), "--run-id", "cli-2", "--max-error-ratio", "0.2"]
    assert main(args) == EXIT_TOO_MANY_ERRORS


CLUSTER_HOST = textwrap.dedent(
    """
    import os, sys, tempfile
    from ray.cluster_utils import Cluster
    # In the suite's Ray root, whose `ray` folder takes the Cluster's address file.
    temp = tempfile.mkdtemp(prefix="c", dir=os.environ["RAY_TMPDIR"])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": temp},
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    print(cluster.address, flush=True)
    sys.stdin.read()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_console_script_runs_on_a_two_node_cluster_from_ray_address(spec_file, tmp_path) -> None:
    host = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_HOST],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        address = host.stdout.readline().strip()  # type: ignore[union-attr]
        assert address, "the cluster host printed no address"
        env = os.environ | {"RAY_ADDRESS": address}
        args = [str(CONSOLE_SCRIPT), "run", str(spec_file), "--run-id", "two-nodes"]
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    finally:
        host.communicate(input="", timeout=120)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    assert "run two-nodes: 3 items, 2 ok, 1 errors" in done.stdout
    assert "Started a local Ray instance" not in done.stderr
    table = pq.read_table(next((tmp_path / "table").glob("run_date=*")))
    assert sorted(table["status"].to_pylist()) == ["error", "ok", "ok"]


def test_validate_counts_the_inputs_as_a_run_lists_them(spec_file, capsys) -> None:
    """A table inside the input folder: its files are no inputs, in validate's count too."""
    spec = yaml.safe_load(spec_file.read_text())
    photos = Path(spec["input"]["uris"][0])
    spec["output"]["uri"] = str(photos / "table")
    (photos / "table" / "run_date=2026-01-01").mkdir(parents=True)
    (photos / "table" / "run_date=2026-01-01" / "mask.png").write_bytes(b"png")
    (photos / "tables.png").write_bytes(b"png")  # beside the table, not in it: an input
    spec_file.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(spec_file), "--list-inputs"]) == EXIT_OK
    assert "inputs: 4" in capsys.readouterr().out


def test_a_table_around_the_inputs_keeps_them(spec_file, capsys) -> None:
    """The table at the inputs' parent (a bucket's root): the inputs asked for are kept."""
    spec = yaml.safe_load(spec_file.read_text())
    spec["output"]["uri"] = str(Path(spec["input"]["uris"][0]).parent)
    spec_file.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(spec_file), "--list-inputs"]) == EXIT_OK
    assert "inputs: 3" in capsys.readouterr().out


def test_the_table_apart_from_the_inputs_is_found_in_any_form() -> None:
    from vision_ops.config import InputSpec
    from vision_ops.sources import table_apart

    photos = InputSpec(uris=["s3://lake/images/", "s3://lake/more/*.jpg"])
    assert table_apart(photos, "s3://lake/images/table", {}) == "s3://lake/images/table/"
    assert table_apart(photos, "s3://lake/images2", {}) == "s3://lake/images2/"
    assert table_apart(photos, "s3://lake", {}) is None  # around the inputs: none left out
    assert table_apart(photos, "s3://lake/more/", {}) is None
