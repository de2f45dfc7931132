"""Python's bytecode caches under a model's `code/`: accepted only when provably its own source's.

A saved model holds no bytecode, but Python writes a cache (`__pycache__/<module>.<tag>.pyc`)
next to each module it imports the usual way, for example when `mlflow models serve -m ./model`
imports the model's code. Python may later run such a file instead of its source: a timestamp
`.pyc` whose recorded source mtime and size match, a checked hash-based one whose recorded hash
matches, and an unchecked hash-based one (PEP 552) whatever the source says. So a file under a
`__pycache__` folder of `code/` is accepted only when it is provably the compilation of the
verified source next to it:

- its name is `<stem>.<this interpreter's cache tag>[.opt-N].pyc` and `<stem>.py` in the parent
  folder is a file the manifest lists (and matches);
- it is at most `4 x` its source plus 16 KiB long, checked before a byte of it is read;
- its header carries this interpreter's magic number and says timestamp or checked hash: an
  unchecked hash-based `.pyc` is refused (Python's import never writes one);
- its code object equals `compile()` of the verified source at the optimization level its name
  says, in every field that decides what runs (bytecode, constants, names, local variable kinds,
  stack size, line and exception tables), recursively, and in each nested code object's
  qualified name. Only the file name recorded in it may differ: Python rewrites it at import.

Anything else (another interpreter's cache, a stale cache of other source, a `.pyc` outside a
`__pycache__` folder) is refused: delete the `__pycache__` folders to load the model.

    >>> bytecode_problem(Path("code/pkg/__pycache__/loader.cpython-311.pyc"), source_bytes)  # doctest: +SKIP
    None
"""

from __future__ import annotations

import importlib.util
import marshal
import re
import sys
from pathlib import Path
from types import CodeType

BYTECODE_DIR = "__pycache__"
MAX_SIZE_RATIO = 4
MAX_SIZE_SLACK = 16 * 1024
HEADER_BYTES = 16
_TIMESTAMP, _UNCHECKED_HASH, _CHECKED_HASH = 0, 1, 3
# What a code object runs besides its constants (compared by `==`, which skips some of these).
_FIELDS = (
    "co_argcount",
    "co_posonlyargcount",
    "co_kwonlyargcount",
    "co_nlocals",
    "co_stacksize",
    "co_flags",
    "co_code",
    "co_names",
    "co_varnames",
    "co_cellvars",
    "co_freevars",
    "co_name",
    "co_qualname",
    "co_firstlineno",
    "co_linetable",
    "co_exceptiontable",
)


def source_of(pyc: Path) -> tuple[Path, int] | None:
    """The source a cache file in a `__pycache__` folder belongs to, and its optimization level
    (None if its name is not one this interpreter gives a cache of a module)."""
    tag = re.escape(sys.implementation.cache_tag or "")
    match = re.fullmatch(rf"(?P<stem>[^.]+)\.{tag}(?:\.opt-(?P<level>[12]))?\.pyc", pyc.name)
    if pyc.parent.name != BYTECODE_DIR or match is None or not tag:
        return None
    return pyc.parent.parent / f"{match['stem']}.py", int(match["level"] or 0)


def bytecode_problem(pyc: Path, source: bytes, optimize: int) -> str | None:
    """Why the cache file `pyc` is not provably the compilation of `source` (verified), or None."""
    limit = MAX_SIZE_RATIO * len(source) + MAX_SIZE_SLACK
    with open(pyc, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        return f"over {limit} bytes, more than any compilation of its {len(source)}-byte source"
    if len(data) < HEADER_BYTES or data[:4] != importlib.util.MAGIC_NUMBER:
        return "not bytecode of this Python"
    flags = int.from_bytes(data[4:8], "little")
    if flags == _UNCHECKED_HASH:
        return "unchecked hash-based bytecode, which Python runs whatever its source says"
    if flags not in (_TIMESTAMP, _CHECKED_HASH):
        return "a bytecode header Python does not write"
    try:
        cached = marshal.loads(data[HEADER_BYTES:])
    except (ValueError, EOFError, TypeError):
        return "not bytecode Python can read"
    expected = compile(source, str(pyc), "exec", dont_inherit=True, optimize=optimize)
    if not isinstance(cached, CodeType) or not same_code(cached, expected):
        return "bytecode that is not the compilation of its source"
    return None


def same_code(a: CodeType, b: CodeType) -> bool:
    """Whether two code objects run the same (their file names aside)."""
    if a != b or any(getattr(a, name) != getattr(b, name) for name in _FIELDS):
        return False
    nested = [(x, y) for x, y in zip(a.co_consts, b.co_consts) if isinstance(x, CodeType) or isinstance(y, CodeType)]
    return all(isinstance(x, CodeType) and isinstance(y, CodeType) and same_code(x, y) for x, y in nested)
