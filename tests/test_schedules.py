"""KubeRay manifests and the cron example: well-formed, and running the nightly job safely."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).parents[1] / "jobs" / "k8s"
REPO_JOBS = Path(__file__).parents[1] / "jobs"


def entrypoint_spec(entrypoint: str) -> Path:
    """The spec a manifest's entrypoint runs, mapped from the image's path to this checkout."""
    path = next(word for word in entrypoint.split() if word.endswith(".yaml"))
    return REPO_JOBS / Path(path).name


def test_rayjob_runs_a_spec_on_an_autoscaling_cluster() -> None:
    job = yaml.safe_load((K8S / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("vision-ops run ")
    assert entrypoint_spec(spec["entrypoint"]).exists()
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert groups["gpu"]["minReplicas"] == 0
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    text = (K8S / "rayjob.yaml").read_text().lower()
    assert "aws_secret" not in text and "secretkeyref" in text  # the Ray token, from a Secret


@pytest.mark.parametrize("manifest", ["rayjob.yaml", "raycronjob.yaml"])
def test_the_submitter_can_reach_a_loopback_only_jobs_api(manifest: str) -> None:
    """The head's dashboard (the Jobs API) listens on 127.0.0.1 only: KubeRay's default
    submitter, a pod of its own, could not reach it. SidecarMode submits from the head's pod,
    which must then never restart."""
    document = yaml.safe_load((K8S / manifest).read_text())["spec"]
    job = document.get("jobTemplate", document)
    head = job["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert job["submissionMode"] == "SidecarMode"
    assert head["template"]["spec"]["restartPolicy"] == "Never"


def test_raycronjob_backfills_logical_dates() -> None:
    cron = yaml.safe_load((K8S / "raycronjob.yaml").read_text())
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert cron["spec"]["schedule"] == "30 2 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    entrypoint = cron["spec"]["jobTemplate"]["entrypoint"]
    assert entrypoint.startswith("bash -c 'vision-ops backfill ") and "--from" in entrypoint
    assert entrypoint_spec(entrypoint).exists()
    assert "vision-ops report /home/ray/vision-ops/jobs/classify.yaml --check --since" in entrypoint


SCHEDULE_OUTCOMES = [((), 0), (("backfill",), 7), (("report",), 6), (("backfill", "report"), 7)]


def stub_vision_ops(folder: Path, failing: tuple[str, ...], log: Path) -> None:
    """A vision-ops that logs what it was asked and fails where `failing` says (the backfill
    with 7: a date committed, not scored; the check with 6: drift)."""
    codes = {"backfill": 7, "report": 6}
    exits = "".join(f'[ "$1" != {name} ] || exit {codes[name]}\n' for name in failing)
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "vision-ops"
    tool.write_text(f'#!/bin/sh\necho "$1 said" >> {log}\n{exits}')
    tool.chmod(0o755)


@pytest.mark.parametrize(("failing", "exit_code"), SCHEDULE_OUTCOMES)
def test_the_raycronjob_entrypoint_runs_both_commands_in_the_job(
    tmp_path: Path, failing: tuple[str, ...], exit_code: int
) -> None:
    """As KubeRay's sidecar submitter runs it: `ray job submit ... -- ENTRYPOINT ;` in a
    `bash -e` script; `ray job submit` joins the words after `--` (shlex.join) into the job's
    command, run through a shell. Both commands run in the job, and it exits as the backfill
    did where it failed, else as the check did (a bare `;` in the entrypoint ended the job
    after the backfill and ran the check in the submitter)."""
    cron = yaml.safe_load((K8S / "raycronjob.yaml").read_text())
    entrypoint = cron["spec"]["jobTemplate"]["entrypoint"]
    bin_folder, log, job_log = tmp_path / "bin", tmp_path / "said.log", tmp_path / "job.log"
    stub_vision_ops(bin_folder, failing, log)
    ray = bin_folder / "ray"
    ray.write_text(
        f"#!{sys.executable}\nimport shlex, subprocess, sys\n"
        "command = shlex.join(sys.argv[sys.argv.index('--') + 1 :])\n"
        f"with open({str(job_log)!r}, 'w') as log:\n"
        "    log.write(command)\n"
        "sys.exit(subprocess.run(command, shell=True).returncode)\n"
    )
    ray.chmod(0o755)
    script = f"ray job submit --address http://127.0.0.1:8265 -- {entrypoint} ;\n"
    environment = {"PATH": f"{bin_folder}:/usr/bin:/bin"}
    ran = subprocess.run(["bash", "-e", "-c", script], env=environment, timeout=60)
    assert job_log.read_text().startswith("bash -c ")  # the whole script is the job's
    assert ran.returncode == exit_code
    assert log.read_text().splitlines() == ["backfill said", "report said"]


def test_crontab_example_backfills_logical_dates() -> None:
    lines = [
        line
        for line in (K8S / "crontab.example").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    (line,) = lines
    fields = line.split(maxsplit=5)
    assert fields[:5] == ["30", "2", "*", "*", "*"]
    assert "vision-ops backfill jobs/classify.yaml --from" in fields[5]
    assert r"+\%F" in fields[5]  # % escaped for cron
    report = "; filled=$?; RAY_ADDRESS=auto .venv/bin/vision-ops report jobs/classify.yaml"
    since = """--check --since "$(date -u -d '3 days ago' +\\%F)"; checked=$?;"""
    assert f"{report} {since} exit $(( filled ? filled : checked )); }}" in line


@pytest.mark.parametrize(("failing", "exit_code"), SCHEDULE_OUTCOMES)
def test_the_crontab_line_runs_both_commands_and_exits_as_the_first_that_failed(
    tmp_path: Path, failing: tuple[str, ...], exit_code: int
) -> None:
    """The line as cron runs it (sh, `\\%` unescaped), with a vision-ops that says what it was
    asked and fails where `failing` says (the backfill with 7: a date committed, not scored;
    the check with 6: drift): the check runs whatever the backfill's exit, everything either
    printed is in the log, and the line exits as the backfill did where it failed."""
    (line,) = [
        text
        for text in (K8S / "crontab.example").read_text().splitlines()
        if text and not text.startswith("#")
    ]
    log = tmp_path / "nightly.log"
    command = line.split(maxsplit=5)[5].replace("\\%", "%")
    command = command.replace("/srv/vision-ops", str(tmp_path))
    command = command.replace("/var/log/vision-ops-nightly.log", str(log))
    said = tmp_path / "said.log"
    stub_vision_ops(tmp_path / ".venv" / "bin", failing, said)
    ran = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout, ran.stderr) == (exit_code, "", "")
    assert said.read_text().splitlines() == ["backfill said", "report said"]
