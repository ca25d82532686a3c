"""Everything prunespec prints for people: aligned tables, plans and sparsity reports.

The data lives in :mod:`prunespec.planner`, :mod:`prunespec.report` and :mod:`prunespec.inventory`; this
module only reads it, so that none of those imports another for the sake of printing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .inventory import Inventory, ModuleRow, StructureRow
    from .planner import OwlRule, Plan
    from .report import Report, TensorStats
    from .shrink import ShrinkReport

MAX_CELL = 40
"""Longest option value shown in a table cell; longer ones are cut with an ellipsis."""


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int] | None = None) -> str:
    """A plain-text table with aligned columns (``right``: indexes of right-aligned columns)."""
    right = right or set()
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def pct(value: float | None) -> str:
    """``0.2037`` -> ``"20.37%"``; ``None`` (not known) -> ``"?"``."""
    return "?" if value is None else f"{100 * value:.2f}%"


def shape(dims: Sequence[int]) -> str:
    """``(6, 1, 3, 3)`` -> ``"6x1x3x3"``."""
    return "x".join(str(d) for d in dims) or "scalar"


def plural(count: int, noun: str) -> str:
    """``1 rule``, ``2 rules``."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def shorten(text: str, limit: int = MAX_CELL) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def options(values: Mapping[str, Any]) -> str:
    """``n=2, dim=0``, each value shortened so that one long option cannot stretch a table."""
    return ", ".join(f"{key}={shorten(str(value))}" for key, value in values.items())


def format_plan(plan: Plan) -> str:
    """The plan as people read it: one line per step, then the predicted totals and the warnings."""
    headers = ["#", "rule", "tensor", "shape", "method", "how much", "scope", "sparsity", "selected by"]
    rows = []
    owl = {o.rule_index: o for o in plan.owl}
    for i, step in enumerate(plan.steps):
        if step.group is not None:
            continue  # the groups table shows these, one line per group rather than per tensor
        how = (
            f"amount {step.amount}"
            if step.amount is not None
            else (f"sparsity {step.sparsity:.4g}" if step.sparsity is not None else "-")
        )
        if step.rule_index in owl:
            how += " (owl)" if owl[step.rule_index].allocated is not None else " (owl: mean)"
        opts = options(step.options)
        approx = "" if step.exact else "~"
        tied = (
            f" (tied: {', '.join(f'{m}.{p}' if m else p for m, p in step.tensor.aliases)})"
            if step.tensor.aliases
            else ""
        )
        rows.append(
            [
                str(i),
                step.rule,
                step.tensor.name + tied,
                shape(step.tensor.shape),
                step.method + (f"({opts})" if opts else ""),
                how,
                step.scope,
                f"{pct(step.before)} -> {approx}{pct(step.after)}",
                step.selected_by,
            ]
        )
    rules, steps, tensors = len(plan.spec.rules), len(plan.steps), len(plan.tensors)
    out = [f"Plan: {plural(rules, 'rule')}, {plural(steps, 'step')} on {plural(tensors, 'tensor')}", ""]
    if rows or not plan.groups:
        out.append(table(headers, rows, right={0}))
    total = sum(numel for numel, _, _ in plan.tensors.values())
    predicted = plan.global_sparsity
    exact = all(exact for _, _, exact in plan.tensors.values())
    if plan.groups:
        grouped = sum(1 for step in plan.steps if step.group is not None)
        out += ([""] if rows else []) + [
            groups_table(plan),
            f"({plural(grouped, 'step')} of group rules, one per tensor a group spans: see --json)",
        ]
    if predicted is None:
        why = (
            "which units go is known once the groups are scored"
            if plan.groups
            else "a method without an amount decides"
        )
        out.append(f"\nPredicted: not known in advance ({why}), {total:,} entries.")
    else:
        mark = "" if exact else "~"
        out.append(
            f"\nPredicted: {mark}{pct(predicted)} of {total:,} entries in the selected tensors"
            + ("" if exact else " (~: estimate; the split depends on the values)")
        )
    if plan.needs_data:
        out.append(
            f"Calibration data: needed by {', '.join(plan.needs_data)} (Python: apply(model, spec, data=batches); "
            "CLI: --data file.py:factory)"
        )
    if plan.uses_data:
        out.append(calibration(plan))
    elif plan.spec.calibration_given:
        out.append("Calibration: the spec's `calibration` block is unused: no rule needs data")
    out += [line for rule in plan.owl for line in owl_lines(rule)]
    if plan.spec.seed is not None:
        out.append(f"Seed: {plan.spec.seed}")
    if plan.spec.finalize:
        out.append("Finalize: pruning is made permanent after apply")
    if plan.spec.shrink:
        out.append("Shrink: the pruned units are removed after apply (outputs checked against the masked model)")
    if plan.warnings:
        out.append("Warnings:")
        out += [f"  - {w}" for w in plan.warnings]
    return "\n".join(out)


def groups_table(plan: Plan) -> str:
    """One line per coupled group: units before and after, the members' entries, and the weights'
    multiply-accumulates per token (known structures) or per example (traced groups)."""
    headers = ["rule", "group", "kind", "structure", "units", "kept", "members", "entries", "MACs"]
    rows = []
    for g in plan.groups:
        kept = "?" if g.kept is None else str(g.kept)
        before = "" if not g.already else f" ({g.already} pruned before)"
        after = "?" if g.entries_after is None else f"{g.entries_after:,}"
        tensors = len({m.tensor for m in g.group.members if m.role != "sliced"})
        macs = "?" if g.macs_after is None else _count(g.macs_after)
        mac_cell = f"{_count(g.macs)} -> {macs} /{g.macs_per}"
        rows.append(
            [
                g.rule,
                g.group.name,
                g.group.kind,
                g.group.structure,
                f"{g.group.size}{before}",
                kept,
                str(tensors),
                f"{g.entries:,} -> {after}",
                mac_cell,
            ]
        )
    return "Groups:\n" + table(headers, rows, right={4, 5, 6, 7, 8})


def _count(n: int) -> str:
    """1234567 -> 1.23M: MAC counts are read for their size."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def format_shrink(report: ShrinkReport) -> str:
    """What shrink removed: one line per group, then the parameters before and after."""
    if not report.groups:
        return "Shrink: nothing to remove (no group has a unit pruned whole in all its tensors)"
    rows = [
        [g.name, g.kind, g.structure, str(g.before), str(g.after), some(list(g.removed)) if g.removed else ""]
        for g in report.groups
    ]
    out = [table(["group", "kind", "structure", "units", "kept", "removed"], rows, right={3, 4})]
    ratio = report.parameters_after / report.parameters_before if report.parameters_before else 1.0
    out.append(
        f"Shrink: {report.parameters_before:,} -> {report.parameters_after:,} parameters ({ratio:.1%}); "
        + (
            "outputs not checked"
            if report.error is None
            else f"outputs equal the masked model's (relative difference {report.error:.2g})"
        )
    )
    out += [f"  note: {note}" for note in report.notes]
    return "\n".join(out)


_HOW = {
    True: "sequential (each module on the outputs of the modules before it, already pruned)",
    "blocks": "block by block (each block's modules on the block's inputs, the blocks before it already pruned)",
    False: "one pass over the unpruned model",
}
_HOW_SHORT = {True: "sequential", "blocks": "block by block", False: "one pass over the unpruned model"}


def calibration(plan: Plan) -> str:
    """The calibration settings of a plan that needs data, on one line."""
    settings = plan.spec.calibration
    how = _HOW[settings.sequential]
    if settings.samples is None:
        samples = "every batch"
    else:
        samples = "the first batch" if settings.samples == 1 else f"the first {settings.samples:,} batches"
    errors = "reported" if settings.errors else "not reported"
    found = f"{settings.blocks!r}" if settings.blocks is not None else "detected"
    blocks = f"{plural(len(plan.blocks), 'block')} ({found}: {some(plan.blocks)})" if plan.blocks else f"none ({found})"
    return f"Calibration: {how}; samples: {samples}; reconstruction errors: {errors}; blocks: {blocks}"


def owl_lines(rule: OwlRule) -> list[str]:
    """How an OWL rule splits its sparsity over the blocks."""
    low, high = rule.bounds
    params = f"M={rule.m:g}, lambda={rule.lam:g}"
    if rule.allocated is None:
        lines = [
            f"OWL {rule.rule}: sparsity {rule.target:g} is the mean over {plural(len(rule.blocks), 'block')}; each "
            f"block's sparsity will be allocated by OWL from the calibration data ({params}), between {pct(low)} "
            f"and {pct(high)}; the predictions above are at {rule.target:g}",
            f"  blocks: {some(rule.blocks)}",
        ]
    else:
        lines = [f"OWL {rule.rule}: sparsity allocated per block by OWL ({params}, mean {rule.target:g}):"]
        width = max(len(b) for b in rule.allocated)
        lines += [f"  {block.ljust(width)}  {pct(s).rjust(7)}" for block, s in rule.allocated.items()]
    if rule.outside:
        lines.append(f"  in no block, at {rule.target:g}: {some(rule.outside)}")
    return lines


def some(names: Sequence[str], n: int = 3) -> str:
    """``a, b, c, ..., z (26)``: the first few names and the last, for long lists."""
    if len(names) <= n + 1:
        return ", ".join(names)
    return f"{', '.join(names[:n])}, ..., {names[-1]}"


def format_report(report: Report) -> str:
    """The report as people read it: the pruned tensors, then every other parameter, then two totals
    (over the pruned tensors, and over all parameters), each labelled with what it counts."""
    show_predicted = any(s.predicted is not None for s in report.entries.values())
    show_error = any(s.error is not None for s in report.entries.values())
    headers = ["tensor", "shape", "numel", "zeros", "sparsity", "pruned"] + (["predicted"] if show_predicted else [])
    headers += ["recon. error"] if show_error else []

    def row(s: TensorStats, pruned: str, predicted: str = "", error: str = "") -> list[str]:
        cells = [s.name, shape(s.shape), f"{s.numel:,}", f"{s.zeros:,}", pct(s.sparsity), pruned]
        return cells + ([predicted] if show_predicted else []) + ([error] if show_error else [])

    def total(label: str, stats: Iterable[TensorStats]) -> list[str]:
        stats = list(stats)
        numel, zeros = sum(s.numel for s in stats), sum(s.zeros for s in stats)
        cells = [label, "", f"{numel:,}", f"{zeros:,}", pct(zeros / numel if numel else 0.0), ""]
        return cells + ([""] if show_predicted else []) + ([""] if show_error else [])

    rows = [
        row(s, "mask" if s.masked else "zeros", ("~" if s.estimated else "") + pct(s.predicted), _error(s.error))
        for s in report.entries.values()
    ]
    rows += [row(s, "mask" if s.masked else "-") for s in report.others.values()]
    rows.append(total(f"total: pruned ({plural(len(report.entries), 'tensor')})", report.entries.values()))
    every = [*report.entries.values(), *report.others.values()]
    rows.append(total(f"total: all parameters ({plural(len(every), 'tensor')})", every))
    right = {2, 3, 4} | ({6} if show_predicted else set()) | ({len(headers) - 1} if show_error else set())
    text = table(headers, rows, right=right)
    if show_error:
        text += (
            "\nrecon. error: ||W X - W' X||^2 / ||W X||^2 of each tensor on its calibration inputs (up to 256 tokens)"
        )
    record = report.calibration
    if record is not None:
        how = _HOW_SHORT[record.sequential]
        text += (
            f"\nCalibration: {record.samples:,} batch{'' if record.samples == 1 else 'es'}, {record.tokens:,} tokens "
            f"counted, {how}; "
            f"data sha256 {record.fingerprint[:16]}"
        )
    if report.shrink is not None:
        text += "\n\n" + format_shrink(report.shrink)
    return text


def _error(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


MAX_SELECTOR = 60
"""Longest selector shown whole in the inventory's tables; longer name lists are cut (``--json`` has them)."""


def format_inventory(inventory: Inventory) -> str:
    """A model's inventory as a spec author reads it: one line per row of alike modules, the tied
    parameters, the known structures with their ``group:`` unit, then the totals."""
    headers = ["pattern", "count", "type", "parameters", "entries", "sparsity", "prunable", "selector"]
    rows = [
        [
            row.pattern or "<root>",
            str(row.count),
            row.type,
            _params_cell(row),
            f"{row.numel:,}",
            pct(row.sparsity),
            "yes" if row.prunable else "no",
            selector(row.selector),
        ]
        for row in inventory.modules
    ]
    out = ["Modules with parameters (names that differ only in integer segments collapsed into `*`):"]
    out.append(table(headers, rows, right={1, 4, 5}))
    if inventory.tied:
        out += ["", "Tied parameters (one tensor, several names; a rule prunes it once and every owner gets the mask):"]
        out += [f"  {' = '.join(t.names)}  ({shape(t.shape)})" for t in inventory.tied]
    if inventory.structures:
        out += ["", "Known structures (select them in a rule with `group: {unit: ...}`):"]
        out.append(structures_table(inventory.structures))
    modules = sum(row.count for row in inventory.modules)
    prunable = sum(row.count for row in inventory.modules if row.prunable)
    out += [
        "",
        f"Total: {plural(modules, 'module')} with parameters in {plural(len(inventory.modules), 'row')}; "
        f"{inventory.parameters:,} parameters (a tied one counted once), {pct(inventory.sparsity)} zero "
        f"({inventory.zeros:,})",
        f"`preset: prunable` selects {plural(prunable, 'module')} ({inventory.prunable_weights:,} weight entries)",
    ]
    return "\n".join(out)


def _params_cell(row: ModuleRow) -> str:
    return ", ".join(f"{p.name} {shape(p.shape)}" + (" (tied)" if p.tied else "") for p in row.params)


def structures_table(rows: Sequence[StructureRow]) -> str:
    """One line per row of alike known structures: the unit, units per group, the tensors a unit spans."""
    headers = ["pattern", "count", "structure", "group unit", "units", "tensors", "selector"]
    cells = []
    for row in rows:
        noun = "channel" if row.unit == "channels" else "block" if row.unit == "blocks" else "head"
        units = plural(row.units, noun)
        if row.unit == "heads" and row.heads != row.units:
            units = f"{plural(row.units, 'KV head')} ({row.heads} query)"
        if row.pruned:
            units += f", {row.pruned} pruned"
        tensors = dict.fromkeys(m.tensor.rpartition(".")[0] or m.tensor for m in row.members)
        cells.append(
            [
                row.pattern or "<root>",
                str(row.count),
                row.structure,
                row.unit,
                units,
                ", ".join(tensors) + (" (each block)" if row.unit == "blocks" else ""),
                selector(row.selector),
            ]
        )
    return table(headers, cells, right={1})


def selector(select: Mapping[str, Sequence[str]]) -> str:
    """``names: ["model.layers.*.mlp"]``, as a spec's flow YAML takes it (JSON quoting is YAML's);
    a long list of names is cut."""
    parts = []
    for key, entries in select.items():
        text = json.dumps(list(entries))
        if len(text) > MAX_SELECTOR and len(entries) > 1:
            text = f"{json.dumps(list(entries[:1]))[:-1]}, ...] ({len(entries)} names: see --json)"
        parts.append(f"{key}: {text}")
    return ", ".join(parts)
