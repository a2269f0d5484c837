"""The job on Ray Data: the stages assembled, the inputs held and filtered in Ray.

`run.py` assembles the stages (list -> read/decode tasks -> predictor actor pool -> commit),
`listing.py` holds a run's inputs in Ray's object store, and `incremental.py` leaves out what
an earlier run committed with the same model.

`run_job` and `RunSummary` are imported from `run.py` when first asked for: a Ray worker that
runs a listing or incremental task (its function pickled by reference to a module of this
package) imports this package without the model stack (torch, torchvision). `connect.py`
connects the driver to Ray, also without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vision_ops.pipeline.connect import connect_ray

if TYPE_CHECKING:
    from vision_ops.pipeline.run import RunSummary, run_job

__all__ = ["RunSummary", "connect_ray", "run_job"]


def __getattr__(name: str) -> Any:
    if name in ("RunSummary", "run_job"):
        from vision_ops.pipeline import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
