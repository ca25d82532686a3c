"""Every error prunespec raises, under one base class.

A spec or plan error collects *all* the problems found, each with where it is (file:line:column and
document path for specs; rule and tensor for plans) and what would be right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class PrunespecError(Exception):
    """Base class of every error prunespec raises on purpose."""

    def __reduce__(self) -> tuple[object, ...]:
        # picklable whatever the subclass's __init__ takes: an error is sent to every rank of a group
        return _rebuilt, (type(self), dict(self.__dict__), self.args)


@dataclass(frozen=True)
class Issue:
    """One problem: what is wrong, where, and (optionally) how to fix it."""

    message: str
    path: str = ""  # document path, e.g. "rules[2].amount"
    file: str | None = None
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based
    hint: str | None = None

    def where(self) -> str:
        parts = []
        if self.file is not None:
            loc = self.file
            if self.line is not None:
                loc += f":{self.line}"
                if self.column is not None:
                    loc += f":{self.column}"
            parts.append(loc)
        if self.path:
            parts.append(self.path)
        return ": ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        text = f"{where}: {self.message}" if where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class _IssuesError(PrunespecError):
    """An error made of one or more :class:`Issue`."""

    title = "error"

    def __init__(self, issues: Sequence[Issue] | Issue | str):
        if isinstance(issues, str):
            issues = [Issue(issues)]
        elif isinstance(issues, Issue):
            issues = [issues]
        self.issues: tuple[Issue, ...] = tuple(issues)
        super().__init__(str(self))

    def __str__(self) -> str:
        if len(self.issues) == 1:
            return str(self.issues[0])
        lines = [f"{len(self.issues)} problems:"]
        lines += [f"  {issue}" for issue in self.issues]
        return "\n".join(lines)


class SpecError(_IssuesError):
    """The spec is not valid: bad YAML, unknown keys, wrong types, unknown methods, bad options."""


class PlanError(_IssuesError):
    """The spec is valid but does not fit the model: selectors that match nothing, a `dim` out of
    range, a count larger than what is left."""


class ApplyError(PrunespecError):
    """A method failed while masks were computed or installed; the model was left as it was."""

    def __init__(self, rule: str, tensor: str, message: str, *, left: str = "the model was left unchanged"):
        self.rule = rule
        self.tensor = tensor
        self.detail = message  # what went wrong, without where
        super().__init__(f"{rule}, tensor {tensor}: {message} ({left})")


class ShrinkError(PrunespecError):
    """Pruned units could not be removed, or removing them would change the model's outputs (``error``:
    the largest relative difference found); the model was left as it was."""

    def __init__(self, message: str, error: float | None = None):
        self.error = error
        if error is not None:
            message = f"removing the pruned units of {message} changes the outputs (relative difference {error:.3g})"
        super().__init__(f"{message} (the model was left unchanged)")


class PluginError(PrunespecError):
    """Plugins clash or misbehave (e.g. two providers of one method name)."""


class CheckpointError(PrunespecError):
    """A checkpoint cannot be loaded into the model; the model was left as it was."""


class OutputError(PrunespecError):
    """A file cannot be written where asked (no such folder, no permission, a folder in the way, a full
    disk); an existing file there was left as it was."""


class ModelRefError(PrunespecError):
    """A `path/to/file.py:factory` or `package.module:factory` reference cannot be resolved."""


class SchedulerError(PrunespecError, ValueError):
    """A Scheduler was given a state it cannot resume from, or a step it cannot take; it was left as it was."""


class CalibrationError(ApplyError):
    """The calibration data could not be run through the model (a batch of the wrong kind or shape, a
    forward that raised); ``batch`` is the index of the batch at fault (None: not one batch's fault).
    Nothing was pruned and the model was left as it was."""

    def __init__(self, rules: str, message: str, batch: int | None = None):
        self.rule = rules
        self.tensor = ""
        self.detail = message
        self.batch = batch
        where = "calibration" if batch is None else f"calibration batch {batch}"
        PrunespecError.__init__(self, f"{rules}: {where}: {message} (the model was left unchanged)")


class ShardingError(PrunespecError):
    """A DTensor parameter is laid out in a way prunespec cannot prune (partial sums, strided shards, a
    mesh of only some of the ranks)."""


class RankError(PrunespecError):
    """Another rank of the process group failed with an error that cannot be sent as it is; raised on
    this rank too, so that every rank stops together (``rank``: the one that failed)."""

    def __init__(self, rank: int, message: str):
        self.rank = rank
        super().__init__(f"rank {rank} failed: {message}")


def _rebuilt(cls: type[BaseException], state: dict[str, object], args: tuple[object, ...]) -> BaseException:
    """An error of a class whose ``__init__`` takes other arguments than its message, from its state."""
    error: BaseException = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error
