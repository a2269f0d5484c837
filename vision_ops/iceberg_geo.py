"""The Iceberg table's `geo` property (GeoParquet metadata: the extent and CRS of every run's
rows), kept exact when runs commit at once.

A run's commit sets the property to the table's extent widened by its own rows'
(georef.table_geo). PyIceberg retries a commit that lost a race against the table's new head,
but it re-sends the properties as they were first computed: the run that committed meanwhile
would lose its extent, or a CRS it made mixed. This transaction computes the property again,
against the table as each attempt finds it; every attempt asserts the head it was computed
against, so no other run's commit can land between the two.
"""

from __future__ import annotations

from pyiceberg.table import Table, Transaction
from pyiceberg.table.update import SetPropertiesUpdate

from vision_ops.georef import GEO_KEY, table_geo


class GeoTransaction(Transaction):
    """A transaction that sets the table's `geo` from one run's (`run_geo`, the run's
    GeoParquet metadata as JSON) at each commit attempt."""

    def __init__(self, table: Table, run_geo: str | None) -> None:
        super().__init__(table)
        self._run_geo = run_geo
        self._set_geo()

    def _rebuild_snapshot_updates(self) -> None:
        """PyIceberg's retry, against the refreshed table: the geo set again from it."""
        super()._rebuild_snapshot_updates()
        self._updates = tuple(update for update in self._updates if not _sets_geo(update))
        self._set_geo()

    def _set_geo(self) -> None:
        if self._run_geo is None:
            return
        geo = table_geo(self._table.properties.get(GEO_KEY), self._run_geo)
        if geo is not None:
            self.set_properties({GEO_KEY: geo})


def _sets_geo(update: object) -> bool:
    return isinstance(update, SetPropertiesUpdate) and GEO_KEY in update.updates
