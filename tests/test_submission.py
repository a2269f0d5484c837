"""Ray Jobs: a real `ray start --head` with token authentication takes a job through
`vision-ops submit`; the output is queryable; a submit without the token is refused."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from process_session import kill_session
from ray_temp_root import short_temp_dir

from vision_ops.devstack import free_ports
from vision_ops.errors import EXIT_BAD_SPEC, EXIT_FAILED, EXIT_TOO_MANY_ERRORS
from vision_ops.submission import SubmissionError, masked, passed_env

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
CLI = [sys.executable, "-m", "vision_ops.cli"]
AGENT_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


def test_secret_looking_variables_are_never_shipped(monkeypatch) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-shipped")
    assert passed_env([]) == {"AWS_REGION": "eu-west-1"}
    with pytest.raises(SubmissionError, match="looks like a credential") as refused:
        passed_env(["AWS_SECRET_ACCESS_KEY"])
    assert refused.value.exit_code == EXIT_BAD_SPEC  # the command's own input: no work done
    monkeypatch.delenv("VISION_OPS_UNSET", raising=False)
    with pytest.raises(SubmissionError, match=r"^--env VISION_OPS_UNSET: not set here") as unset:
        passed_env(["VISION_OPS_UNSET"])
    assert unset.value.exit_code == EXIT_BAD_SPEC
    monkeypatch.setenv("VISION_OPS_UNSET", "1")
    assert passed_env(["VISION_OPS_UNSET"]) == {"AWS_REGION": "eu-west-1", "VISION_OPS_UNSET": "1"}
    for name in (
        "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS", "HTTP_AUTH", "DB_PASS",
        "GITHUB_TOKEN", "OPENAI_APIKEY", "hf-token", "PG_PASSWORD", "GOOGLE_CREDENTIALS",
        "DB_CONN_STR", "AWS_SESSION_TOKEN", "DB_PWD", "GITHUB_PAT", "SENTRY_DSN",
        "MY_SECRETS", "API_TOKENS", "DB_PASSWORD2", "APIKEY2", "KEYS", "PASSWORDS",
        "WEBHOOK_SIGNATURE", "SESSION_COOKIE",
    ):  # fmt: skip
        monkeypatch.setenv(name, "AccountKey=never-shipped")
        with pytest.raises(SubmissionError, match=f"^--env {name}: looks like a credential"):
            passed_env([name])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:never-shipped@mlflow.example")
    with pytest.raises(SubmissionError, match=r"^--env MLFLOW_TRACKING_URI: a URL with cred"):
        passed_env(["MLFLOW_TRACKING_URI"])


def test_names_that_only_contain_a_credentials_letters_are_shipped(monkeypatch) -> None:
    names = ["BYPASS_CACHE", "AUTHOR", "DB_CONNECTION_TIMEOUT", "PASSENGER_MODEL", "KEYFRAMES"]
    for name in names:
        monkeypatch.setenv(name, "1")
    assert passed_env(names) == dict.fromkeys(names, "1")


def test_a_passed_variable_holding_credentials_is_refused_not_shipped(monkeypatch) -> None:
    """AWS_ENDPOINT_URL travels by default: with a password in it, the job is not sent."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:never-shipped@minio:9000")
    with pytest.raises(SubmissionError) as caught:
        passed_env([])
    assert str(caught.value).startswith("AWS_ENDPOINT_URL: a URL with credentials in it")
    assert caught.value.exit_code == EXIT_BAD_SPEC
    assert "never-shipped" not in str(caught.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert passed_env([]) == {"AWS_ENDPOINT_URL": "http://minio:9000"}


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head --block` on 127.0.0.1, token auth on, in a private temp dir."""
    token = secrets.token_hex(16)
    temp = short_temp_dir("voh")
    gcs_port, dashboard_port, *agent_ports = free_ports(6)
    # No RAY_ADDRESS, auth mode or token of the session's; its Ray temp root (RAY_TMPDIR) stays.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_TMPDIR"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": str(temp)}
    # The cluster's own environment: its `python` has vision-ops' dependencies.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    command = [
        shutil.which("ray") or str(Path(sys.executable).with_name("ray")),
        "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
        f"--temp-dir={temp}", "--include-dashboard=true",
        # Fresh ports for the head's agents: the session's own local cluster holds the defaults.
        *[f"--{flag}={port}" for flag, port in zip(AGENT_PORT_FLAGS, agent_ports, strict=True)],
    ]  # fmt: skip
    head = subprocess.Popen(command, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for(f"{address}/api/version", timeout_s=120)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=60)  # a graceful stop
        kill_session(head.pid)  # what it left: its workers are in process groups of their own
        shutil.rmtree(temp, ignore_errors=True)


def client_for(address: str, env: dict[str, str]):  # type: ignore[no-untyped-def]
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(
        address, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    )


def wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # up, and asking for a token
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer in {timeout_s}s")


@pytest.fixture
def job_spec(tmp_path: Path, photo_paths: list[Path]) -> Path:
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in photo_paths[:2]:
        (photos / path.name).write_bytes(path.read_bytes())
    spec = {
        "input": {"uris": [str(photos)]},
        "model": {
            "kind": "entrypoint",
            "entrypoint": "vision_ops.zoo:efficientnet_lite0",
            "labels": "imagenet-1k",
            "preprocessing": {"resize": 256, "crop": 224, "mean": [0.498] * 3, "std": [0.502] * 3},
        },
        "runtime": {"batch_size": 4},
        "output": {"uri": str(tmp_path / "table")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_submit_runs_the_job_and_its_output_is_queryable(ray_head, job_spec, tmp_path) -> None:
    address, env = ray_head
    # The submitter holds canary credentials: they must not travel with the job nor be printed.
    canary = {"AWS_ACCESS_KEY_ID": "AKIACANARYSUBMIT0000", "AWS_SECRET_ACCESS_KEY": "canary/sub+9"}
    args = [*CLI, "submit", str(job_spec), "--address", address, "--run-id", "sub-1", "--wait"]
    done = subprocess.run(args, env=env | canary, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    job_id = done.stdout.split()[1]
    assert f"{job_id}: SUCCEEDED" in done.stdout
    secrets_seen = [env["RAY_AUTH_TOKEN"], *canary.values()]
    assert not [s for s in secrets_seen if s in done.stdout + done.stderr]
    info = client_for(address, env).get_job_info(job_id)
    assert not [s for s in canary.values() if s in json.dumps(info.runtime_env or {})]
    shown = subprocess.run([*CLI, "status", job_id, "--address", address], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shown.stdout.strip() == "SUCCEEDED"
    logs = subprocess.run([*CLI, "logs", job_id, "--address", address], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "run sub-1: 2 items, 2 ok, 0 errors" in logs.stdout
    assert not [s for s in canary.values() if s in logs.stdout + logs.stderr]
    sql = "SELECT count(*) AS n, min(run_id) AS run FROM predictions"
    query = subprocess.run([*CLI, "query", str(tmp_path / "table"), sql, "--format", "csv"],
                           env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert query.stdout.splitlines() == ["n,run", "2,sub-1"]
    # The run's outcome flags travel with the job: an incremental night whose one new input
    # is broken exits 4 over --max-error-ratio, on the cluster and so here.
    (job_spec.parent / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    night = ["--run-id", "sub-2", "--incremental", "--max-error-ratio", "0.2", "--wait"]
    args = [*CLI, "submit", str(job_spec), "--address", address, *night]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == EXIT_TOO_MANY_ERRORS, done.stdout + done.stderr[-3000:]
    job_id = done.stdout.split()[1]
    logs = subprocess.run([*CLI, "logs", job_id, "--address", address], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "run sub-2: 1 items, 0 ok, 1 errors" in logs.stdout


def test_submit_without_the_token_is_refused(ray_head, job_spec, tmp_path) -> None:
    address, env = ray_head
    anonymous = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    (tmp_path / "tmp").mkdir()
    anonymous |= {
        "RAY_AUTH_MODE": "disabled",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path / "tmp"),
    }
    args = [*CLI, "submit", str(job_spec), "--address", address]
    done = subprocess.run(args, env=anonymous, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "error:" in done.stderr and ("401" in done.stderr or "uthentication" in done.stderr)
    assert not (tmp_path / "table").exists()
    assert not list((tmp_path / "tmp").glob("vision-ops-job-*"))  # the spec's folder is gone


@pytest.mark.parametrize(
    "address", ["http://ops:pw-hunter2@127.0.0.1:1", "ops:pw-hunter2@127.0.0.1:1"]
)
def test_a_password_in_the_address_is_never_printed(tmp_path, address: str) -> None:
    """A URL's, and a bare address's (Ray's usual form, which it was printed whole in)."""
    shown = address.replace("ops:pw-hunter2@", "***@")
    assert masked(f"cannot reach {address}/api", address) == f"cannot reach {shown}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "HOME": str(tmp_path)
    }
    for command in (["status", "raysubmit_1"], ["logs", "raysubmit_1"], ["stop", "raysubmit_1"]):
        done = subprocess.run(
            [*CLI, *command, "--address", address], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 1 and "error:" in done.stderr
        assert "hunter2" not in done.stderr + done.stdout


def test_submit_leaves_the_clusters_files_to_the_cluster(job_spec, tmp_path) -> None:
    """Weights, labels and a hold-out that only the cluster's storage holds: `validate` here
    refuses them, `submit` goes on to the cluster (here one that does not answer: exit 1)."""
    cluster_only = "/only-on-the-cluster"
    overrides = [
        "--set", f"model.weights={cluster_only}/w.pt",
        "--set", f"model.labels={cluster_only}/labels.json",
        "--set", f"evaluate={{truth: {cluster_only}/holdout.csv, min: {{accuracy: 0.5}}}}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "HOME": str(tmp_path)
    }
    checked = subprocess.run([*CLI, "validate", str(job_spec), *overrides], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert checked.returncode == 2
    assert f"model.weights: {cluster_only}/w.pt not found" in checked.stderr
    address = "http://127.0.0.1:1"
    sent = subprocess.run([*CLI, "submit", str(job_spec), *overrides, "--address", address],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert sent.returncode == 1 and "error:" in sent.stderr and address in sent.stderr
    assert cluster_only not in sent.stderr


def test_submit_wait_exits_as_the_job_did_and_says_when_it_stopped_waiting(
    ray_head, job_spec
) -> None:
    """A job whose run exits 2 (its weights are not there): `--wait` exits 2 too, for a
    schedule to tell a bad spec from a broken run; past `--timeout` it says the job is still
    going, and leaves it."""
    address, env = ray_head
    missing = ["--set", "model.weights=/not-on-the-cluster/w.pt", "--address", address]
    args = [*CLI, "submit", str(job_spec), *missing, "--wait", "--run-id", "bad-weights"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_BAD_SPEC, done.stdout + done.stderr[-3000:]
    job_id = done.stdout.split()[1]
    assert f"{job_id}: FAILED" in done.stdout
    assert "model.weights: /not-on-the-cluster/w.pt not found" in done.stderr
    args = [*CLI, "submit", str(job_spec), *missing, "--wait", "--timeout", "0"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    job_id = done.stdout.split()[1]
    assert done.returncode == EXIT_FAILED
    assert re.search(
        rf"^error: --timeout 0s passed and job {job_id} is still (PENDING|RUNNING): it was not "
        rf"stopped \(`vision-ops stop {job_id}` stops it\)$",
        done.stderr,
        re.MULTILINE,
    ), done.stderr


@pytest.mark.parametrize(
    ("override", "field", "path"),
    [
        ("output.uri=preds", "output.uri", "preds"),
        ("input.uris=[./photos]", "input.uris[0]", "./photos"),
        ("model.labels=labels.txt", "model.labels", "labels.txt"),
        ("evaluate={truth: holdout.csv, min: {accuracy: 0.5}}", "evaluate.truth", "holdout.csv"),
    ],
)
def test_submit_refuses_a_relative_path_before_reaching_the_cluster(
    job_spec, tmp_path, override: str, field: str, path: str
) -> None:
    """On the cluster a relative path names the job's temporary working folder: a table
    written there is deleted with it. Refused here (exit 2), the cluster never asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "HOME": str(tmp_path)
    }
    args = [*CLI, "submit", str(job_spec), "--set", override, "--address", "http://127.0.0.1:1"]
    sent = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert (sent.returncode, sent.stdout) == (EXIT_BAD_SPEC, "")
    assert sent.stderr.startswith(f"error: {field}: {path!r} is a relative path, which the ")


def test_submit_refuses_an_env_it_cannot_ship_before_reaching_the_cluster(
    job_spec, tmp_path
) -> None:
    """`--env` naming a credential, or one not set here: the command's own input, refused
    with exit 2 as a bad spec is (it exited 1, the code of a cluster that does not answer)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "HOME": str(tmp_path),
        "MY_TOKEN": "never-shipped",
    }
    for name, said in (("MY_TOKEN", "looks like a credential"), ("NOT_SET_HERE", "not set here")):
        args = [*CLI, "submit", str(job_spec), "--env", name, "--address", "http://127.0.0.1:1"]
        sent = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert (sent.returncode, sent.stdout) == (EXIT_BAD_SPEC, "")
        assert sent.stderr.startswith(f"error: --env {name}: {said}")


def test_stop_ends_a_submitted_job(ray_head, job_spec) -> None:
    address, env = ray_head
    args = [*CLI, "submit", str(job_spec), "--address", address, "--run-id", "to-stop"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    job_id = done.stdout.split()[1]
    stopped = subprocess.run([*CLI, "stop", job_id, "--address", address], env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert stopped.returncode == 0 and f"{job_id}: stop requested=" in stopped.stdout
    deadline, state = time.monotonic() + 120, ""
    while time.monotonic() < deadline and state not in ("STOPPED", "SUCCEEDED", "FAILED"):
        shown = subprocess.run(
            [*CLI, "status", job_id, "--address", address],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        state = shown.stdout.strip()
        time.sleep(1)
    assert state == "STOPPED"
