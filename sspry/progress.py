"""Progress reporting without a user interface: long operations (indexing, planning a bundle,
verifying) call a `Progress`; the CLI draws it with tqdm on stderr, a library user passes their own or
nothing. The base class does nothing, so callers never check for None."""

from __future__ import annotations


class Stage:
    """One measured step of work (files, bytes, rules)."""

    def advance(self, amount: int = 1) -> None:
        """`amount` more units done."""

    def close(self) -> None:
        """The step is over (done, or abandoned)."""

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    """Receives what long operations report. Subclass and override what you want to show."""

    def stage(self, what: str, total: int | None, unit: str) -> Stage:
        """A step of `total` units (None: unknown) begins; `what` names it ("indexing", "planning")."""
        return Stage()

    def note(self, message: str) -> None:
        """Something the user should know about now (a file skipped, a server offline)."""


SILENT = Progress()
