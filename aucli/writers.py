"""Result writers: one small class per format behind one interface.

Every writer writes to a temporary file next to the target and renames it into
place, so an interrupted run never leaves a truncated file that looks complete.
Adding a format is adding one class to ``WRITERS``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pandas as pd

from .errors import AucliError, UsageError

# Columns that hold whole numbers; AU decisions are nullable (empty without a face).
INTEGER_COLUMNS = ("frame", "face_id", "success")


class ResultWriter:
    """Writes one per-frame table (metadata in ``table.attrs``) to one file."""

    extension: str = ""

    def write(self, table: pd.DataFrame, path: str | Path) -> Path:
        path = Path(path)
        with atomic_output(path) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                self.write_to(table, f)
        return path

    def write_to(self, table: pd.DataFrame, file: IO[str]) -> None:
        raise NotImplementedError


class WriteCSV(ResultWriter):
    """OpenFace-style CSV: a header line, then one line per row; empty cells for missing values."""

    extension = "csv"

    def write_to(self, table: pd.DataFrame, file: IO[str]) -> None:
        table.to_csv(file, index=False, lineterminator="\n")


class WriteJSON(ResultWriter):
    """The same rows as the CSV (``columns`` + ``rows``, null for empty cells) after a
    header with the video, model and aucli metadata."""

    extension = "json"

    def write_to(self, table: pd.DataFrame, file: IO[str]) -> None:
        attrs = table.attrs
        document = {
            "aucli_version": attrs.get("aucli_version"),
            "video": attrs.get("video", {}),
            "model": attrs.get("model", {}),
            "warnings": attrs.get("warnings", []),
            "columns": list(table.columns),
            "rows": [[_plain(v) for v in row] for row in table.itertuples(index=False, name=None)],
        }
        json.dump(document, file, separators=(",", ":"), allow_nan=False)
        file.write("\n")


WRITERS: dict[str, type[ResultWriter]] = {"csv": WriteCSV, "json": WriteJSON}


def get_writer(format: str) -> ResultWriter:
    """``"csv"`` or ``"json"`` -> its writer."""
    try:
        return WRITERS[format.lower()]()
    except KeyError:
        raise UsageError(f"unknown output format {format!r}; expected {', '.join(WRITERS)}") from None


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or JSON output back into the table ``aucli.detect`` returns."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
        table = pd.DataFrame(document["rows"], columns=document["columns"])
        table.attrs.update({k: v for k, v in document.items() if k not in ("rows", "columns")})
    else:
        table = pd.read_csv(path)
    return _typed(table)


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".part") -> Iterator[Path]:
    """A temporary file next to ``path``, renamed onto it when the block succeeds.

    Whatever stops the block (an error, Ctrl-C) removes the temporary file, so a
    reader never finds a truncated output under the final name. ``suffix`` lets
    writers that pick their format by extension (PyAV) see the real one.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: str | Path, source: str) -> None:
    """Fail early, naming the input, when ``path`` cannot be written."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise AucliError(f"{source}: output {path} is a directory")
    if not folder.is_dir():
        raise AucliError(f"{source}: cannot write {path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    except OSError as error:
        raise AucliError(f"{source}: cannot write {path}: {error.strerror}") from None
    os.close(fd)
    os.unlink(tmp)


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    for column in table.columns:
        if column in INTEGER_COLUMNS:
            table[column] = table[column].astype("int64")
        elif column.endswith("_c"):
            table[column] = table[column].astype("Int64")
        else:
            table[column] = table[column].astype(float)
    return table


def _plain(value: Any) -> Any:
    """A JSON-ready scalar: numpy/pandas numbers to Python ones, missing to null."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        value = value.item()
        if isinstance(value, float) and math.isnan(value):
            return None
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
