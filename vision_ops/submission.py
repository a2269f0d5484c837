"""Ray Jobs: submit a spec to a cluster's Jobs API, follow it, stop it (Ray's JobSubmissionClient).

The job carries the validated spec and the `vision_ops` package in its runtime_env; the
cluster's image provides the dependencies. Credentials are never shipped: nodes use their own
credential chain (instance profile, IRSA), and only non-secret environment variables travel.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import vision_ops
from vision_ops.config import JobSpec, SpecError
from vision_ops.errors import EXIT_BAD_SPEC, EXIT_FAILED, VisionOpsError
from vision_ops.storage import address_userinfo, holds_credentials, names_a_credential

# Environment variables a job gets from the submitter when set here (none of them secret).
PASSED_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "VISION_OPS_LOG_LEVEL")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
SPEC_NAME = "job.yaml"
AGENT_WAIT_S = 300  # how long a fresh head may take to start the agent that runs jobs


class SubmissionError(VisionOpsError, RuntimeError):
    """The cluster refused the job or cannot be reached; says which and why."""

    exit_code = EXIT_FAILED


class EnvRefused(SubmissionError):
    """An environment variable the job would carry that cannot go (a credential's name or a
    URL with credentials in it, or `--env` naming one not set here): refused before the
    cluster is asked, as a bad spec is."""

    exit_code = EXIT_BAD_SPEC


@dataclass(frozen=True)
class Submitted:
    job_id: str
    run_id: str


def masked(text: str, address: str | None) -> str:
    """`text` with the user and password of `address` (http://user:password@head:8265, or a
    bare user:password@head:8265), if it has them, masked: they must not reach a terminal or a
    log."""
    found = address_userinfo(address or "")
    return text.replace(f"{found}@", "***@") if found else text


def refuse_relative_paths(spec: JobSpec) -> None:
    """SpecError naming the first file or folder the spec names by a relative path: on the
    cluster it would be read in (or, the table, written to) the job's temporary working folder,
    which holds only the spec and is deleted after the job."""
    for field, uri in _named_locations(spec):
        if "://" not in uri and not os.path.isabs(uri):
            raise SpecError(
                f"{field}: {uri!r} is a relative path, which the cluster would read as a path in "
                "the job's temporary working folder; expected a store's URI (s3://, gs://, ...) "
                "or an absolute path that every node mounts"
            )


def _named_locations(spec: JobSpec) -> Iterator[tuple[str, str]]:
    """Each file or folder the spec names, with its field: inputs, the table, the model's
    files (not a weights enum or a built-in label set) and the hold-out."""
    yield from ((f"input.uris[{index}]", uri) for index, uri in enumerate(spec.input.uris))
    if spec.input.manifest:
        yield "input.manifest", spec.input.manifest
    yield "output.uri", spec.output.uri
    yield from ((f"model.{field}", uri) for field, uri in spec.model.files().items())
    if spec.evaluate is not None and spec.evaluate.truth:
        yield "evaluate.truth", spec.evaluate.truth


def client(address: str | None) -> Any:
    """A Jobs API client; the cluster token (RAY_AUTH_TOKEN) goes in the Authorization header."""
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise SubmissionError("no cluster: expected --address URL or RAY_ADDRESS")
    token = os.environ.get("RAY_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:  # connection refused, 401/403: Ray says which
        message = f"cannot reach the Jobs API at {address}: {err}"
        raise SubmissionError(masked(message, address)) from None


def passed_env(extra: list[str]) -> dict[str, str]:
    """The environment variables to ship; a secret-looking name is refused, not shipped, and so
    is a value holding credentials (AWS_ENDPOINT_URL with a password in it)."""
    names = [*PASSED_ENV, *extra]
    secret = [name for name in extra if names_a_credential(name)]
    if secret:
        raise EnvRefused(
            f"--env {secret[0]}: looks like a credential; nodes use their own credential chain"
        )
    unset = [name for name in extra if name not in os.environ]
    if unset:
        raise EnvRefused(f"--env {unset[0]}: not set here, so there is nothing to ship")
    secret = [name for name in names if holds_credentials(os.environ.get(name, ""))]
    if secret:
        shown = f"--env {secret[0]}" if secret[0] in extra else secret[0]
        raise EnvRefused(
            f"{shown}: a URL with credentials in it (a user or password, a signed query), which "
            "the job would carry to every node; nodes use their own credential chain"
        )
    return {name: os.environ[name] for name in names if name in os.environ}


def submit(
    spec: JobSpec,
    address: str,
    env_names: list[str] | None = None,
    max_error_ratio: float = 1.0,
) -> Submitted:
    """Ship the spec and the package; the job runs `vision-ops run` on the cluster (with
    `--max-error-ratio`, exit 4 over it; --incremental travels in the spec). The spec's folder
    is uploaded as the submission is made, and removed here after it."""
    run_id, run_date = spec.resolved_run()
    env_vars = passed_env(env_names or [])
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="vision-ops-job-") as workdir:
        (Path(workdir) / SPEC_NAME).write_text(yaml.safe_dump(spec.model_dump(mode="json")))
        runtime_env = {
            "working_dir": workdir,
            "py_modules": [str(Path(vision_ops.__file__).parent)],
            "env_vars": env_vars,
        }
        command = (
            f"python -m vision_ops.cli run {SPEC_NAME} --run-id {run_id} --run-date {run_date} "
            f"--max-error-ratio {max_error_ratio!r}"
        )
        job_id = _submitted(jobs, address, command, runtime_env, run_id)
    return Submitted(job_id=job_id, run_id=run_id)


def _submitted(
    jobs: Any, address: str, command: str, runtime_env: dict[str, Any], run_id: str
) -> str:
    """The job id the Jobs API gives the job, once its job agent takes it."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return str(
                jobs.submit_job(
                    entrypoint=command,
                    runtime_env=runtime_env,
                    metadata={"vision_ops_run_id": run_id},
                )
            )
        except Exception as err:
            if "try again later" not in str(err) or time.monotonic() > deadline:
                raise SubmissionError(
                    masked(f"{address} refused the job: {err}", address)
                ) from None
            time.sleep(2)  # a head that just started has no job agent yet


def status(address: str, job_id: str) -> str:
    return str(client(address).get_job_status(job_id).value)


def logs(address: str, job_id: str) -> str:
    return str(client(address).get_job_logs(job_id))


def stop(address: str, job_id: str) -> bool:
    return bool(client(address).stop_job(job_id))


def exit_code(address: str, job_id: str) -> int:
    """The exit code of an ended job's `vision-ops run` (errors.EXIT_*: 2 a bad spec, 4 too
    many error rows ...), as Ray recorded it; EXIT_FAILED where it recorded none (a job
    stopped, or its driver lost)."""
    code = client(address).get_job_info(job_id).driver_exit_code
    return code if isinstance(code, int) and code > 0 else EXIT_FAILED


def wait(address: str, job_id: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Poll until the job ends; its final status (or the last seen, at the timeout)."""
    deadline = time.monotonic() + timeout_s
    state = status(address, job_id)
    while state not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll_s)
        state = status(address, job_id)
    return state
