"""Progress for long loops: a rich bar on an interactive terminal, nothing under CI or in tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Advance(Protocol):
    def __call__(self, description: str | None = None) -> None: ...


def interactive() -> bool:
    return (
        sys.stderr.isatty() and not os.environ.get("CI") and "PYTEST_CURRENT_TEST" not in os.environ
    )


@contextmanager
def progress(total: int, description: str) -> Iterator[Advance]:
    """Yield `advance(description=None)`; draws a bar only when a person is watching."""
    if not interactive():
        yield lambda description=None: None
        return
    from rich.progress import Progress

    with Progress(transient=False) as bar:
        task = bar.add_task(description, total=total)

        def advance(new_description: str | None = None) -> None:
            bar.update(task, advance=1, description=new_description or description)

        yield advance
