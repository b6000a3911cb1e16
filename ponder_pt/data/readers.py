"""Stream documents out of corpora, reporting every record that cannot become a document.

jsonl and txt are read line by line so a bad line is named by file and line number;
parquet, arrow, local HF datasets (`save_to_disk` folders) and hub names go through
`datasets` in streaming mode, where "line" is the 1-based row number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union


@dataclass(frozen=True)
class Document:
    source: str
    line: int
    text: str


@dataclass(frozen=True)
class Reject:
    source: str
    line: int
    reason: str
    excerpt: str = ""
    keys: tuple = ()  # a record without the text key: its keys,
    longest_text_key: Optional[str] = None  # and the one holding its longest string

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


Record = Union[Document, Reject]

DATASET_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def _excerpt(data: Union[bytes, str], n: int = 80) -> str:
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    text = text.strip()
    return text[:n] + ("..." if len(text) > n else "")


def _check_text(source: str, line: int, text, key: str, raw, record: Optional[dict] = None
                ) -> Record:
    if text is None:
        keys, longest = (), None
        if record is not None and key not in record:  # what it has instead: --text-key?
            keys = tuple(str(k) for k in record)
            strings = [(len(v), str(k)) for k, v in record.items() if isinstance(v, str) and v]
            longest = max(strings)[1] if strings else None
        return Reject(source, line, f"missing text key {key!r}", _excerpt(raw), keys, longest)
    if not isinstance(text, str):
        return Reject(source, line, f"text key {key!r} is {type(text).__name__}, not a string",
                      _excerpt(str(raw)))
    if not text.strip():
        return Reject(source, line, "empty text", _excerpt(raw))
    return Document(source, line, text)


def _open_binary(path: str):
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


@dataclass(frozen=True)
class RawLine:
    """An unparsed jsonl line: parsing is left to whichever process tokenizes it."""

    source: str
    line: int
    data: bytes
    text_key: str = "text"

    def parse(self) -> Record:
        try:
            line = self.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Reject(self.source, self.line, f"invalid UTF-8 at byte {exc.start}",
                          _excerpt(self.data))
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return Reject(self.source, self.line, f"broken JSON: {exc.msg} (column {exc.colno})",
                          _excerpt(line))
        if not isinstance(record, dict):
            return Reject(self.source, self.line,
                          f"JSON value is {type(record).__name__}, not an object", _excerpt(line))
        return _check_text(self.source, self.line, record.get(self.text_key), self.text_key, line,
                           record)


def read_jsonl_raw(path: str, text_key: str = "text") -> Iterator[RawLine]:
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():  # blank separator lines are not records
                yield RawLine(path, lineno, raw, text_key)


def read_jsonl(path: str, text_key: str = "text") -> Iterator[Record]:
    for raw in read_jsonl_raw(path, text_key):
        yield raw.parse()


def read_txt(path: str, mode: str = "paragraph") -> Iterator[Record]:
    """mode: 'line' (a document per line), 'paragraph' (blank-line separated) or 'file'."""
    if mode not in ("line", "paragraph", "file"):
        raise ValueError(f"txt mode {mode!r}: expected line, paragraph or file")
    buf: list[str] = []
    start = 1
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Reject(path, lineno, f"invalid UTF-8 at byte {exc.start}", _excerpt(raw))
                continue
            if mode == "line":
                if line.strip():
                    yield Document(path, lineno, line.rstrip("\r\n"))
                continue
            if mode == "paragraph" and not line.strip():
                if buf:
                    yield Document(path, start, "".join(buf).rstrip("\r\n"))
                buf = []
                continue
            if not buf:
                start = lineno
            buf.append(line)
    if buf:
        text = "".join(buf).rstrip("\r\n")
        yield _check_text(path, start, text, "text", text)
    elif mode == "file":
        yield Reject(path, 1, "empty text", "")


def read_dataset(spec: str, text_key: str = "text") -> Iterator[Record]:
    """Parquet/arrow/csv files, a `save_to_disk` folder, or `hf:NAME[:CONFIG[:SPLIT]]` (hub)."""
    import datasets

    ext = next((e for e in DATASET_FORMATS if spec.lower().endswith(e)), None)
    if spec.startswith("hf:"):  # a hub dataset, for users with internet
        name, _, rest = spec[3:].partition(":")
        config, _, split = rest.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    elif ext is not None:
        ds = datasets.load_dataset(DATASET_FORMATS[ext], data_files=spec, split="train",
                                   streaming=True)
    elif os.path.isdir(spec):
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{spec}: dataset dict has no 'train' split ({list(ds)})")
            ds = ds["train"]
    else:
        raise FileNotFoundError(f"{spec}: not a file or dataset folder (hub datasets: hf:NAME)")
    for row, record in enumerate(ds, start=1):
        yield _check_text(spec, row, record.get(text_key), text_key,
                          json.dumps(record, default=str), record)


def read_input(spec: str, text_key: str = "text", txt_mode: str = "paragraph",
               raw: bool = False) -> Iterator[Union[Record, RawLine]]:
    """Records of one input; with raw=True jsonl lines come unparsed (see RawLine.parse)."""
    if spec.startswith("hf:"):
        return read_dataset(spec, text_key)
    lower = spec.lower()
    if lower.endswith((".txt", ".txt.gz")):
        return read_txt(spec, txt_mode)
    if lower.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
        return (read_jsonl_raw if raw else read_jsonl)(spec, text_key)
    if os.path.isfile(spec) and not any(lower.endswith(e) for e in DATASET_FORMATS):
        raise ValueError(f"{spec}: unknown input format; use .jsonl, .json, .txt, .parquet, "
                         ".arrow, .csv or a `datasets.save_to_disk` folder")
    return read_dataset(spec, text_key)


def check_inputs(specs: list[str]) -> None:
    """Fail before any work starts on inputs that are clearly missing."""
    missing = [s for s in specs if not s.startswith("hf:") and not os.path.exists(s)]
    if missing:
        raise FileNotFoundError(f"input(s) not found: {', '.join(missing)} "
                                "(hub datasets are written hf:NAME[:CONFIG[:SPLIT]])")
