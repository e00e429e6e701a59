"""JSON data files read one record at a time: a top-level array element by element, JSONL by line.

`json.loads` of a LLaVA file holds every record as Python objects at once (about 4.3 KB a record
for the synthetic world's sft.json, so gigabytes for LLaVA-665k). Here at most one chunk of text
(CHUNK characters; more only while one record is longer) and one record are held at a time.

    iter_json_array(path)  ->  (index, record), ...              the elements of [...], in order
    iter_jsonl(path)       ->  (line number, record or ValueError), ...   1-based, as editors count
A syntax error is one line with the file's own line and column, as `json.loads` of the whole file
reports it ("invalid JSON (Expecting ',' delimiter at line 3 column 5)"). Arrays are read as UTF-8
(RFC 8259); a JSONL line that is not UTF-8 is read as cp1252, as `sample.read_text` does.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterator

CHUNK = 1 << 20  # characters read at a time
WHITESPACE = " \t\n\r"
# A parse that fails (or a value that ends) this close to the end of the text read so far may be
# cut short by the chunk boundary ('{"a": tr' of '{"a": true}', 12 of 12.5): read more, parse again.
NEAR_END = 64


class _ArrayText:
    """The part of a file not parsed yet, with the line and column where it starts."""

    def __init__(self, path: Path, handle):
        self.path, self.handle = path, handle
        self.text, self.pos, self.eof = "", 0, False
        self.line, self.column = 1, 1  # of text[0] in the file

    def _fill(self) -> bool:
        """Read one more chunk (at least as much as is held, so that a long record costs
        amortised linear time) and drop what is parsed; False at the end of the file."""
        if self.eof:
            return False
        try:
            chunk = self.handle.read(max(CHUNK, len(self.text) - self.pos))
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.path}: not UTF-8 text ({error.reason}); JSON files are "
                             "UTF-8") from None
        if not chunk:
            self.eof = True
            return False
        done = self.text[:self.pos]
        newlines = done.count("\n")
        self.line += newlines
        self.column = (len(done) - done.rfind("\n")) if newlines else self.column + len(done)
        self.text, self.pos = self.text[self.pos:] + chunk, 0
        return True

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end of the file)."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text) or not self._fill():
                return self.text[self.pos:self.pos + 1]

    def error(self, message: str, pos: int) -> ValueError:
        before = self.text[:pos]
        newlines = before.count("\n")
        column = pos - before.rfind("\n") if newlines else self.column + pos
        return ValueError(f"{self.path}: invalid JSON ({message} at line {self.line + newlines} "
                          f"column {column})")

    def value(self, decoder: json.JSONDecoder) -> object:
        while True:
            try:
                value, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as error:
                cut_short = (error.msg.startswith("Unterminated string")
                             or error.pos >= len(self.text) - NEAR_END)
                if not (cut_short and self._fill()):
                    raise self.error(error.msg, error.pos) from None
                continue
            # A value that ends near where the text read so far ends may go on (a number:
            # "12" + "34", "1." + "5"): it is complete once more text follows it.
            if end < len(self.text) - NEAR_END or not self._fill():
                self.pos = end
                return value


def iter_json_array(path: str | Path) -> Iterator[tuple[int, object]]:
    """(index, element) of the JSON array that is the whole file, parsed one element at a time.
    A file that is no array is read whole, for json's own message ("found dict")."""
    path = Path(path)
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig", newline="") as handle:
        text = _ArrayText(path, handle)
        if text.peek() != "[":
            yield from _not_an_array(path, handle)
            return
        text.pos += 1
        if text.peek() == "]":
            text.pos += 1
        else:
            for index in itertools.count():
                yield index, text.value(decoder)
                delimiter = text.peek()
                if delimiter == "]":
                    text.pos += 1
                    break
                if delimiter != ",":
                    raise text.error("Expecting ',' delimiter", text.pos)
                text.pos += 1
                text.peek()
        if text.peek():
            raise text.error("Extra data", text.pos)


def _not_an_array(path: Path, handle) -> Iterator[tuple[int, object]]:
    handle.seek(0)
    try:
        data = json.loads(handle.read())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error.msg} at line {error.lineno} "
                         f"column {error.colno})") from None
    raise ValueError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    yield  # a generator, like iter_json_array


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, record) per non-blank line; a line that is not JSON gives a ValueError in
    place of its record, so that one bad line can be skipped like any other bad record."""
    path = Path(path)
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("cp1252", errors="replace")
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                yield line_number, ValueError(f"{path}:{line_number}: invalid JSON "
                                              f"({error.msg} at column {error.colno})")
