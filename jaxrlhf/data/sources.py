"""Where examples come from, and what is wrong with them: `Source` (file and line or row),
`DataError`, the Parquet and Arrow readers (one record a row, as Hugging Face datasets
store them) and the field mapping applied to every record before it is parsed
(jaxrlhf/data/formats.py)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Mapping

# Parquet and Arrow files hold one record a row.
TABLE_EXTENSIONS = (".parquet", ".arrow")


@dataclasses.dataclass(frozen=True)
class Source:
  """Where an example came from: a file and a 1-based line (JSONL) or row (Parquet,
  Arrow) number."""
  file: str
  line: int
  unit: str = "line"

  def __str__(self) -> str:
    return f"{self.file}:{self.line}"


class DataError(ValueError):
  """Bad input data; the message names file, line and field and what was expected."""

  def __init__(self, message: str, *, source: Source | None = None,
               field: str | None = None, reason: str = "invalid"):
    self.source = source
    self.field = field
    self.reason = reason
    where = []
    if source is not None:
      where.append(f"{source.file}, {source.unit} {source.line}")
    if field is not None:
      where.append(f"field '{field}'")
    super().__init__(f"{', '.join(where)}: {message}" if where else message)



# ---------------------------------------------------------------------------
# Parquet and Arrow files.

def is_table(path: str) -> bool:
  """Whether `path` is a Parquet or Arrow file (one record a row)."""
  return os.fspath(path).endswith(TABLE_EXTENSIONS)


def _table_batches(path: str):
  """The record batches of a Parquet file, or of an Arrow IPC stream or file (the
  `.arrow` files of a Hugging Face dataset saved to disk)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    if path.endswith(".parquet"):
      reader = pq.ParquetFile(path)
      batches = reader.iter_batches(batch_size=1024)
    else:
      try:
        batches = iter(pa.ipc.open_stream(pa.memory_map(path)))
      except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(path))
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batches:
      yield batch
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable {os.path.splitext(path)[1][1:]} file, or a "
                    f"damaged one ({type(e).__name__}: {e})", reason="unreadable_file") from None


def table_rows(path: str) -> Iterator[tuple[Source, Callable[[], dict]]]:
  """(source, record loader) per row. A row whose strings are not valid UTF-8 raises
  DataError naming its column when it is loaded."""
  number = 0
  for batch in _table_batches(path):
    try:
      rows = batch.to_pylist()
    except (UnicodeDecodeError, ValueError):
      rows = None  # some row is undecodable: decode row by row to find it
    for i in range(batch.num_rows):
      number += 1
      source = Source(path, number, "row")
      if rows is not None:
        yield source, (lambda row=rows[i]: row)
      else:
        yield source, (lambda i=i, source=source: _decode_row(batch, i, source))


def _decode_row(batch, i: int, source: Source) -> dict:
  row = {}
  for name, column in zip(batch.schema.names, batch.columns):
    try:
      row[name] = column.slice(i, 1).to_pylist()[0]
    except (UnicodeDecodeError, ValueError) as e:
      raise DataError(f"not valid UTF-8 ({e})", source=source, field=name,
                      reason="not_utf8") from None
  return row


# ---------------------------------------------------------------------------
# Field mapping.

def check_fields(fields: Mapping[str, str] | None) -> dict[str, str]:
  """A field mapping {name in the files: name a layout expects}, checked."""
  fields = dict(fields or {})
  for src, dst in fields.items():
    if not isinstance(src, str) or not isinstance(dst, str) or not src or not dst:
      raise ValueError(f"field mapping {src!r} -> {dst!r}: both names must be non-empty "
                       "strings")
  targets = list(fields.values())
  duplicates = sorted({t for t in targets if targets.count(t) > 1})
  if duplicates:
    raise ValueError(f"field mapping {fields}: several fields map to {duplicates[0]!r}")
  return fields


def rename_fields(record: Any, fields: Mapping[str, str], source: Source) -> Any:
  """`record` with its top-level keys renamed by `fields`; a renamed key that the record
  also holds under its new name is an error (one of the two would be lost)."""
  if not fields or not isinstance(record, dict):
    return record
  out = {k: v for k, v in record.items() if k not in fields}
  for src, dst in fields.items():
    if src in record:
      if dst in record and dst not in fields:
        raise DataError(f"the record holds both {src!r} and {dst!r}, and the field mapping "
                        f"renames {src!r} to {dst!r}", source=source, field=src,
                        reason="field_mapping")
      out[dst] = record[src]
  return out


# ---------------------------------------------------------------------------
# JSON lines.

def _field_with_bad_bytes(value: Any, path: str) -> str | None:
  """Finds the JSON field holding undecodable bytes (kept as lone surrogates)."""
  if isinstance(value, str):
    return path if any("\udc80" <= c <= "\udcff" for c in value) else None
  if isinstance(value, dict):
    for key, item in value.items():
      key_path = key if not path else f"{path}.{key}"
      found = _field_with_bad_bytes(key, key_path) or _field_with_bad_bytes(item, key_path)
      if found:
        return found
  if isinstance(value, list):
    for i, item in enumerate(value):
      found = _field_with_bad_bytes(item, f"{path}[{i}]")
      if found:
        return found
  return None


def decode_json_line(raw: bytes, source: Source) -> Any:
  """One JSONL line's record; a DataError naming the field with bytes that are not
  UTF-8, or the column of malformed JSON."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    # Decode leniently only to name the field that holds the bad bytes.
    lenient = raw.decode("utf-8", errors="surrogateescape")
    try:
      field = _field_with_bad_bytes(json.loads(lenient), "") or "<line>"
    except json.JSONDecodeError:
      field = "<line>"
    # A field name may hold the bad bytes itself: show them escaped (\xd2), since a
    # message with lone surrogates cannot be printed or written as UTF-8.
    try:
      field = field.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate JSON escape ("\ud800") in the name as well
      field = field.encode("utf-8", "backslashreplace").decode("utf-8")
    raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", source=source,
                    field=field, reason="not_utf8") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", source=source,
                    field="<json>", reason="malformed_json") from None


def raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """(line number from 1, the line's bytes without its end) of a text file."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      yield number, raw.rstrip(b"\r\n")
