"""Read a pickle of plain data (lists, dicts, strings, numbers) without running any code.

The refer datasets ship their referring expressions as Python pickles (refs(unc).p: a list of
dicts). Unpickling can call any importable function (a `__reduce__` naming `os.system` runs a
shell command), so a downloaded pickle must not be read with `pickle.load`. Plain containers and
scalars have their own opcodes and need no class at all; every opcode that would bring in a
callable or a class (GLOBAL, STACK_GLOBAL, INST, OBJ via one of those, the extension registry)
goes through `find_class`, and this unpickler's `find_class` refuses all of them before anything
is imported. Persistent ids (an object stored outside the pickle) are refused too.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path


class RefusedPickle(ValueError):
    """A pickle that names a class or a persistent object (the message names the file)."""


class PlainDataUnpickler(pickle.Unpickler):
    """A pickle.Unpickler that loads no class: reading stops with a one-line ValueError naming the
    file and what the pickle tried to load."""

    def __init__(self, file, where: str):
        # Python 2 pickles store byte strings; read them as UTF-8 text (ASCII, LISA's default
        # encoding, is a subset of it).
        super().__init__(file, encoding="utf-8")
        self.where = where

    def find_class(self, module: str, name: str):
        raise RefusedPickle(f"{self.where}: the pickle names {module}.{name}; only plain lists, "
                         "dicts, strings and numbers are read (no class is ever loaded)")

    def persistent_load(self, pid):
        raise RefusedPickle(f"{self.where}: the pickle refers to a persistent object {pid!r:.40}; "
                         "only plain lists, dicts, strings and numbers are read")


def load_plain_pickle(path: str | Path) -> object:
    """The plain data in the pickle file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    return loads_plain_pickle(path.read_bytes(), str(path))


def loads_plain_pickle(data: bytes, where: str = "<pickle>") -> object:
    try:
        return PlainDataUnpickler(io.BytesIO(data), where).load()
    except RefusedPickle:  # already one line naming the file
        raise
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: a byte string in the pickle is not UTF-8 "
                         f"(at byte {error.start})") from None
    # The unpickler's own complaints (a truncated file, an unknown opcode, protocol 6, ...).
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError, TypeError,
            AttributeError, MemoryError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{where}: not a readable pickle ({message})") from None
