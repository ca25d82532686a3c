"""The spec language (version 1) as pydantic models.

These models are the single source of truth for the spec: the JSON Schema in ``schemas/`` is generated
from them (see :mod:`prunespec.schema`), and the loader builds them from YAML.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import Issue
from .patterns import pattern_problem

PathPart = str | int
DocPath = tuple[PathPart, ...]

Fraction = Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=0)]


def format_path(path: Sequence[PathPart]) -> str:
    """``("rules", 2, "amount")`` -> ``"rules[2].amount"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class SourceMap:
    """Where each node of a spec document came from: file name and 1-based (line, column)."""

    file: str | None = None
    values: dict[DocPath, tuple[int, int]] = field(default_factory=dict)
    keys: dict[DocPath, tuple[int, int]] = field(default_factory=dict)

    def issue(self, path: DocPath, message: str, hint: str | None = None, *, key: bool = False) -> Issue:
        """An :class:`Issue` located at ``path`` (at the key itself when ``key``, else at its value)."""
        pos = None
        lookup = (self.keys, self.values) if key else (self.values, self.keys)
        for probe in range(len(path), -1, -1):
            for table in lookup:
                pos = table.get(tuple(path[:probe]))
                if pos:
                    break
            if pos:
                break
        line, column = pos if pos else (None, None)
        return Issue(message, format_path(path), self.file, line, column, hint)


def _name_pattern(pattern: str) -> str:
    problem = pattern_problem(pattern)
    if problem is not None:  # the hint travels in the error's context (see loader.pydantic_issues)
        raise PydanticCustomError("name_pattern", problem.message, {"hint": problem.hint})
    return pattern


_TYPE_ENTRY = re.compile(r"[^\W\d]\w*(\.[^\W\d]\w*)*")


def _type_entry(entry: str) -> str:
    if not _TYPE_ENTRY.fullmatch(entry):
        raise PydanticCustomError(
            "type_entry",
            "a types entry is a class name (`Conv2d`) or a dotted path (`torch.nn.Conv2d`)",
            {"hint": "Python identifiers joined by dots, without spaces or brackets"},
        )
    return entry


NamePattern = Annotated[str, AfterValidator(_name_pattern)]
TypeEntry = Annotated[str, AfterValidator(_type_entry)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Select(_Model):
    """Which modules and parameters a rule acts on."""

    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["types"]}, {"required": ["names"]}, {"required": ["preset"]}]}
    )

    preset: Literal["prunable"] | None = Field(
        default=None,
        description="`prunable`: every module with a weight of 2 or more dims, except embeddings, norm layers "
        "and the output head (a weight tied to an embedding, or a module under lm_head, classifier, cls, score, "
        "qa_outputs, head).",
    )

    types: list[TypeEntry] | None = Field(
        default=None,
        min_length=1,
        description="Module class names (`Conv2d`) or dotted paths (`torch.nn.Conv2d`); isinstance match.",
    )
    names: list[NamePattern] | None = Field(
        default=None,
        min_length=1,
        description="Globs on qualified module names (`*` within one dotted segment, `**` across any number "
        "of segments), or `re:<regex>` for a full-match regular expression.",
    )
    exclude: list[NamePattern] = Field(
        default_factory=list, description="Same syntax as `names`; removes modules from the selection."
    )
    params: list[str] = Field(
        default_factory=lambda: ["weight"],
        min_length=1,
        description="Parameter names to prune on each module.",
    )

    @model_validator(mode="after")
    def _types_or_names(self) -> Select:
        if self.types is None and self.names is None and self.preset is None:
            raise ValueError("give `types`, `names` or `preset` to say which modules the rule selects")
        return self


class Schedule(_Model):
    """Gradual pruning: the sparsity a rule aims at rises from ``initial`` at ``start`` to the rule's
    ``sparsity`` at ``end``, updated every ``every`` steps (or epochs: the unit is whatever the training
    loop passes to ``Scheduler.step``)."""

    start: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        default=0, description="Step (or epoch) of the first update, at `initial` sparsity."
    )
    end: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        description="Step (or epoch) at which the rule's final `sparsity` is reached."
    )
    every: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        default=1, description="Update frequency: masks change at start, start + every, ... and at end."
    )
    initial: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = Field(
        default=0.0, description="Sparsity at `start`."
    )
    curve: Literal["cubic", "linear", "constant"] = Field(
        default="cubic",
        description="cubic: s_t = s_f + (s_i - s_f)(1 - (t - start)/(end - start))^3 (Zhu & Gupta, 2017); "
        "linear; constant: the final sparsity at once, at `start` (one-shot).",
    )
    unit: Literal["step", "epoch"] = Field(default="step", description="What t counts; shown in plans and logs.")

    @model_validator(mode="after")
    def _ordered(self) -> Schedule:
        if self.end < self.start or (self.end == self.start and self.curve != "constant"):
            raise ValueError(f"`end` ({self.end:g}) must come after `start` ({self.start:g})")
        return self


class Owl(_Model):
    """Outlier-weighted layerwise sparsity (OWL, Yin et al., ICML 2024): the rule's `sparsity` becomes the
    mean over the model's blocks, each block pruned less the more outliers its scores have."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    m: Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)] = Field(
        default=5.0,
        description="An outlier is a score greater than `m` times the mean score of its block (OWL's M).",
    )
    lam: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False, strict=True)] = Field(
        default=0.08,
        alias="lambda",
        description="The blocks' sparsities spread over 2 * lambda, from the most outliers (least sparse) to "
        "the fewest (most sparse), shifted so that their mean is the rule's `sparsity` (OWL's lambda).",
    )


class GroupOptions(_Model):
    """Prune coupled groups (structural pruning): every tensor that must lose the same unit is scored
    and pruned together, so that :func:`prunespec.shrink` can then remove the unit."""

    unit: Literal["channels", "heads", "blocks"] = Field(
        description="What `amount`/`sparsity` count. `channels`: a selected MLP's hidden channels (gate/up rows "
        "and down columns together); `heads`: a selected attention module's heads (with grouped-query "
        "attention, a KV head and its query heads); `blocks`: whole selected blocks (pre-norm residual "
        "blocks of one ModuleList)."
    )
    round_to: Annotated[StrictInt, Field(ge=1)] = Field(
        default=1, description="Each group keeps a multiple of this many units (e.g. 8 or 64 channels)."
    )
    min: Annotated[StrictInt, Field(ge=0)] = Field(
        default=1, description="Each group keeps at least this many units (not for `blocks`)."
    )


class Rule(_Model):
    """One pruning rule: select tensors, then prune them with one method."""

    name: str | None = Field(default=None, description="Optional label, used in plans and errors.")
    select: Select
    method: str = Field(description="A registered pruning method (`prunespec methods` lists them).")
    amount: Count | Fraction | None = Field(
        default=None,
        description="A float in [0, 1] is the fraction of what is still unpruned; an integer is a count "
        "(entries, or channels for structured methods). Rounding follows torch.nn.utils.prune.",
    )
    sparsity: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=False)] | None = Field(
        default=None,
        description="Instead of `amount`: the final fraction pruned (entries; channels for structured "
        "methods), whatever earlier rules already pruned.",
    )
    scope: Literal["local", "global"] = Field(
        default="local",
        description="`local`: each tensor on its own. `global`: one budget across every tensor the rule selects.",
    )
    max_sparsity: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = Field(
        default=None,
        description="With scope: global, no tensor of the group ends sparser than this (its share of the budget "
        "goes to the others).",
    )
    min_sparsity: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = Field(
        default=None,
        description="With scope: global, every tensor of the group ends at least this sparse.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Method options, validated against the method's own options model."
    )
    optional: StrictBool = Field(
        default=False, description="Allow this rule, and its selector entries, to match nothing."
    )
    schedule: Schedule | None = Field(
        default=None,
        description="Prune gradually during training toward `sparsity` (overrides the spec's `schedule`).",
    )
    owl: Owl | None = Field(
        default=None,
        description="Allocate `sparsity` per block by OWL from the calibration data: `sparsity` is then the "
        "mean over blocks. Needs a method that prunes entries by an amount (wanda, l1_unstructured) and "
        "scope: local.",
    )

    group: GroupOptions | None = Field(
        default=None,
        description="Prune the selected modules' coupled groups (channels, heads or blocks) rather than single "
        "tensors: `select` names the MLPs, attention modules or blocks; every tensor a unit spans is pruned.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.amount is not None and self.sparsity is not None:
            raise ValueError("give `amount` or `sparsity`, not both")
        if self.group is not None:
            if self.select.params != ["weight"]:  # the default, as a saved spec writes it out
                raise ValueError("a `group` rule prunes every tensor its units span: leave out `select.params`")
            if self.owl is not None:
                raise ValueError("`owl` allocates sparsity to single tensors: it does not combine with `group`")
            if self.max_sparsity is not None or self.min_sparsity is not None:
                raise ValueError("a `group` rule bounds each group with `group.min`, not max/min_sparsity")
        if (self.max_sparsity is not None or self.min_sparsity is not None) and self.scope != "global":
            raise ValueError("`max_sparsity` and `min_sparsity` bound a global budget: use them with scope: global")
        if self.max_sparsity is not None and self.min_sparsity is not None and self.min_sparsity > self.max_sparsity:
            raise ValueError("`min_sparsity` must not be larger than `max_sparsity`")
        return self

    def label(self, index: int) -> str:
        """How plans and errors name this rule: ``rules[0] (convs)``."""
        return f"rules[{index}]" + (f" ({self.name})" if self.name else "")


class Calibration(_Model):
    """How data-aware rules are calibrated. Every field is optional; a spec without the block behaves as
    all defaults."""

    sequential: StrictBool | Literal["blocks"] = Field(
        default=True,
        description="true: modules are calibrated in forward order, each on the outputs of the modules before "
        "it, already pruned. `blocks`: block by block, every module of a block on the block's inputs from the "
        "blocks before it, already pruned, and the block itself not yet (the papers' and llm-compressor's way: "
        "two forwards of each block, holding only the blocks' inputs). false: every statistic comes from the "
        "unpruned model, in one pass.",
    )
    blocks: NamePattern | None = Field(
        default=None,
        description="The model's repeated blocks, a name pattern as in `names` (`model.layers.*`, "
        "`re:...`): used for OWL's per-block sparsities, per-block progress, `sequential: blocks` and "
        "`replay_blocks`. Default: "
        "detected (the children of the ModuleList of repeated blocks holding the most parameters).",
    )
    samples: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None,
        description="Use the first `samples` calibration batches (fewer batches is an error at apply). "
        "Default: every batch given.",
    )
    errors: StrictBool = Field(
        default=True,
        description="Report each pruned tensor's relative reconstruction error on the calibration data.",
    )


class Spec(_Model):
    """A whole prunespec document."""

    version: Literal[1] = Field(description="Spec language version; must be 1.")
    seed: Annotated[StrictInt, Field(ge=0, le=2**64 - 1)] | None = Field(
        default=None, description="Seed for random methods, for reproducible masks (0 to 2**64 - 1)."
    )
    rules: list[Rule] = Field(min_length=1, description="Applied in order; later rules compose on earlier ones.")
    schedule: Schedule | None = Field(
        default=None, description="The schedule of every rule that has none of its own (see `prunespec.Scheduler`)."
    )
    finalize: StrictBool = Field(
        default=False, description="Make pruning permanent after apply (torch's prune.remove everywhere)."
    )
    shrink: StrictBool = Field(
        default=False,
        description="After apply, remove the units that `group` rules pruned (prunespec.shrink): the model gets "
        "smaller and faster, its outputs checked against the masked model's.",
    )
    calibration: Calibration = Field(
        default_factory=Calibration,
        description="How rules that need data are calibrated (sequential or not, blocks, samples, errors).",
    )

    _source: SourceMap = PrivateAttr(default_factory=SourceMap)

    @property
    def source(self) -> SourceMap:
        """Where the spec's nodes came from (empty for specs built from a mapping)."""
        return self._source

    @property
    def calibration_given(self) -> bool:
        """Whether the spec has a `calibration` block (without one, every setting is its default)."""
        return "calibration" in self.model_fields_set
