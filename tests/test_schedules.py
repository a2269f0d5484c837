"""KubeRay manifests and the cron example: well-formed, and running the nightly job safely."""

from __future__ import annotations

import datetime as dt
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
    assert entrypoint.startswith("vision-ops backfill ") and "--from" in entrypoint
    assert entrypoint_spec(entrypoint).exists()
    assert entrypoint.endswith(" --check")  # the drift of each run it committed


# What the stub backfill exits with: 0; 7 (a date committed, not scored); 6 (--check: drift).
SCHEDULE_OUTCOMES = [0, 7, 6]


def stub_vision_ops(folder: Path, exit_code: int, log: Path) -> None:
    """A vision-ops that logs the words it was given, one per line, and exits `exit_code`."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "vision-ops"
    tool.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {log}\nexit {exit_code}\n')
    tool.chmod(0o755)


def said_dates(words: list[str]) -> tuple[str, str]:
    return words[words.index("--from") + 1], words[words.index("--to") + 1]


def logical_dates() -> tuple[str, str]:
    """The schedules' range: three days ago to yesterday, UTC."""
    today = dt.datetime.now(dt.timezone.utc).date()
    return str(today - dt.timedelta(days=3)), str(today - dt.timedelta(days=1))


@pytest.mark.parametrize("exit_code", SCHEDULE_OUTCOMES)
def test_the_raycronjob_entrypoint_is_one_backfill_that_checks_what_it_committed(
    tmp_path: Path, exit_code: int
) -> None:
    """As KubeRay's sidecar submitter runs it: `ray job submit ... -- ENTRYPOINT ;` in a
    `bash -e` script (which expands the dates); `ray job submit` joins the words after `--`
    (shlex.join) into the job's command. The job is the one backfill, with the logical dates
    and --check, and exits as it did."""
    cron = yaml.safe_load((K8S / "raycronjob.yaml").read_text())
    entrypoint = cron["spec"]["jobTemplate"]["entrypoint"]
    bin_folder, log, job_log = tmp_path / "bin", tmp_path / "said.log", tmp_path / "job.log"
    stub_vision_ops(bin_folder, exit_code, log)
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
    before = logical_dates()  # and after: a run across midnight UTC may take either day's
    ran = subprocess.run(["bash", "-e", "-c", script], env=environment, timeout=60)
    assert job_log.read_text().startswith("vision-ops backfill ")
    assert ran.returncode == exit_code
    words = log.read_text().splitlines()
    assert words[0] == "backfill" and words[-1] == "--check"
    assert said_dates(words) in {before, logical_dates()}


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
    assert "--check >> /var/log/vision-ops-nightly.log 2>&1" in fields[5]


@pytest.mark.parametrize("exit_code", SCHEDULE_OUTCOMES)
def test_the_crontab_line_runs_the_backfill_and_exits_as_it_did(
    tmp_path: Path, exit_code: int
) -> None:
    """The line as cron runs it (sh, `\\%` unescaped), with a vision-ops that logs the words
    it was given: the backfill of the logical dates with --check, everything it printed in
    the log, and the line's exit is the backfill's."""
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
    stub_vision_ops(tmp_path / ".venv" / "bin", exit_code, said)
    before = logical_dates()  # and after: a run across midnight UTC may take either day's
    ran = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout, ran.stderr) == (exit_code, "", "")
    words = said.read_text().splitlines()
    assert words[:2] == ["backfill", "jobs/classify.yaml"] and words[-1] == "--check"
    assert said_dates(words) in {before, logical_dates()}
