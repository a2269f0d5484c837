"""vision-ops: batch computer vision from object storage to Parquet on Ray."""

__version__ = "0.1.0"
