"""Load a dataset (preferences or prompts) by Hub name or from a local json / jsonl / csv / parquet file.

A local JSON file is checked before `datasets` reads it, so a malformed line is reported with its file and line
number (the `datasets` builder only says "An error occurred while generating the dataset") and an empty file
with a clear error (the builder raises a bare StopIteration). Text files must be UTF-8 without a byte-order mark
(the JSON reader refuses a BOM, the CSV reader glues it to the first column's name); other encodings are named
with the fix. An existing file with another suffix is refused (`datasets` would say it "couldn't find" it).
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import DatasetDict, load_dataset

from ..names import looks_like_local_path

# file suffix -> the `datasets` builder that reads it
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# byte-order marks a text editor may write at the start of a file, and the encoding each announces
_BYTE_ORDER_MARKS = ((b"\xef\xbb\xbf", "UTF-8"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def load_dataset_or_file(name_or_path: str, config: str | None = None) -> DatasetDict:
    """A DatasetDict from a local .json/.jsonl/.parquet file (one "train" split) or a dataset name / folder.

    Raises FileNotFoundError for a local path that does not exist (instead of a Hub lookup of it) and ValueError
    naming the file and line for malformed or empty JSON files.
    """
    if not name_or_path:
        raise ValueError("Set --dataset_name to a Hub dataset or a local .json / .jsonl / .csv / .parquet file.")
    path = Path(name_or_path).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise FileNotFoundError(f"dataset file {name_or_path} does not exist")
        if count_file_records(path) == 0:
            raise ValueError(f"dataset file {name_or_path} holds no records (it is empty)")
        return load_dataset(LOCAL_FORMATS[suffix], data_files={"train": str(path)})
    if path.is_file():
        raise ValueError(
            f"dataset file {name_or_path}: unsupported suffix {suffix or '(none)'!r}; use a .jsonl (JSON Lines, one "
            "record per line), .json, .csv or .parquet file"
        )
    if looks_like_local_path(name_or_path) and not path.exists():
        raise FileNotFoundError(f"dataset folder {name_or_path} does not exist (no such folder)")
    return load_dataset(name_or_path, name=config)


def count_file_records(path: Path) -> int:
    """The number of records in a local .json / .jsonl / .csv / .parquet file (JSON checked record by record)."""
    kind = LOCAL_FORMATS[path.suffix.lower()]
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    check_utf8(path)
    if kind == "csv":
        return _count_csv_records(path)
    return count_json_records(path)


def check_utf8(path: Path) -> None:
    """ValueError naming the file (and line) unless it is UTF-8 text without a byte-order mark."""
    with path.open("rb") as f:
        start = f.read(4)
        for mark, encoding in _BYTE_ORDER_MARKS:
            if start.startswith(mark):
                fix = "without BOM (an editor's plain 'UTF-8', not 'UTF-8 with BOM')" if encoding == "UTF-8" else ""
                raise ValueError(
                    f"{path}: starts with a {encoding} byte-order mark, which the readers do not accept; save it as "
                    f"UTF-8 {fix or f'(e.g. iconv -f {encoding} -t UTF-8)'}"
                )
        f.seek(0)
        for line_number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{path}: not UTF-8 text at line {line_number} (byte {err.start} of the line is "
                    f"{line[err.start:err.start + 1]!r}); save the file as UTF-8"
                ) from err


def _count_csv_records(path: Path) -> int:
    """Rows of a CSV file below its header (0 for an empty file)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    try:
        return pa_csv.read_csv(path).num_rows
    except pa.ArrowInvalid as err:
        if "Empty CSV file" in str(err):
            return 0
        raise ValueError(f"{path}: not a valid CSV file ({err})") from err


def count_json_records(path: Path) -> int:
    """The number of records in a JSON Lines file or a JSON array file; ValueError naming the file and line of the
    first malformed record.

    A file is read as JSON Lines (one object per line, blank lines skipped) unless it starts with "[" (one JSON
    document, as a .json file may be). A JSON Lines file that fails but parses as one document is accepted too:
    `datasets` reads both.
    """
    if _first_character(path) == "[":
        return _count_document_records(path)
    try:
        return _count_json_lines(path)
    except ValueError:
        try:
            return _count_document_records(path)
        except ValueError:
            pass  # not one document either: the line-by-line error is the one that locates the problem
        raise


def _first_character(path: Path) -> str:
    """The first non-whitespace character of `path` ("" for a blank file)."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return line.strip()[0]
    return ""


def _count_json_lines(path: Path) -> int:
    """Records of a JSON Lines file; ValueError naming the line of the first that is not a JSON object."""
    count = 0
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}, line {line_number}: not valid JSON ({err.msg}, column {err.colno}): "
                    f"{line.strip()[:120]!r}"
                ) from err
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}, line {line_number}: expected a JSON object (one record per line), got "
                    f"{type(record).__name__}: {line.strip()[:120]!r}"
                )
            count += 1
    return count


def _count_document_records(path: Path) -> int:
    """Records of a file holding one JSON document: the items of an array (each an object) or 1 for an object."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from err
    if isinstance(document, dict):
        return 1
    if not isinstance(document, list):
        raise ValueError(f"{path}: expected a JSON array of objects or JSON Lines, got {type(document).__name__}")
    for index, record in enumerate(document):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: item {index} of the array is {type(record).__name__}, expected a JSON object")
    return len(document)
