"""Reading benchmark files in their published layouts, with errors that name file, line, field.

Each benchmark module (truthfulqa, crows_pairs, winogender, toxicity, multiple_choice) turns
the records read here into typed items; every record remembers the line it started on, so a
bad value is reported where a person can find it. Errors are `jaxrlhf.data.DataError`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Iterator

from jaxrlhf.data.formats import DataError, Source

Record = tuple[dict, Source]


def _read_text(path: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such benchmark file")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise DataError(f"not valid UTF-8 (byte {e.start})", source=Source(path, line),
                    reason="encoding") from None


def _physical_lines(text: str) -> list[str]:
  """The file's lines as a JSONL writer wrote them: split at "\n" (or "\r\n") only.

  `str.splitlines` would also split at characters a JSON string may hold unescaped
  (U+2028, U+0085, form feed, ...), cutting a valid record in two and numbering every
  later line wrongly.
  """
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  return [line[:-1] if line.endswith("\r") else line for line in lines]


def _line_at(text: str, index: int) -> int:
  return text.count("\n", 0, index) + 1


def _json_array(path: str, text: str, start: int) -> Iterator[Record]:
  """Elements of a top-level JSON array, each with the line its value starts on."""
  decoder = json.JSONDecoder()
  i = start + 1  # past '['
  n = len(text)
  while True:
    while i < n and text[i].isspace():
      i += 1
    if i < n and text[i] == "]":
      return
    begin = i
    try:
      value, i = decoder.raw_decode(text, i)
    except json.JSONDecodeError as e:
      raise DataError(f"not valid JSON: {e.msg}", source=Source(path, e.lineno),
                      reason="bad_json") from None
    yield _object(value, Source(path, _line_at(text, begin)))
    while i < n and text[i].isspace():
      i += 1
    if i < n and text[i] == ",":
      i += 1
    elif i >= n or text[i] != "]":
      raise DataError("expected ',' or ']' after an element of the top-level array",
                      source=Source(path, _line_at(text, min(i, n))), reason="bad_json")


def _object(value: Any, source: Source) -> Record:
  if not isinstance(value, dict):
    raise DataError(f"expected a JSON object, got {type(value).__name__}", source=source,
                    field="<record>", reason="wrong_type")
  return value, source


def read_json_records(path: str) -> list[Record]:
  """Objects of a JSONL file (one a line) or of a JSON file holding one array of objects."""
  text = _read_text(path)
  stripped = text.lstrip()
  if stripped.startswith("["):
    records = list(_json_array(path, text, len(text) - len(stripped)))
  else:
    records = []
    for number, line in enumerate(_physical_lines(text), start=1):
      if not line.strip():
        continue
      source = Source(path, number)
      try:
        value = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg} (column {e.colno})", source=source,
                        reason="bad_json") from None
      records.append(_object(value, source))
  if not records:
    raise DataError("the file holds no records", source=Source(path, 1), reason="empty_file")
  return records


def read_table_records(path: str, *, delimiter: str, required: tuple[str, ...],
                       normalize=str.strip) -> list[Record]:
  """Rows of a CSV/TSV file with a header line, as dicts keyed by the header's names
  (passed through `normalize`).

  A header that lacks a `required` column is reported on line 1 with the column's name.
  """
  text = _read_text(path)
  # newline="": rows end at "\n", "\r\n" or "\r" only, as the csv module expects.
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
  try:
    header = next(reader)
  except StopIteration:
    raise DataError("the file is empty (expected a header line)", source=Source(path, 1),
                    reason="empty_file") from None
  header = [normalize(name) for name in header]
  for name in required:
    if name not in header:
      raise DataError(f"the header has no column '{name}' (columns: {', '.join(header)})",
                      source=Source(path, 1), field=name, reason="missing_field")
  records = []
  last_line = reader.line_num
  for row in reader:
    source = Source(path, last_line + 1)
    last_line = reader.line_num
    if not any(cell.strip() for cell in row):
      continue
    if len(row) != len(header):
      raise DataError(f"expected {len(header)} columns as in the header, got {len(row)}",
                      source=source, field="<row>", reason="wrong_columns")
    records.append((dict(zip(header, row)), source))
  if not records:
    raise DataError("the file holds a header but no rows", source=Source(path, 1),
                    reason="empty_file")
  return records


# ---------------------------------------------------------------------------------------
# Field checks shared by the benchmark parsers.
# ---------------------------------------------------------------------------------------


def require(record: dict, field: str, source: Source, path: str | None = None) -> Any:
  if field not in record:
    present = ", ".join(sorted(record)) or "none"
    raise DataError(f"missing required field (fields present: {present})", source=source,
                    field=path or field, reason="missing_field")
  return record[field]


def text_field(value: Any, field: str, source: Source) -> str:
  """A non-empty string."""
  if not isinstance(value, str):
    raise DataError(f"expected a string, got {type(value).__name__}", source=source,
                    field=field, reason="wrong_type")
  if not value.strip():
    raise DataError("the text is empty", source=source, field=field, reason="empty_text")
  return value


def int_field(value: Any, field: str, source: Source, *, low: int, high: int) -> int:
  """An integer in [low, high]; strings of digits (CSV/TSV cells) are accepted."""
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    value = int(value)
  if not isinstance(value, int) or isinstance(value, bool):
    raise DataError(f"expected an integer, got {json.dumps(value)}", source=source,
                    field=field, reason="wrong_type")
  if not low <= value <= high:
    raise DataError(f"expected an integer in [{low}, {high}], got {value}", source=source,
                    field=field, reason="out_of_range")
  return value
