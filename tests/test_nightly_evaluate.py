"""The scheduled job scores a labelled hold-out after each run (the spec's `evaluate:`), and
fails below a floor: the command the KubeRay and cron examples run, on a real run."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from toy_models import TOY_JOBS, toy_images

from vision_ops.cli import EXIT_BAD_SPEC, EXIT_OK, main
from vision_ops.config import SpecError, parse_spec
from vision_ops.errors import EXIT_BELOW_THRESHOLD, EXIT_NOT_SCORED, EXIT_TOO_MANY_ERRORS

pytestmark = pytest.mark.timeout(600)
JOBS = Path(__file__).parents[1] / "jobs"
RAYJOB = yaml.safe_load((JOBS / "k8s" / "rayjob.yaml").read_text())


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The toy colour classifier over red.png, green.png and a broken file, and a hold-out
    labelling all three (the broken file's error row counts as wrong: accuracy 2/3)."""
    folder = tmp_path_factory.mktemp("nightly")
    images = toy_images(folder)
    truth = folder / "holdout.csv"
    truth.write_text(
        "uri,label\n"
        f"file://{images / 'red' / 'red.png'},red\n"
        f"file://{images / 'green' / 'green.png'},green\n"
        f"file://{images / 'broken' / 'broken.png'},blue\n"
    )
    job = TOY_JOBS["classification"]
    assert job.model is not None
    spec = {
        "input": {"uris": [str(images)]},
        "task": {"kind": "classification"} | job.task,
        "model": job.model(folder),
        "runtime": {"batch_size": 4, "max_actors": 1},
        "output": {"uri": str(folder / "table")},
    }
    return {"folder": folder, "spec": spec, "truth": str(truth)}


def spec_file(toy: dict[str, Any], name: str, evaluate: dict[str, Any]) -> Path:
    path = toy["folder"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(toy["spec"] | {"evaluate": evaluate}))
    return path


def rayjob_command(spec: Path) -> list[str]:
    """The RayJob example's entrypoint, its spec (the image's path) swapped for `spec`."""
    words = shlex.split(RAYJOB["spec"]["entrypoint"])
    assert words[:2] == ["vision-ops", "run"] and words[2].endswith("/jobs/classify.yaml")
    return [*words[1:2], str(spec), *words[3:]]


def test_the_nightly_command_passes_above_the_floor_and_fails_below(ray_local, toy, capsys):
    passing = spec_file(toy, "above", {"truth": toy["truth"], "min": {"accuracy": 0.6}})
    assert main(rayjob_command(passing)) == EXIT_OK
    out = capsys.readouterr().out
    assert "accuracy: 0.6667" in out and "evaluated: 3" in out
    (metrics,) = (toy["folder"] / "table" / "_metrics").glob("*.parquet")
    rows = pq.read_table(metrics).to_pylist()
    overall = {r["metric"]: r["value"] for r in rows if r["label"] is None}
    assert overall["accuracy"] == pytest.approx(2 / 3)

    failing = spec_file(
        toy, "below", {"truth": toy["truth"], "min": {"accuracy": 0.9, "evaluated": 2}}
    )
    assert main(rayjob_command(failing)) == EXIT_BELOW_THRESHOLD
    captured = capsys.readouterr()
    assert "error: below the spec's evaluate.min: accuracy 0.6667 < 0.9" in captured.err
    assert "evaluated" not in captured.err  # 3 >= 2: only the failing floor is named
    assert "Traceback" not in captured.err

    # The same hold-out on demand: `vision-ops evaluate SPEC` takes the spec's truth and floors.
    assert main(["evaluate", str(failing)]) == EXIT_BELOW_THRESHOLD
    assert main(["evaluate", str(passing)]) == EXIT_OK
    unknown = spec_file(toy, "unknown", {"truth": toy["truth"], "min": {"top1": 0.5}})
    capsys.readouterr()
    assert main(["evaluate", str(unknown)]) == EXIT_BAD_SPEC  # a bad spec: `run` refuses it too
    assert "evaluate.min names top1: expected one of accuracy, evaluated" in (  # top_k 2
        capsys.readouterr().err
    )


def test_a_run_over_the_error_ratio_is_scored_too(ray_local, toy, capsys) -> None:
    """One error row in three, over --max-error-ratio 0.2: the run commits, its hold-out is
    scored (a backfill goes on past the date and later nights skip it: it was never scored),
    and it exits 4; below a floor as well, 5, which stops a backfill."""
    table = toy["folder"] / "ratio-table"
    toy = toy | {"spec": toy["spec"] | {"output": {"uri": str(table)}}}
    passing = spec_file(toy, "ratio-above", {"truth": toy["truth"], "min": {"accuracy": 0.6}})
    over = ["--max-error-ratio", "0.2", "--run-date", "2026-11-20"]
    assert main(["run", str(passing), *over, "--run-id", "o1"]) == EXIT_TOO_MANY_ERRORS
    captured = capsys.readouterr()
    assert "accuracy: 0.6667" in captured.out
    assert (
        "error: error rows 1/3 (of new inputs, sent to the model) exceed --max-error-ratio"
        in captured.err
    )
    assert [p.name for p in (table / "_metrics").glob("*.parquet")] == ["o1.parquet"]
    failing = spec_file(toy, "ratio-below", {"truth": toy["truth"], "min": {"accuracy": 0.9}})
    assert main(["run", str(failing), *over, "--run-id", "o2"]) == EXIT_BELOW_THRESHOLD
    err = capsys.readouterr().err
    assert "error: below the spec's evaluate.min: accuracy 0.6667 < 0.9" in err
    assert (
        "error: error rows 1/3 (of new inputs, sent to the model) exceed --max-error-ratio" in err
    )


def test_a_committed_run_whose_hold_out_cannot_be_scored_says_so_and_a_backfill_goes_on(
    ray_local, toy, capsys
) -> None:
    """A hold-out that is there but labels none of the run's units (its images moved): each
    date commits, exits 7 (committed, not scored: never 1, which says nothing was committed),
    and a backfill goes on to the next date, then names the dates not scored."""
    from vision_ops.outputs import committed_runs

    table = toy["folder"] / "unscored-table"
    moved = toy["folder"] / "moved-holdout.csv"
    moved.write_text("uri,label\nfile:///moved/red.png,red\n")
    toy = toy | {"spec": toy["spec"] | {"output": {"uri": str(table)}}}
    spec = spec_file(toy, "unscored", {"truth": str(moved)})
    dates = ["--from", "2026-11-01", "--to", "2026-11-02"]
    assert main(["backfill", str(spec), *dates]) == EXIT_NOT_SCORED
    err = capsys.readouterr().err
    assert "is committed, but not scored: no row of the run has a ground-truth label" in err
    assert "error: committed, not scored (" in err and "2026-11-01, 2026-11-02" in err
    assert "Traceback" not in err
    assert [run["run_date"] for run in committed_runs(str(table))] == ["2026-11-01", "2026-11-02"]


def test_an_evaluate_section_needs_its_truth(toy) -> None:
    with pytest.raises(SpecError, match=r"evaluate.truth: expected the hold-out's ground truth"):
        parse_spec(toy["spec"] | {"evaluate": {"min": {"accuracy": 0.5}}})
    imagefolder = parse_spec(toy["spec"] | {"evaluate": {"truth_format": "imagefolder"}})
    assert imagefolder.evaluate is not None and imagefolder.evaluate.truth is None


def test_evaluate_without_truth_or_section_is_a_spec_error(toy, capsys) -> None:
    plain = toy["folder"] / "plain.yaml"
    plain.write_text(yaml.safe_dump(toy["spec"]))
    assert main(["evaluate", str(plain)]) == EXIT_BAD_SPEC
    assert "or a spec's evaluate" in capsys.readouterr().err


@pytest.mark.parametrize("manifest", ["rayjob.yaml", "raycronjob.yaml", "crontab.example"])
def test_every_schedule_example_runs_a_spec_that_scores_a_hold_out(manifest: str) -> None:
    text = (JOBS / "k8s" / manifest).read_text()
    if manifest.endswith(".yaml"):
        document = yaml.safe_load(text)["spec"]
        command = document.get("entrypoint") or document["jobTemplate"]["entrypoint"]
    else:
        (command,) = [line for line in text.splitlines() if line and not line.startswith("#")]
    words = shlex.split(command.replace("\\%", "%"))
    verb = next(w for w in words if w in ("run", "backfill"))
    spec_path = next(w for w in words if w.endswith(".yaml"))
    assert words[words.index(verb) - 1].endswith("vision-ops")
    spec = parse_spec(yaml.safe_load((JOBS / Path(spec_path).name).read_text()))
    assert spec.evaluate is not None and spec.evaluate.truth
    assert spec.evaluate.min == {"accuracy": 0.8, "top5_accuracy": 0.95}


def test_an_incremental_night_that_left_inputs_out_is_not_scored(ray_local, toy, capsys):
    """The hold-out's score is of the whole hold-out: a night that skipped inputs committed
    before (--incremental) holds only the rest (here: the broken file, retried as an error row,
    alone: accuracy 0), so it is not scored and passes, saying so; a night that left nothing
    out is scored as a full run."""
    table = toy["folder"] / "incremental-table"
    toy = toy | {"spec": toy["spec"] | {"output": {"uri": str(table)}}}
    spec = spec_file(toy, "incremental", {"truth": toy["truth"], "min": {"accuracy": 0.6}})
    first = ["run", str(spec), "--incremental", "--run-date", "2026-11-20"]
    assert main([*first, "--run-id", "i1"]) == EXIT_OK  # nothing committed before: scored
    assert "accuracy: 0.6667" in capsys.readouterr().out
    second = ["run", str(spec), "--incremental", "--run-date", "2026-11-21"]
    assert main([*second, "--run-id", "i2"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "run i2: 1 items, 0 ok, 1 errors" in out  # the broken file, retried
    not_scored = "evaluate: not scored: run i2 left out 2 inputs committed before"
    assert f"{not_scored} (--incremental)" in out
    assert "accuracy" not in out
    assert sorted(p.name for p in (table / "_metrics").glob("*.parquet")) == ["i1.parquet"]


def test_a_scenes_no_data_tiles_are_not_scored(ray_local, tmp_path, tiny_weights, capsys):
    """A scene of 20 tiles whose top row is all no data: 5 tiles `skipped`, never sent to the
    model. Its hold-out labels the scene (each tile is matched to it by the scene's URI) with
    the label the model gave most tiles: scored over the 15 it saw, `skipped: 5` apart (the 5
    counted as error rows and wrong answers: accuracy k/20, under a floor the model met, exit
    5, in a run of 0 errors)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    folder = tmp_path / "scenes"
    folder.mkdir()
    values = np.random.default_rng(1).integers(1, 4_000, (3, 200, 300)).astype(np.uint16)
    values[:, :70, :] = 0  # the first row of 64-pixel tiles: no data at all
    profile = {"driver": "GTiff", "width": 300, "height": 200, "count": 3, "dtype": "uint16",
               "crs": "EPSG:32632", "transform": from_origin(600_000.0, 5_200_000.0, 20.0, 20.0),
               "nodata": 0}  # fmt: skip
    with rasterio.open(folder / "scene.tif", "w", **profile) as out:
        out.write(values)
    prep = {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.5] * 3}
    spec = {
        "input": {"uris": [str(folder)], "tiling": {"size": 64, "value_range": [0, 4000]}},
        "model": {"architecture": "mobilenet_v3_small", "weights": str(tiny_weights),
                  "num_classes": 4, "preprocessing": prep},
        "task": {"top_k": 2},
        "runtime": {"batch_size": 8, "max_actors": 1},
        "output": {"uri": str(tmp_path / "table")},
        "run": {"id": "scene", "date": "2026-11-24"},
    }  # fmt: skip
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(spec))
    assert main(["run", str(plain)]) == EXIT_OK
    assert "run scene: 20 items, 15 ok, 0 errors, 5 skipped in" in capsys.readouterr().out
    rows = pq.read_table(tmp_path / "table" / "run_date=2026-11-24").to_pylist()
    seen = [row["label"] for row in rows if row["status"] == "ok"]
    label = max(set(seen), key=seen.count)
    right = seen.count(label)
    truth = tmp_path / "holdout.csv"
    truth.write_text(f"uri,label\n{folder / 'scene.tif'},{label}\n")
    floor = (right / 20 + right / 15) / 2  # met over the 15 tiles seen, not over all 20
    scored = tmp_path / "scored.yaml"
    scored.write_text(yaml.safe_dump(spec | {"evaluate": {"truth": str(truth),
                                                         "min": {"accuracy": floor}}}))  # fmt: skip
    assert main(["evaluate", str(scored)]) == EXIT_OK
    printed = f"accuracy: {right / 15:.4f}\nevaluated: 15\nerror_rows: 0\nskipped: 5\n"
    assert printed in capsys.readouterr().out
