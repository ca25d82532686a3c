"""Known structures: where the coupled groups of transformer models are, without tracing.

Transformer blocks are few and regular, and tracing them fails on rotary embeddings, caches and
``ModelOutput``s. So each structure here is found by its children's names and types (duck typing) and
says which tensors one unit spans and what else changes when units are removed:

* ``swiglu_mlp``: ``gate_proj``/``up_proj``/``down_proj`` (Llama, Mistral, Qwen): a channel is a row of
  gate and up and a column of down;
* ``mlp``: two Linears or Conv1Ds in a row, ``fc1``/``fc2``, ``c_fc``/``c_proj`` (GPT-2),
  ``dense_h_to_4h``/``dense_4h_to_h``, and BERT's ``intermediate.dense``/``output.dense``;
* ``attention``: separate q/k/v/o projections (``q_proj``... with ``head_dim``; BERT's ``self.query``...
  with ``output.dense``) or GPT-2's fused ``c_attn``; a unit is one KV head with its query heads (one
  head without grouped-query attention);
* ``decoder_blocks``: pre-norm residual blocks (a Llama decoder layer, a GPT-2 block) in one
  ``ModuleList``: a unit is a whole block, whose residual writers (the attention's and the MLP's
  output projections) are its members: with them masked the block passes its input through unchanged.

A structure finds :class:`~prunespec.groups.Group`\\ s in a model and, after shrink has sliced the
members, updates the attributes the modules and the transformers config keep about those widths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .groups import Group, Kind, Member
from .layout import original


def _kind_of(module: nn.Module | None) -> str | None:
    if module is None:
        return None
    name = type(module).__name__
    if isinstance(module, nn.Linear) or name == "Linear":
        return "Linear"
    if name == "Conv1D" and hasattr(module, "nf"):
        return "Conv1D"
    return None


def _child(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        nxt = module._modules.get(part)
        if nxt is None:
            return None
        module = nxt
    return module


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def _out_dim(kind: str) -> int:
    return 1 if kind == "Conv1D" else 0


def _shape(module: nn.Module) -> tuple[int, ...]:
    weight = original(module, "weight")
    return tuple(weight.shape) if weight is not None else ()


def _outputs(module: nn.Module, kind: str) -> int:
    return _shape(module)[_out_dim(kind)]


def producer(prefix: str, path: str, module: nn.Module, *, width: int = 1, offset: int = 0) -> list[Member]:
    """A layer whose outputs are the units: its weight's output dim, and its bias."""
    kind = _kind_of(module)
    assert kind is not None
    name = _join(prefix, path)
    members = [Member(name, "weight", _out_dim(kind), width, offset)]
    if original(module, "bias") is not None:
        members.append(Member(name, "bias", 0, width, offset, role="masked"))
    return members


def consumer(prefix: str, path: str, module: nn.Module, *, width: int = 1) -> list[Member]:
    """A layer whose inputs are the units: its weight's input dim."""
    kind = _kind_of(module)
    assert kind is not None
    return [Member(_join(prefix, path), "weight", 1 - _out_dim(kind), width)]


class Structure:
    """A known structure: finds its group at a module, and updates attributes after shrink."""

    id = ""
    kind: Kind = "channels"

    def find(self, name: str, module: nn.Module) -> Group | None:
        raise NotImplementedError

    def update(self, model: nn.Module, module: nn.Module, group: Group, keep: Sequence[bool]) -> str | None:
        """After shrink sliced the members (and removed blocks): the attributes of the modules and of a
        transformers config that record the width. ``module`` is the one the group was found at.
        Returns what could not be recorded (for the shrink report), if anything."""
        return None


def _layers(module: nn.Module, names: Sequence[str]) -> list[nn.Module] | None:
    found = [_child(module, n) for n in names]
    if any(_kind_of(f) is None for f in found):
        return None
    return [f for f in found if f is not None]


class SwigluMlp(Structure):
    id = "swiglu_mlp"

    def find(self, name: str, module: nn.Module) -> Group | None:
        layers = _layers(module, ("gate_proj", "up_proj", "down_proj"))
        if layers is None:
            return None
        gate, up, down = layers
        members = producer(name, "gate_proj", gate) + producer(name, "up_proj", up) + consumer(name, "down_proj", down)
        return Group("channels", name, self.id, _outputs(gate, "Linear"), tuple(members))

    def update(self, model: nn.Module, module: nn.Module, group: Group, keep: Sequence[bool]) -> str | None:
        kept = sum(keep)
        if isinstance(getattr(module, "intermediate_size", None), int):
            setattr(module, "intermediate_size", kept)  # noqa: B010 (a Module's setattr is typed for tensors)
        return _config_width(model, group, "intermediate_size", kept)


_MLP_PAIRS = (
    ("fc1", "fc2"),
    ("c_fc", "c_proj"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("intermediate.dense", "output.dense"),
)


class Mlp(Structure):
    id = "mlp"

    def find(self, name: str, module: nn.Module) -> Group | None:
        for first, second in _MLP_PAIRS:
            layers = _layers(module, (first, second))
            if layers is None:
                continue
            up, down = layers
            up_kind, down_kind = _kind_of(up), _kind_of(down)
            assert up_kind is not None and down_kind is not None
            size = _outputs(up, up_kind)
            if _shape(down)[1 - _out_dim(down_kind)] != size:
                continue
            members = producer(name, first, up) + consumer(name, second, down)
            return Group("channels", name, self.id, size, tuple(members))
        return None

    def update(self, model: nn.Module, module: nn.Module, group: Group, keep: Sequence[bool]) -> str | None:
        kept = sum(keep)
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "model_type", None) == "gpt2":
            return _config_width(model, group, "n_inner", kept)
        return _config_width(model, group, "intermediate_size", kept)


class Attention(Structure):
    """Heads. A unit is one KV head and the query heads that share it (one head without GQA)."""

    id = "attention"
    kind: Kind = "heads"

    def find(self, name: str, module: nn.Module) -> Group | None:
        for q, k, v, o, dim_attr in (
            ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"),
            ("self.query", "self.key", "self.value", "output.dense", "self.attention_head_size"),
            ("q", "k", "v", "out", "head_dim"),
        ):
            layers = _layers(module, (q, k, v, o))
            head_dim = _attribute(module, dim_attr)
            if layers is None or not isinstance(head_dim, int) or head_dim <= 0:
                continue
            qm, km, vm, om = layers
            q_out, kv_out = _outputs(qm, "Linear"), _outputs(km, "Linear")
            if q_out % head_dim or kv_out % head_dim or _outputs(vm, "Linear") != kv_out:
                return None
            kv_heads = kv_out // head_dim
            if (q_out // head_dim) % kv_heads or _shape(om)[1] != q_out:
                return None
            per_unit = q_out // kv_heads  # a KV head's query heads, as entries
            members = (
                producer(name, q, qm, width=per_unit)
                + producer(name, k, km, width=head_dim)
                + producer(name, v, vm, width=head_dim)
                + consumer(name, o, om, width=per_unit)
            )
            return Group("heads", name, self.id, kv_heads, tuple(members))
        fused = _child(module, "c_attn")
        proj = _child(module, "c_proj")
        heads = getattr(module, "num_heads", None)
        split = getattr(module, "split_size", None)
        if _kind_of(fused) != "Conv1D" or _kind_of(proj) != "Conv1D" or not isinstance(heads, int) or heads <= 0:
            return None
        assert fused is not None and proj is not None
        if not isinstance(split, int) or split % heads or _outputs(fused, "Conv1D") != 3 * split:
            return None
        if getattr(module, "is_cross_attention", False):
            return None
        head_dim = split // heads
        fused_members: list[Member] = []
        for part in range(3):  # q, k and v sit side by side in c_attn's outputs
            fused_members += producer(name, "c_attn", fused, width=head_dim, offset=part * split)
        fused_members += consumer(name, "c_proj", proj, width=head_dim)
        return Group("heads", name, self.id, heads, tuple(fused_members))

    def update(self, model: nn.Module, module: nn.Module, group: Group, keep: Sequence[bool]) -> str | None:
        kept = sum(keep)
        layer: Any = module
        config: Any = getattr(model, "config", None)
        derived = (
            "config.num_attention_heads left as it was: this config derives the head size from hidden_size / "
            "num_attention_heads, so from_pretrained cannot rebuild fewer heads"
        )
        if hasattr(layer, "split_size"):  # GPT-2
            head_dim = layer.split_size // layer.num_heads
            layer.num_heads = kept
            layer.split_size = kept * head_dim
            return None if config is None else derived
        inner: Any = _child(module, "self")
        if inner is not None and hasattr(inner, "num_attention_heads"):  # BERT
            inner.num_attention_heads = kept
            inner.all_head_size = kept * inner.attention_head_size
            return None if config is None else derived
        query = _child(module, "q")
        head_dim = getattr(layer, "head_dim", None)
        if query is not None and isinstance(head_dim, int) and head_dim > 0:  # a hand-written attention
            for count in ("heads", "num_heads"):
                if isinstance(getattr(layer, count, None), int):
                    setattr(layer, count, _outputs(query, "Linear") // head_dim)
            return None
        heads = getattr(config, "num_attention_heads", None)
        kv = getattr(config, "num_key_value_heads", None) or heads
        hidden = getattr(config, "hidden_size", None)
        if not (isinstance(heads, int) and isinstance(kv, int) and kv and hasattr(config, "head_dim")):
            return None if config is None else derived
        new_heads = kept * (heads // kv)
        if isinstance(hidden, int) and hidden % max(new_heads, 1):
            return (
                f"config.num_attention_heads left at {heads}: transformers requires hidden_size ({hidden}) to be a "
                f"multiple of it, and {new_heads} is not, so from_pretrained cannot rebuild this model"
            )
        note = _config_width(model, group, "num_key_value_heads", kept)
        if note is None:
            config.num_attention_heads = new_heads
            config.head_dim = getattr(module, "head_dim", config.head_dim)  # keep the head size as built
        return note


def _attribute(module: nn.Module, path: str) -> Any:
    *parents, last = path.split(".")
    owner = _child(module, ".".join(parents)) if parents else module
    return None if owner is None else getattr(owner, last, None)


_WRITERS = (("self_attn.o_proj", "mlp.down_proj"), ("attn.c_proj", "mlp.c_proj"))


class DecoderBlocks(Structure):
    """Whole pre-norm residual blocks of one ModuleList."""

    id = "decoder_blocks"
    kind: Kind = "blocks"

    def writers(self, name: str, module: nn.Module) -> list[Member] | None:
        for paths in _WRITERS:
            layers = _layers(module, paths)
            if layers is None:
                continue
            members = []
            for path, layer in zip(paths, layers, strict=True):
                members += [Member(_join(name, path), "weight")]
                if original(layer, "bias") is not None:
                    members.append(Member(_join(name, path), "bias", role="masked"))
            return members
        return None

    def find(self, name: str, module: nn.Module) -> Group | None:
        return None  # blocks are a group of many modules: see :func:`block_group`

    def update(self, model: nn.Module, module: nn.Module, group: Group, keep: Sequence[bool]) -> str | None:
        blocks = module
        assert isinstance(blocks, nn.ModuleList)
        for index, block in enumerate(blocks):  # caches are indexed by layer: number the blocks left again
            for sub in block.modules():
                if isinstance(getattr(sub, "layer_idx", None), int):
                    setattr(sub, "layer_idx", index)  # noqa: B010
        config = getattr(model, "config", None)
        if config is None:
            return None
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == len(keep):
            config.layer_types = [t for t, k in zip(types, keep, strict=True) if k]
        return _config_width(model, group, "num_hidden_layers", len(blocks), uniform=False)


class Traced(Structure):
    """Channel groups found by tracing (:mod:`prunespec.discovery`): nothing to update beyond the
    layers' own width attributes."""

    id = "traced"

    def find(self, name: str, module: nn.Module) -> Group | None:
        return None  # found from example inputs, never by a module's children


STRUCTURES: tuple[Structure, ...] = (SwigluMlp(), Mlp(), Attention(), DecoderBlocks(), Traced())
BY_ID = {s.id: s for s in STRUCTURES}


def find(kind: Kind, name: str, module: nn.Module) -> Group | None:
    """The group of ``kind`` that a known structure has at ``module`` (named ``name``), or None."""
    for structure in STRUCTURES:
        if structure.kind == kind:
            group = structure.find(name, module)
            if group is not None:
                return group
    return None


def block_group(model: nn.Module, names: Sequence[str]) -> Group | str:
    """The ``blocks`` group of the blocks named ``names``, or why they are not one: they must be
    children of one ModuleList, each a known pre-norm residual block."""
    modules = dict(model.named_modules())
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) != 1:
        return "blocks to remove must be children of one ModuleList; these lie in " + ", ".join(sorted(parents))
    parent = parents.pop()
    missing = [n for n in names if n not in modules]
    if missing:
        return f"the model has no module {missing[0]}"
    if not isinstance(modules.get(parent), nn.ModuleList):
        return f"{parent or 'the model'} is not a ModuleList: only children of one can be removed"
    members: list[Member] = []
    structure = DecoderBlocks()
    for unit, name in enumerate(names):
        writers = structure.writers(name, modules[name])
        if writers is None:
            kind = type(modules[name]).__name__
            return (
                f"{name} ({kind}) is not a known pre-norm residual block (a decoder layer with self_attn.o_proj "
                "and mlp.down_proj, or attn.c_proj and mlp.c_proj)"
            )
        members += [Member(m.module, m.param, role=m.role, block=unit) for m in writers]
    return Group("blocks", parent, structure.id, len(names), tuple(members), tuple(names))


def _config_width(model: nn.Module, group: Group, field: str, kept: int, *, uniform: bool = True) -> str | None:
    """Set a transformers config field after shrink, when (for ``uniform``) every group of the structure
    in the model now has ``kept`` units; else say why it was left (None: set, or there is no config)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, field):
        return None
    if uniform:
        structure = BY_ID[group.structure]
        widths = set()
        for name, module in model.named_modules():
            found = structure.find(name, module)
            if found is not None:
                widths.add(found.size)
        if widths != {kept}:
            return (
                f"config.{field} left at {getattr(config, field)}: the {group.structure} groups now have different "
                f"widths ({', '.join(map(str, sorted(widths)))}), so from_pretrained cannot rebuild this model"
            )
    setattr(config, field, kept)
    return None
