"""Every `MXC_*` environment flag, declared once, with scoped overrides for tests.

    DUMP_IR.get()                  # value from the environment, or the default
    with DUMP_IR.override("dir"):  # scoped, for tests
        ...

Flags are read when used, never at import, so a test can set them per call.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Flag(Generic[T]):
    """One environment flag: its variable, how to read it, its default and what it does."""

    env: str
    parse: Callable[[str], T]
    default: T
    doc: str
    _override: list = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self._override = []

    def get(self) -> T:
        if self._override:
            return self._override[-1]
        raw = os.environ.get(self.env)
        return self.default if raw in (None, "") else self.parse(raw)

    @contextlib.contextmanager
    def override(self, value: T) -> Iterator[None]:
        self._override.append(value)
        try:
            yield
        finally:
            self._override.pop()


def _bool(text: str) -> bool:
    return text.strip().lower() not in ("0", "false", "no", "off")


DUMP_IR: Flag[str | None] = Flag("MXC_DUMP_IR", str, None, "directory to write the IR after every pass")
DEBUG: Flag[bool] = Flag("MXC_DEBUG", _bool, False, "verify the IR after every pass and check every node's result shape at run time")

UPDATE_GOLDEN: Flag[bool] = Flag("MXC_UPDATE_GOLDEN", _bool, False, "tests rewrite golden IR files instead of comparing")
CACHE_DIR: Flag[str | None] = Flag(
    "MXC_CACHE_DIR", str, None, "directory of generated kernel sources (default ~/.cache/mxc/kernels)"
)

FLAGS = (DUMP_IR, DEBUG, UPDATE_GOLDEN, CACHE_DIR)
