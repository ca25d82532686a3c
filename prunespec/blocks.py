"""A model's repeated blocks (a transformer's decoder layers): what OWL allocates sparsity to, and the
unit of per-block calibration progress.

Given a name pattern (``calibration.blocks``, the syntax of a rule's ``names``), the blocks are the
modules it matches, less any nested inside another match. Without one they are detected: the children
of the ``nn.ModuleList`` that has at least 2 children of one class and holds the most parameters
(transformers' Llama: ``model.layers.0`` ... ``model.layers.N-1``; GPT-2: ``transformer.h.*``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from torch import nn

from .patterns import compile_name_pattern


def find_blocks(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Qualified names of ``model``'s repeated blocks, in module order; [] when none are found.

    Raises PatternError (a ValueError) for a malformed ``pattern``. The root module is never a block.
    """
    if pattern is not None:
        regex = compile_name_pattern(pattern)
        found: list[str] = []
        for name, _ in model.named_modules():
            # named_modules is pre-order: a match's descendants follow it, so the last match is enough
            if name and regex.fullmatch(name) and not (found and name.startswith(found[-1] + ".")):
                found.append(name)
        return found
    best: tuple[int, list[str]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        classes = Counter(type(child) for child in module)
        if classes.most_common(1)[0][1] < 2:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            prefix = f"{name}." if name else ""
            best = (size, [prefix + key for key in module._modules if module._modules[key] is not None])
    return [] if best is None else best[1]


def block_of(name: str, blocks: Sequence[str]) -> str | None:
    """The block that module ``name`` is, or lies in (``model.layers.0.mlp`` -> ``model.layers.0``);
    None when it lies in none of ``blocks``."""
    for block in blocks:
        if name == block or name.startswith(block + "."):
            return block
    return None
