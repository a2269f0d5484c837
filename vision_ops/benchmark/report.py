"""The benchmark's results: a row per measurement, the ratios between them, a table and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vision_ops.benchmark.probes import PSS_EVERY, TREE_DESCRIPTION, Peaks
from vision_ops.benchmark.rates import shared_core_ceiling

MB = 1024**2
LABEL_WIDTH = 48  # the printed ratios' labels
# The derived ceilings: on CPUs alone decoding and the model take turns on the same cores,
# 1 / (1/a + 1/b); with a GPU the CPUs decode while the GPU runs the model, min(a, b).
CEILING = "ceiling"
GPU_CEILING = "gpu-ceiling"
CEILING_LABELS = {CEILING: "shared-core ceiling 1/(1/a+1/b)", GPU_CEILING: "GPU ceiling min(a, b)"}
# The pipeline's ways: its predictor actor pool (e2e), the model in the driver's threads, a
# run that joins a running cluster (its model placed by the run's size), and a run in one
# process without Ray.
PIPELINES = {
    "c": "e2e",
    "g": "e2e in driver",
    "h": "e2e on a running cluster",
    "i": "e2e in one process",
}
PEERS = {"f": "Daft", "d": "naive Ray Data", "e": "DataLoader"}  # the jobs e2e is set against
JOBS = (*PIPELINES, *PEERS)  # the approaches that do the whole job: run at every size
CEILINGS = ("a", "b")  # measured in the bench process (b times its model in a child of its own)
# (label, numerator key, denominator key): each printed when both figures exist; the other
# ways of the pipeline each against its pool.
RATIOS = (
    ("e2e / Daft", "c", "f"),
    ("e2e / naive Ray Data", "c", "d"),
    ("e2e / DataLoader", "c", "e"),
    (f"e2e / {CEILING_LABELS[CEILING]}", "c", CEILING),
    (f"e2e / {CEILING_LABELS[GPU_CEILING]}", "c", GPU_CEILING),
    ("e2e / model-only", "c", "b"),
    ("e2e from S3 / e2e local", "c-s3", "c"),
    *((f"{name} / {PIPELINES['c']}", key, "c") for key, name in PIPELINES.items() if key != "c"),
)
# Every job (the pipeline and its peers) runs again on scale x N images (--scale): a key with
# this suffix. The ceilings are rates of parts, measured once, at N.
SCALE_SUFFIX = "-scale"
SCALED = "c" + SCALE_SUFFIX


def scaled(key: str) -> str:
    """The key of an approach's run on scale x N images."""
    return key + SCALE_SUFFIX


def at_scale(label: str) -> str:
    """A ratio's label at scale x N: each side's pipeline name followed by "at scale"."""
    return " / ".join(
        f"{side} at scale" if side in PIPELINES.values() else side for side in label.split(" / ")
    )


# The pipeline's ratios again at scale x N, against each peer at the same size (the ceilings
# are rates, so they stand at either size).
SCALED_RATIOS = tuple(
    (at_scale(label), scaled(top), scaled(bottom) if bottom in JOBS else bottom)
    for label, top, bottom in RATIOS
    if top in PIPELINES
)
# Wall-time ratios, the time a user waits: (rows / wall seconds) of e2e over a peer's at the
# same size; above 1 the pipeline finished first. Start-up, listing and commit are all in;
# the pipeline's ways against each other too.
WALL_RATIOS = tuple(
    (f"{prefix}{at} / {name}", top + suffix, bottom + suffix)
    for top, prefix in PIPELINES.items()
    for at, suffix in (("", ""), (" at scale", SCALE_SUFFIX))
    for bottom, name in PEERS.items()
) + tuple(
    (label, top, bottom)
    for label, top, bottom in RATIOS + SCALED_RATIOS
    if {top.removesuffix(SCALE_SUFFIX), bottom.removesuffix(SCALE_SUFFIX)} <= PIPELINES.keys()
)
# Peak PSS ratios at the same size (below 1: the pipeline held less).
PSS_RATIOS = tuple((label.replace("/", "PSS /", 1), t, b) for label, t, b in WALL_RATIOS)
# The pipeline's steady window times decoding only while decoding keeps pace with the actors.
# Where its read tasks decode and the object store held at least this share of the run's
# decoded crops at its peak, or its rate beat decoding's own ceiling (a), they had decoded ahead
# while the actors started (and compiled): the window timed the actors on queued crops, not
# the pipeline in step (seen on a GPU node, 2026-12-04).
RAN_AHEAD_SHARE = 0.5
UNSTEADY, RAN_AHEAD = "*", "^"  # the marks after such a rate, and after a ratio that uses one


@dataclass
class Measurement:
    """One approach's figures; `images_per_second` is its steady-state rate where it has one."""

    key: str
    approach: str
    rows: int
    expected_rows: int
    images_per_second: float
    steady_state: bool
    wall_seconds: float
    peaks: Peaks
    includes: str
    top1_agreement: float | None = None  # share of images whose top-1 equals the DataLoader's
    details: dict[str, Any] = field(default_factory=dict)
    # The object store's peak over the run's decoded crops, where read tasks decode (e2e).
    queued_share: float | None = None

    @property
    def wall_images_per_second(self) -> float:
        return self.rows / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        found = asdict(self)
        found["wall_images_per_second"] = self.wall_images_per_second
        return found


@dataclass
class BenchReport:
    settings: dict[str, Any]
    measurements: list[Measurement] = field(default_factory=list)
    scaling: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    def rates(self) -> dict[str, float]:
        """Each measurement's images/s by key, plus the device's ceiling where a and b ran."""
        found = {m.key: m.images_per_second for m in self.measurements}
        if found.get("a") and found.get("b"):
            if self.settings.get("device") == "cuda":
                found[GPU_CEILING] = min(found["a"], found["b"])
            else:
                found[CEILING] = shared_core_ceiling(found["a"], found["b"])
        return found

    def ratios(self) -> dict[str, float]:
        """Steady img/s of the pipeline over its ceilings' and peers'."""
        return _divided(self.rates(), RATIOS + SCALED_RATIOS)

    def wall_ratios(self) -> dict[str, float]:
        """Wall img/s (rows / wall seconds) of the pipeline over each peer's at the same size."""
        found = {m.key: m.wall_images_per_second for m in self.measurements}
        return _divided(found, WALL_RATIOS)

    def pss_ratios(self) -> dict[str, float]:
        """Peak PSS of the pipeline over each peer's at the same size."""
        found = {m.key: float(m.peaks.pss_bytes or 0) for m in self.measurements}
        return _divided(found, PSS_RATIOS)

    def same_size(self) -> list[dict[str, Any]]:
        """Each size the jobs ran at: their wall seconds, wall and steady img/s, peak PSS."""
        sizes: dict[int, dict[str, Any]] = {}
        for m in self.measurements:
            if m.key.removesuffix(SCALE_SUFFIX) not in JOBS:
                continue
            sizes.setdefault(m.expected_rows, {})[m.key] = {
                "approach": m.approach,
                "wall_seconds": m.wall_seconds,
                "wall_images_per_second": m.wall_images_per_second,
                "steady_images_per_second": m.images_per_second,
                "steady_state": m.steady_state,
                "peak_pss_bytes": m.peaks.pss_bytes,
            }
        return [{"images": n, "approaches": found} for n, found in sorted(sizes.items())]

    def unsteady_ratios(self) -> list[str]:
        """Ratios with a figure that is not a steady-state rate (start-up weighs in it)."""
        return self._ratios_of({m.key for m in self.measurements if not m.steady_state})

    def ran_ahead(self) -> dict[str, str]:
        """The steady pipeline rates that timed their actors on crops decoded ahead
        (RAN_AHEAD_SHARE), by key, each with its evidence."""
        decode_rate = self.rates().get("a")
        found = {}
        for m in self.measurements:
            if not m.steady_state or m.queued_share is None:  # None: the actors decode
                continue
            if m.queued_share >= RAN_AHEAD_SHARE:
                found[m.key] = f"{m.key} held {m.queued_share:.0%} of its crops"
            elif decode_rate and m.images_per_second > decode_rate:
                found[m.key] = f"{m.key} beat a"
        return found

    def ran_ahead_ratios(self) -> list[str]:
        """Ratios with a pipeline rate that timed its actors on crops decoded ahead."""
        return self._ratios_of(set(self.ran_ahead()))

    def _ratios_of(self, keys: set[str]) -> list[str]:
        ratios = self.ratios()
        return [
            label
            for label, top, bottom in RATIOS + SCALED_RATIOS
            if label in ratios and ({top, bottom} & keys)
        ]

    def as_json(self) -> dict[str, Any]:
        rates = self.rates()
        return {
            "settings": self.settings,
            "memory_summed_over": TREE_DESCRIPTION,
            "measurements": [m.as_json() for m in self.measurements],
            "shared_core_ceiling_images_per_second": rates.get(CEILING),
            "gpu_ceiling_images_per_second": rates.get(GPU_CEILING),
            "same_size": self.same_size(),
            "wall_ratios": self.wall_ratios(),
            "ratios": self.ratios(),
            "pss_ratios": self.pss_ratios(),
            "ratios_not_steady_state": self.unsteady_ratios(),
            "ran_ahead": self.ran_ahead(),
            "ratios_ran_ahead": self.ran_ahead_ratios(),
            "scaling": self.scaling,
            "problems": self.problems,
            "passed": not self.problems,
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(), indent=2, default=str) + "\n")


def _divided(
    figures: dict[str, float], pairs: tuple[tuple[str, str, str], ...]
) -> dict[str, float]:
    return {
        label: figures[top] / figures[bottom]
        for label, top, bottom in pairs
        if figures.get(top) and figures.get(bottom)
    }


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.0f}"


def _row(m: Measurement, ran_ahead: bool) -> str:
    mark = UNSTEADY if not m.steady_state else RAN_AHEAD if ran_ahead else ""
    rate = f"{m.images_per_second:.1f}{mark}"
    agreement = "-" if m.top1_agreement is None else f"{m.top1_agreement:.2f}"
    return (
        f"{m.key:<8}{m.approach:<38}{m.rows:>6}{rate:>9}{m.wall_images_per_second:>8.1f}"
        f"{m.wall_seconds:>8.1f}{_mb(m.peaks.rss_bytes):>8}{_mb(m.peaks.pss_bytes):>8}"
        f"{_mb(m.peaks.object_store_bytes):>8}{agreement:>8}"
    )


def format_table(report: BenchReport) -> str:
    settings, ran_ahead = report.settings, report.ran_ahead()
    header = (
        f"{'key':<8}{'approach':<38}{'rows':>6}{'img/s':>9}{'img/s':>8}{'wall':>8}"
        f"{'RSS':>8}{'PSS':>8}{'objst':>8}{'top1=DL':>8}\n"
        f"{'':<8}{'':<38}{'':>6}{'steady':>9}{'wall':>8}{'s':>8}{'MB':>8}{'MB':>8}{'MB':>8}"
    )
    lines = [
        "== vision-ops bench " + "=" * 84,
        f"{settings['model']}, {settings['images']} photos {settings['photo']}, batch "
        f"{settings['batch_size']}, device {settings['device']}, {settings['cores']} cores",
        header,
        *(_row(m, m.key in ran_ahead) for m in report.measurements),
        "",
        f"{UNSTEADY} no steady state (the output came within a second): e2e rows / pipeline "
        f"seconds, others rows / wall seconds; a ratio marked {UNSTEADY} uses such a figure",
        f"RSS, PSS: peaks {TREE_DESCRIPTION}; RSS every {settings['sample_interval_s']} s, PSS "
        f"every {PSS_EVERY}th sample. objst: peak Ray object store bytes in use.",
        "steady img/s: rows after the first output batch / time from it to the last row; for "
        "the pipeline, between every actor's first output block and its last.",
        *_ran_ahead_lines(ran_ahead),
    ]
    lines += _ratio_lines(report) + _where_it_went_lines(report)
    lines += _scaling_lines(report) + _check_lines(report)
    return "\n".join(lines)


def _ran_ahead_lines(evidence: dict[str, str]) -> list[str]:
    """The legend of the `^` mark, with each marked rate's evidence (BenchReport.ran_ahead)."""
    if not evidence:
        return []
    return [
        f"{RAN_AHEAD} ran ahead ({'; '.join(evidence.values())}): the read tasks decoded while "
        "the actors started, and the steady window timed the actors on queued crops, not "
        f"decoding in step; a ratio marked {RAN_AHEAD} uses such a figure. The share counts "
        "every object in the store at its peak (it can pass 100%). runtime.queue_mb bounds what "
        "runs ahead; an unmarked rate may still have started on a full queue."
    ]


def _where_it_went_lines(report: BenchReport) -> list[str]:
    """Where each approach's peak PSS was, and where its CPU time went: by process role,
    largest first, after the total."""
    memory = {
        m.key: {role: v / MB for role, v in m.peaks.pss_by_role.items()}
        for m in report.measurements
    }
    cpu = {m.key: m.peaks.cpu_seconds_by_role for m in report.measurements}
    sampling = {
        m.key: f" (sampling {m.peaks.sampler_cpu_seconds:.0f})" for m in report.measurements
    }
    return _by_role_lines("peak PSS by process role (MB; the sample of the peak):", memory) + (
        _by_role_lines(
            "CPU seconds by process role (user + system, while it ran; the driver's includes "
            "the bench's own sampling, in brackets):",
            cpu,
            sampling,
        )
    )


def _by_role_lines(
    title: str, figures: dict[str, dict[str, float]], notes: dict[str, str] | None = None
) -> list[str]:
    lines = ["", title]
    for key, by_role in figures.items():
        if by_role:
            roles = sorted(by_role.items(), key=lambda item: -item[1])
            parts = [("total", sum(by_role.values())), *roles]
            line = f"  {key:<8}" + " | ".join(f"{role} {v:.0f}" for role, v in parts)
            lines.append(line + (notes or {}).get(key, ""))
    return lines if len(lines) > 2 else []


def _ratio_lines(report: BenchReport) -> list[str]:
    rates = report.rates()
    lines = [
        "",
        "ratios of wall img/s (rows / wall s, start-up in) at the same size; >1: e2e first:",
    ]
    lines += _figures(report.wall_ratios(), {})
    lines += ["", "ratios of steady img/s:"]
    lines += [
        f"  {label:<{LABEL_WIDTH}}{rates[key]:>8.1f} img/s"
        for key, label in CEILING_LABELS.items()
        if rates.get(key)
    ]
    marks = {label: RAN_AHEAD for label in report.ran_ahead_ratios()}
    marks |= {label: UNSTEADY for label in report.unsteady_ratios()}
    lines += _figures(report.ratios(), marks)
    lines += ["", "ratios of peak PSS at the same size; <1: e2e held less:"]
    return lines + _figures(report.pss_ratios(), {})


def _figures(ratios: dict[str, float], marks: dict[str, str]) -> list[str]:
    return [
        f"  {label:<{LABEL_WIDTH}}{value:>8.2f}x" + (f" {marks[label]}" if label in marks else "")
        for label, value in ratios.items()
    ]


def _scaling_lines(report: BenchReport) -> list[str]:
    if not report.scaling:
        return []
    s = report.scaling
    return [
        "",
        f"memory scaling of the pipeline: {s['images'][0]} images peak RSS "
        f"{s['peak_rss_bytes'][0] / MB:.0f} MB, {s['images'][1]} images "
        f"{s['peak_rss_bytes'][1] / MB:.0f} MB: x{s['rss_ratio']:.3f} "
        f"(PSS x{s['pss_ratio']:.3f}; target < x{s['target_ratio']})",
    ]


def _check_lines(report: BenchReport) -> list[str]:
    if not report.problems:
        return ["", "checks: every approach produced exactly its expected predictions"]
    return ["", "CHECKS FAILED:", *(f"  {problem}" for problem in report.problems)]
