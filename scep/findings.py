"""The one line type of the check reports (`scep doctor`, `scep intune check`): what was checked and how it went.

It sits at the bottom so that a backend's own check (the Intune walk-through in scep.azure.intune.check) and the
tools that run every check report the same lines, which the command line prints one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Status(str, Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    """One checked point. `step` names it when the report walks through named steps ("Graph token")."""

    status: Status
    message: str
    step: str = ""

    @property
    def ok(self) -> bool:
        """This point's own outcome: a warning is not a failure."""
        return self.status is not Status.FAIL

    @classmethod
    def of(cls, ok: bool, message: str, step: str = "") -> Finding:
        return cls(Status.OK if ok else Status.FAIL, message, step)
