"""jaxrlhf/eval/files.py: benchmark files read line by line as their writers wrote them."""

import json

import pytest

from jaxrlhf.data import formats
from jaxrlhf.eval import files

# Characters `str.splitlines` splits at but a JSON string may hold unescaped.
LINE_LIKE = ("\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e")


def _write(path, text: str):
  path.write_bytes(text.encode("utf-8"))
  return str(path)


def test_json_records_keep_line_like_characters_inside_strings(tmp_path):
  records = [{"prompt": f"a{c}b", "i": i} for i, c in enumerate(LINE_LIKE)]
  path = _write(tmp_path / "r.jsonl",
                "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in records))
  got = files.read_json_records(path)
  assert [value["prompt"] for value, _ in got] == [r["prompt"] for r in records]
  assert [source.line for _, source in got] == list(range(1, len(records) + 1))


def test_a_bad_json_line_is_named_by_its_physical_line(tmp_path):
  text = json.dumps({"prompt": "x\u2028y"}, ensure_ascii=False) + "\n" + '{"prompt": "\n'
  with pytest.raises(formats.DataError, match=r"r\.jsonl, line 2: not valid JSON"):
    files.read_json_records(_write(tmp_path / "r.jsonl", text))


def test_table_rows_keep_line_like_characters_inside_fields(tmp_path):
  text = "sent_more\tsent_less\n" + "".join(f"a{c}b\tc\n" for c in LINE_LIKE) + "x\n"
  with pytest.raises(formats.DataError) as error:
    files.read_table_records(_write(tmp_path / "t.tsv", text), delimiter="\t",
                             required=("sent_more", "sent_less"))
  # Every row before the short one was read whole, so the short row is on its own line.
  assert f"line {len(LINE_LIKE) + 2}" in str(error.value)
