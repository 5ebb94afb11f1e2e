"""Prompt record files: JSONL, Parquet and ArrayRecord (JSON-encoded records).

A record is a JSON object::

    {"prompt": "What is 2+3?", "domain": "math", "answer": "5", "reward": "exact_match"}

``prompt`` is a non-empty string or a non-empty list of chat messages
``{"role": str, "content": str}``; ``domain`` is a non-empty string (it routes the prompt to its
teacher); every other field is free reward metadata (``answer``, ``tests``, ``reward`` = the
optional name of a reward function, ...) and rides along untouched.

``read_records`` validates every record and raises one ``DataError`` naming the file, the line
(JSONL, 1-based) or record index (Parquet, ArrayRecord) and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

JSONL = (".jsonl",)
PARQUET = (".parquet",)
ARRAY_RECORD = (".array_record", ".arrayrecord")
_JSON_FIELD = b"mopd_jax.json"  # Parquet field metadata: values are JSON text

_PROMPT_HELP = ("a non-empty string or a non-empty list of "
                "{'role': str, 'content': str} chat messages")


class DataError(ValueError):
    """Bad prompt data or data config; the message names the file/field and the fix."""


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read and validate every record of a ``.jsonl``, ``.parquet`` or ``.array_record`` file."""
    return [r for _, r in read_located(path)]


def read_located(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """``read_records`` with where each record is: ``file:line`` or ``file: record i``."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a data file (.jsonl, .parquet, "
                        ".array_record)")
    ext = _format(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    if ext in JSONL:
        return _read_jsonl(path)
    if ext in PARQUET:
        return [(f"{path}: record {i}", r) for i, r in enumerate(_read_parquet(path))]
    return [(f"{path}: record {i}", r) for i, r in enumerate(_read_array_record(path))]


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write records to a ``.jsonl``, ``.parquet`` or ``.array_record`` file (no validation)."""
    path, records = Path(path), list(records)
    ext = _format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext in JSONL:
        with path.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    elif ext in PARQUET:
        _write_parquet(path, records)
    else:
        from array_record.python.array_record_module import ArrayRecordWriter

        writer = ArrayRecordWriter(str(path), "group_size:1")
        for r in records:
            writer.write(json.dumps(r, ensure_ascii=False).encode("utf-8"))
        writer.close()


def validate_record(record: Any, where: str) -> dict:
    """Check one record's ``prompt`` and ``domain``; ``where`` prefixes the error message."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; "
                        "each record must be an object with 'prompt' and 'domain'")
    if "prompt" not in record:
        raise DataError(f"{where}: missing 'prompt'; add one: {_PROMPT_HELP}")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: empty 'prompt'; give {_PROMPT_HELP}")
    elif isinstance(prompt, list):
        if not prompt:
            raise DataError(f"{where}: empty 'prompt' message list; give {_PROMPT_HELP}")
        for i, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: 'prompt' message {i} is {m!r}; each message must be "
                                "{'role': str, 'content': str}")
    else:
        raise DataError(f"{where}: 'prompt' is {type(prompt).__name__}; it must be "
                        f"{_PROMPT_HELP}")
    domain = record.get("domain")
    if domain is None:
        raise DataError(f"{where}: missing 'domain'; add the domain name (e.g. \"math\") that "
                        "routes the prompt to its teacher")
    if not isinstance(domain, str) or not domain.strip():
        raise DataError(f"{where}: 'domain' is {domain!r}; it must be a non-empty string")
    if record.get("reward") is not None and not isinstance(record["reward"], str):
        raise DataError(f"{where}: 'reward' is {record['reward']!r}; it must be the name of a "
                        "reward function (a string) or absent")
    return record


def _format(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in JSONL + PARQUET + ARRAY_RECORD:
        raise DataError(f"{path}: unknown extension {ext!r}; use one of "
                        f"{', '.join(JSONL + PARQUET + ARRAY_RECORD)}")
    return ext


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                                f"{e.start + 1}); re-encode the file as UTF-8, e.g. iconv -f "
                                "latin1 -t utf-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg}, column {e.colno}); each line "
                                "must be one complete JSON object") from None
            records.append((where, validate_record(record, where)))
    return records


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}); rewrite it with "
                        "write_records") from None
    rows = table.to_pylist()
    for field in table.schema:
        if (field.metadata or {}).get(_JSON_FIELD):
            for row in rows:
                row[field.name] = json.loads(row[field.name])
    # A Parquet column exists in every row; a field absent from a record reads back as null.
    rows = [{k: v for k, v in row.items() if v is not None} for row in rows]
    return [validate_record(r, f"{path}: record {i}") for i, r in enumerate(rows)]


def _write_parquet(path: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields, columns = [], []
    for k in dict.fromkeys(k for r in records for k in r):  # union of fields, first-seen order
        values = [r.get(k) for r in records]
        try:
            column = pa.array(values)
            exact = column.to_pylist() == values
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            exact = False
        if not exact:
            # Mixed types (a text prompt beside a chat prompt) or structs with differing keys:
            # store JSON text and mark the field so the reader decodes it.
            column = pa.array([json.dumps(v, ensure_ascii=False) for v in values])
        fields.append(pa.field(k, column.type, metadata=None if exact else {_JSON_FIELD: b"1"}))
        columns.append(column)
    pq.write_table(pa.Table.from_arrays(columns, schema=pa.schema(fields)), path)


def _read_array_record(path: Path) -> list[dict]:
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(str(path))
        raw = reader.read_all()
        reader.close()
    except (RuntimeError, ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable ArrayRecord file ({e}); rewrite it with "
                        "write_records") from None
    records = []
    for i, blob in enumerate(raw):
        where = f"{path}: record {i}"
        try:
            record = json.loads(blob)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: malformed JSON ({e}); each ArrayRecord record must be "
                            "one UTF-8 JSON object") from None
        records.append(validate_record(record, where))
    return records
