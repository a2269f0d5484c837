"""The job on Ray Data: the stages assembled, the inputs held and filtered in Ray.

`run.py` assembles the stages (list -> read/decode tasks -> predictor actor pool -> commit),
`listing.py` holds a run's inputs in Ray's object store, and `incremental.py` leaves out what
an earlier run committed with the same model.
"""

from vision_ops.pipeline.run import RunSummary, connect_ray, run_job

__all__ = ["RunSummary", "connect_ray", "run_job"]
