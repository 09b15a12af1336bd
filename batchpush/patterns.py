"""Regular expressions compiled on first use.

Compiling a module's patterns when it is imported costs every run the time of
patterns it may never use (redirects, challenges, tag lists, version ranges...):
about 5 ms of a one-image run's start-up (bench/startup.py). A ``LazyPattern``
compiles on its first match; the methods the package uses are its interface.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable


class LazyPattern:
    """``re.compile(pattern, flags)``, done on first use. Thread-safe: two threads
    matching first at once may both compile it, to the same pattern."""

    __slots__ = ("_compiled", "flags", "pattern")

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self.pattern = pattern
        self.flags = flags
        self._compiled: re.Pattern[str] | None = None

    def compiled(self) -> re.Pattern[str]:
        compiled = self._compiled
        if compiled is None:
            compiled = self._compiled = re.compile(self.pattern, self.flags)
        return compiled

    def match(self, string: str, pos: int = 0, endpos: int = sys.maxsize) -> re.Match[str] | None:
        return self.compiled().match(string, pos, endpos)

    def fullmatch(self, string: str, pos: int = 0, endpos: int = sys.maxsize) -> re.Match[str] | None:
        return self.compiled().fullmatch(string, pos, endpos)

    def search(self, string: str, pos: int = 0, endpos: int = sys.maxsize) -> re.Match[str] | None:
        return self.compiled().search(string, pos, endpos)

    def sub(self, repl: str | Callable[[re.Match[str]], str], string: str, count: int = 0) -> str:
        return self.compiled().sub(repl, string, count)
