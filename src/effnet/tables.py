"""Rows out of a command, as CSV, TSV, JSON lines or Parquet, the format from the output's suffix. Streaming: rows
are written as they come (Parquet in row groups), so memory stays flat however many there are. Atomic: a file is
written under a temporary name and renamed at the end, so an interrupted run leaves no half-written file. Without
a path the rows go to standard output (CSV by default)."""
from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from effnet import io
from effnet.errors import EffnetError

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
ROW_GROUP = 10_000  # Parquet rows buffered per row group

Columns = dict[str, type]  # name -> str or float, in output order
Write = Callable[[list[dict]], None]


def format_of(out: Path | None, fmt: str | None = None) -> str:
    """FMT when given, else the format OUT's suffix names; CSV for standard output. Checked before any work."""
    if fmt is None and out is not None:
        fmt = FORMATS.get(Path(out).suffix.lower())
        if fmt is None:
            raise EffnetError(f"{out}: unknown output format {Path(out).suffix!r} "
                              f"(use {', '.join(FORMATS)}, or --format)")
    fmt = fmt or "csv"
    if fmt not in set(FORMATS.values()):
        raise EffnetError(f"unknown output format {fmt!r} (one of {', '.join(sorted(set(FORMATS.values())))})")
    if fmt == "parquet" and out is None:
        raise EffnetError("Parquet is binary: give an output file (--out rows.parquet)")
    return fmt


@contextmanager
def writer(out: Path | None, fmt: str, columns: Columns) -> Iterator[Write]:
    """A function that writes a list of rows (dicts with COLUMNS' keys; None for a missing value)."""
    if out is None:
        yield _text_writer(sys.stdout, fmt, columns)
        sys.stdout.flush()
        return
    with io.atomic_file(out) as tmp:
        if fmt == "parquet":
            with _parquet_writer(tmp, columns) as write:
                yield write
        else:
            with open(tmp, "w", newline="") as f:
                yield _text_writer(f, fmt, columns)


def _text_writer(f: TextIO, fmt: str, columns: Columns) -> Write:
    if fmt == "jsonl":
        def write(rows: list[dict]) -> None:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        return write
    table = csv.DictWriter(f, fieldnames=list(columns), delimiter="\t" if fmt == "tsv" else ",",
                           lineterminator="\n")
    table.writeheader()
    return table.writerows


@contextmanager
def _parquet_writer(path: Path, columns: Columns) -> Iterator[Write]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.float64() if kind is float else pa.string()) for name, kind in columns.items()])
    pending: list[dict] = []
    with pq.ParquetWriter(path, schema) as parquet:
        def flush() -> None:
            if pending:
                parquet.write_table(pa.Table.from_pylist(pending, schema=schema))
                pending.clear()

        def write(rows: list[dict]) -> None:
            pending.extend(rows)
            if len(pending) >= ROW_GROUP:
                flush()

        yield write
        flush()
