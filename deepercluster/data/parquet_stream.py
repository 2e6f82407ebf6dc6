"""Parquet files written as a stream (bounded memory) into a run store, atomically: rows go to a temporary name
in fixed-size row groups, and the file is renamed into place only when closed whole."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from deepercluster.store import RunStore


def write_table(store: RunStore, rel: str, table: pa.Table) -> None:
    """One small table, written whole and atomically."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(rel, buf.getvalue())


def read_table(store: RunStore, rel: str, columns: list[str] | None = None) -> pa.Table:
    data = store.read_bytes(rel)
    with store.reading(rel):  # a truncated file: one line naming it (and its unit), not pyarrow's error
        return pq.read_table(io.BytesIO(data), columns=columns)


class ParquetStream:
    """``with ParquetStream(store, rel, schema, group_rows) as out: out.write(table)``. Every row group but the
    last holds exactly ``group_rows`` rows; on an exception the temporary file is removed and nothing appears."""

    def __init__(self, store: RunStore, rel: str, schema: pa.Schema, group_rows: int):
        self.store, self.schema, self.group_rows = store, schema, group_rows
        self._atomic = store.open_atomic(rel)  # the store's one atomic-write mechanism
        self._file = self._atomic.__enter__()
        self._writer = pq.ParquetWriter(self._file, schema)
        self._pending: list[pa.Table] = []
        self._n = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self._pending.append(table.select(self.schema.names).cast(self.schema))
        self._n += table.num_rows
        self.rows += table.num_rows
        while self._n >= self.group_rows:
            self._flush(self.group_rows)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        self._writer.write_table(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._n -= rows

    def __enter__(self) -> ParquetStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._n:
                self._flush(self._n)
            self._writer.close()
        except BaseException as err:  # the last rows failed: nothing appears
            self._atomic.__exit__(type(err), err, err.__traceback__)
            raise
        self._atomic.__exit__(exc_type, exc, tb)  # renamed when whole, removed on an exception
