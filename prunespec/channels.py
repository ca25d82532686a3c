"""How channels flow through a traced graph: the analysis behind :mod:`prunespec.discovery`.

Each dim of each value is an :data:`Axis`: the channel spaces it carries, side by side (:class:`Seg`),
or None. Spaces are a union-find; a space is *blocked* (in no group) with a reason as soon as an op
does to its channels something this module does not follow entry by entry: it never guesses.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from prunespec.groups import Group, Member, Role


class Seg(NamedTuple):
    """``units`` channels of ``space`` side by side along a dim, each ``width`` entries wide; with
    ``space`` None the entries are of no channel (a part of a ``torch.cat`` that is not prunable)."""

    space: int | None
    units: int
    width: int


Axis = tuple[Seg, ...] | None  # what one dim of a value carries; None: no channels of any space
Check = Callable[[str, str], None]


@dataclass(frozen=True)
class Shape:
    """A tensor's shape, standing in for the tensor."""

    shape: tuple[int, ...]


def op_name(n: fx.Node) -> str:
    """A node's op as error messages name it."""
    if n.op == "call_module":
        return f"{n.target}.forward"
    if n.op == "call_method":
        return f"Tensor.{n.target}"
    return getattr(n.target, "__name__", str(n.target))


class _Spaces:
    """Union-find over channel spaces, each with its units, members, producers and blocking reasons."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.units: list[int] = []
        self.members: list[list[Member]] = []
        self.producers: list[list[str]] = []
        self.reasons: list[list[str]] = []

    def new(self, units: int) -> int:
        self.parent.append(len(self.parent))
        self.units.append(units)
        self.members.append([])
        self.producers.append([])
        self.reasons.append([])
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        a, b = sorted((self.find(a), self.find(b)))  # the older space stays the root: its producer names it
        if a != b:
            self.parent[b] = a
            self.members[a] += self.members[b]
            self.producers[a] += self.producers[b]
            self.reasons[a] += [r for r in self.reasons[b] if r not in self.reasons[a]]
            self.members[b], self.producers[b], self.reasons[b] = [], [], []

    def block(self, s: int, reason: str) -> None:
        root = self.find(s)
        if reason not in self.reasons[root]:
            self.reasons[root].append(reason)


def _spaces_in(value: Any) -> Iterator[int]:
    """The spaces in a value's axes (a tuple of axes, or containers of them)."""
    if isinstance(value, Seg):
        if value.space is not None:
            yield value.space
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _spaces_in(v)


def _layout(axis: Axis) -> tuple[tuple[int, int, bool], ...]:
    return tuple((n, w, s is None) for s, n, w in axis or ())


def _widen(axis: Axis, factor: int) -> Axis:
    return tuple(Seg(s, n, w * factor) for s, n, w in axis) if axis else None


def _spatial_dims(m: nn.Module) -> int:
    """The spatial dims a pooling, padding or instance norm module works over: its name's ``Nd``."""
    return int(re.findall(r"(\d)d$", type(m).__name__)[0])


_ELEMENTWISE: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.neg,
    operator.pos, operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul,
    torch.div, torch.pow, torch.neg, torch.abs, torch.exp, torch.sqrt, torch.rsqrt, torch.sigmoid, torch.tanh,
    torch.relu, torch.clamp, torch.maximum, torch.minimum, torch.where, F.relu, F.relu6, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.sigmoid, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    "add", "sub", "mul", "div", "pow", "neg", "abs", "exp", "sqrt", "rsqrt", "sigmoid", "tanh", "relu", "clamp",
    "clamp_min", "clamp_max", "maximum", "minimum", "add_", "sub_", "mul_", "div_", "relu_", "sigmoid_", "tanh_",
    "masked_fill",
}  # fmt: skip
_SAME: set[Any] = {"contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type", "type_as", "detach"}
_INFO: set[Any] = {"size", "dim", "numel", "shape", "dtype", "device", "ndim"}
_RESHAPE: set[Any] = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_RESHAPE |= {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
_REDUCE: set[Any] = {"mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin}
_SOFTMAX: set[Any] = {"softmax", "log_softmax", torch.softmax, torch.log_softmax, F.softmax, F.log_softmax}
_POOL: dict[Any, int] = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
    F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3,
}  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.LPPool1d, nn.LPPool2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d,
)  # fmt: skip
_PER_ENTRY = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM_TENSORS: tuple[tuple[str, Role], ...] = (
    ("weight", "masked"), ("bias", "masked"), ("running_mean", "sliced"), ("running_var", "sliced")
)  # fmt: skip
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d)  # fmt: skip


class Analysis:
    """One pass over the traced graph, mapping each node's value to the spaces along its dims."""

    def __init__(self, model: nn.Module, check: Check) -> None:
        self.model = model
        self.check = check
        self.spaces = _Spaces()
        self.axes: dict[fx.Node, Any] = {}
        self.ports: dict[tuple[int, int], Axis] = {}  # (id of a tensor, dim) -> the axis it spans
        self.bound: set[tuple[str, str, int]] = set()
        self.notes: dict[str, list[str]] = {}
        self.order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}

    def run(self, graph: fx.Graph, metas: dict[fx.Node, Any]) -> tuple[tuple[Group, ...], dict[str, str]]:
        """The groups, and module name -> why (some of) its channels are in none; ``metas``: each node's
        result, tensors as their :class:`Shape`."""
        self.metas = metas
        for n in graph.nodes:
            self.check("resolving channels", n.meta.get("prunespec_scope", ""))
            self.node = n
            if n.op == "output":
                for s in _spaces_in([self.axes.get(a) for a in _nodes(n.args)]):
                    self.spaces.block(s, "the channels reach the model's output")
            elif n in metas:
                self.axes[n] = self._checked(self._value(n), metas[n])
        return self._result()

    # --- what the node does to channels -------------------------------------------------------------

    def _value(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            return self._opaque(self.metas[n])  # the network's input channels cannot be removed
        if n.op == "get_attr":
            return self._attr(n)
        x = next((a for a in n.args if isinstance(a, fx.Node) and isinstance(self.metas.get(a), (Shape, list))), None)
        if n.op == "call_module":
            m = self.model.get_submodule(str(n.target))
            out = self._module(n, m, x)
            if x is not None and not isinstance(m, (*_CONVS, nn.Linear, nn.Embedding)):
                self._net(x, out)
            return out
        target, args, kwargs = n.target, [self._arg(a) for a in n.args], {k: self._arg(v) for k, v in n.kwargs.items()}
        if (target is getattr and args[1] in _INFO) or target in _INFO:
            return None
        if target in (torch.cat, torch.concat, torch.concatenate, torch.stack) and isinstance(n.args[0], list | tuple):
            return self._cat(
                n,
                [a for a in n.args[0] if isinstance(a, fx.Node)],
                int(args[1] if len(args) > 1 else kwargs.get("dim", 0)),
            )
        if x is None:
            return self._unknown(n)
        if target is operator.getitem and isinstance(self.metas[x], list):
            return self.axes[x][args[1]]  # a tuple of tensors (split, chunk): pick
        if not isinstance(self.metas[x], Shape):
            return self._unknown(n)
        if target in _ELEMENTWISE:
            tensors = [a for a in [*n.args, *n.kwargs.values()] if isinstance(a, fx.Node)]
            return self._broadcast(tensors, self.metas[n].shape, "an elementwise op")
        out = self._function(n, x, target, args, kwargs)
        self._net(x, out)
        return out

    def _function(self, n: fx.Node, x: fx.Node, target: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        ndim = len(self.axes[x])
        if target is operator.getitem:
            return self._getitem(x, args[1])
        if target is getattr and args[1] in ("T", "mT"):
            order = list(range(ndim))[::-1]
            return self._permute(x, order if args[1] == "T" else [*order[:1:-1], *order[:2]])
        if target in _SAME:
            return self.axes[x]
        if target in _RESHAPE:
            return self._reshape(x, self.metas[n].shape)
        if target in ("permute", torch.permute):
            dims = args[1] if len(args) == 2 and isinstance(args[1], tuple | list) else args[1:]
            return self._permute(x, [d % ndim for d in dims])
        if target in ("transpose", "swapaxes", torch.transpose, torch.swapaxes):
            order = list(range(ndim))
            a, b = args[1] % ndim, args[2] % ndim
            order[a], order[b] = order[b], order[a]
            return self._permute(x, order)
        if target in ("t", torch.t):
            return self._permute(x, list(range(ndim))[::-1])
        if target in ("expand", "expand_as", torch.broadcast_to):
            return self._broadcast([x], self.metas[n].shape, "expand")
        if target in _REDUCE:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            return self._reduce(x, dim, keep, "a reduction")
        if target in _SOFTMAX or target is F.normalize:
            at = 2 if target is F.normalize else 1
            dim = args[at] if len(args) > at else kwargs.get("dim", 1 if target is F.normalize else None)
            if isinstance(dim, int):
                return self._reduce(x, dim, True, "a softmax" if target in _SOFTMAX else "a normalization")
        if target in _POOL and not kwargs.get("return_indices"):
            return self._spatial(x, _POOL[target], "pooling")
        if target is F.interpolate:
            return self._spatial(x, ndim - 2, "resizing")
        if target is F.pad:
            return self._spatial(x, len(args[1] if len(args) > 1 else kwargs["pad"]) // 2, "padding")
        if target in ("split", "chunk", torch.split, torch.chunk):
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            return self._reduce(x, dim, True, "a split", pieces=len(self.metas[n]))
        return self._unknown(n)

    def _module(self, n: fx.Node, m: nn.Module, x: fx.Node | None) -> Any:
        if x is None or len(n.args) + len(n.kwargs) != 1 or not isinstance(self.metas[x], Shape):
            return self._unknown(n)
        name, axes = str(n.target), list(self.axes[x])
        if isinstance(m, nn.Linear) or (isinstance(m, _CONVS) and m.groups == 1):
            k = 0 if isinstance(m, nn.Linear) else len(m.kernel_size)
            c = len(axes) - k - 1
            self._spatial(x, k, "a convolution")
            p = int(bool(getattr(m, "transposed", False)))  # ConvTranspose weights are (in, out, ...)
            self._bind(name, "weight", 1 - p, "scored", axes[c])
            out = self._produce(name, int(m.weight.shape[p]), p)
            return tuple(out if d == c else None if d > c else a for d, a in enumerate(axes))
        if isinstance(m, _CONVS) and m.groups == m.in_channels == m.out_channels and not m.transposed:
            c = len(axes) - len(m.kernel_size) - 1  # depthwise: output channel i is input channel i's
            self._spatial(x, len(m.kernel_size), "a convolution")
            self._bind(name, "weight", 0, "scored", axes[c])
            self._bind(name, "bias", 0, "masked", axes[c])
            dw = self.ports[(id(m.weight), 0)]
            return tuple(dw if d == c else None if d > c else a for d, a in enumerate(axes))
        if isinstance(m, (*_NORMS, nn.GroupNorm)):
            c = len(axes) - _spatial_dims(m) - 1 if isinstance(m, _NORMS[4:]) else 1
            if isinstance(m, nn.GroupNorm) and m.num_groups != m.num_channels:
                return self._blocker(n, axes, list(range(1, len(axes))), f"GroupNorm {name} normalizes across channels")
            why = f"{type(m).__name__} {name} normalizes over these dims"
            normed = self._blocker(n, axes, [d for d in range(len(axes)) if d != c], why)
            for param, role in _NORM_TENSORS:
                self._bind(name, param, 0, role, axes[c])
            return normed
        if isinstance(m, nn.LayerNorm | nn.RMSNorm):
            dims = range(len(axes) - len(m.normalized_shape), len(axes))
            return self._blocker(n, axes, list(dims), f"{type(m).__name__} {name} normalizes over these channels")
        if isinstance(m, nn.PReLU) and m.num_parameters > 1:
            self._bind(name, "weight", 0, "masked", axes[1 if len(axes) > 1 else 0])
            return tuple(axes)
        if isinstance(m, (*_PER_ENTRY, nn.PReLU)):
            return tuple(axes)
        if isinstance(m, _POOL_MODULES) and not getattr(m, "return_indices", False):
            return self._spatial(x, _spatial_dims(m), f"{type(m).__name__} {name}")
        if isinstance(m, nn.Upsample):
            return self._spatial(x, len(axes) - 2, f"Upsample {name}")
        if isinstance(m, nn.Flatten | nn.Unflatten):
            return self._reshape(x, self.metas[n].shape)
        if isinstance(m, nn.Softmax | nn.LogSoftmax | nn.Softmin) and m.dim is not None:
            return self._reduce(x, m.dim, True, f"{type(m).__name__} {name}")
        if isinstance(m, nn.Embedding):
            return (*axes, self._produce(name, m.embedding_dim, 1))
        if isinstance(m, _CONVS):
            return self._unknown(n, f"{type(m).__name__} {name} is grouped (groups={m.groups}): not understood")
        return self._unknown(n, f"{type(m).__name__} {name} is not understood")

    # --- helpers: each returns the node's axes, blocking the spaces it cannot follow ---------------

    def _where(self) -> str:
        scope = self.node.meta.get("prunespec_scope", "")
        return f"`{op_name(self.node)}` in {scope or 'the model'}"

    def _arg(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda nd: self.metas.get(nd))

    def _opaque(self, meta: Any) -> Any:
        if isinstance(meta, Shape):
            return (None,) * len(meta.shape)
        return [self._opaque(m) for m in meta] if isinstance(meta, list) else None

    def _block(self, value: Any, why: str) -> bool:
        hit = False
        for s in _spaces_in(value):
            self.spaces.block(s, why)
            hit = True
        return hit

    def _unknown(self, n: fx.Node, why: str = "") -> Any:
        why = why or f"{self._where()} is not understood"
        if self._block([self.axes.get(a) for a in _nodes((n.args, n.kwargs))], why):
            self._note(str(n.target) if n.op == "call_module" else n.meta.get("prunespec_scope", ""), why)
        return self._opaque(self.metas[n])

    def _note(self, module: str, why: str) -> None:
        if why not in self.notes.setdefault(module, []):
            self.notes[module].append(why)

    def _net(self, x: fx.Node, out: Any) -> None:
        """Block the spaces of ``x`` that an op dropped without saying so: never lose a channel silently."""
        kept = {self.spaces.find(s) for s in _spaces_in(out)}
        lost = [s for s in _spaces_in(self.axes[x]) if self.spaces.find(s) not in kept]
        self._block(lost, f"{self._where()} loses track of these channels")

    def _blocker(self, n: fx.Node, axes: list[Axis], dims: list[int], why: str) -> tuple[Axis, ...]:
        if self._block([axes[d] for d in dims], why) and n.op == "call_module":
            self._note(str(n.target), why)
        return tuple(None if d in dims else a for d, a in enumerate(axes))

    def _checked(self, axes: Any, meta: Any) -> Any:
        """``axes`` where they fit ``meta``'s shape; a mismatch (a case not foreseen) blocks, not guesses."""
        if isinstance(meta, list) and isinstance(axes, list | tuple) and len(axes) == len(meta):
            return [self._checked(a, m) for a, m in zip(axes, meta, strict=False)]
        fits = not isinstance(meta, Shape) and axes is None
        if isinstance(meta, Shape) and isinstance(axes, tuple) and len(axes) == len(meta.shape):
            fits = all(a is None or sum(u * w for _, u, w in a) == s for a, s in zip(axes, meta.shape, strict=False))
        if not fits:
            self._block(axes, f"{self._where()} changes the channels' shape")
        return axes if fits else self._opaque(meta)

    def _attr(self, n: fx.Node) -> Any:
        """A parameter or buffer used directly: each of its dims is a space without producer, so that an
        op adding it to channels makes it a member of their group."""
        module, _, param = str(n.target).rpartition(".")
        tensor = getattr(self.model.get_submodule(module), param, None)
        if not isinstance(tensor, torch.Tensor):
            return self._opaque(self.metas[n])
        role: Role = "masked" if isinstance(tensor, nn.Parameter) else "sliced"
        for d, size in enumerate(tensor.shape):
            if size > 1 and (id(tensor), d) not in self.ports:
                self._bind(module, param, d, role, (Seg(self.spaces.new(size), size, 1),))
        return tuple(self.ports.get((id(tensor), d)) for d in range(tensor.dim()))

    def _bind(self, module: str, param: str, dim: int, role: Role, axis: Axis) -> None:
        """Make dim ``dim`` of ``module.param`` span ``axis``: the tensor joins the spaces there."""
        tensor = getattr(self.model.get_submodule(module), param, None)
        if not isinstance(tensor, torch.Tensor):
            return
        key, size = (id(tensor), dim), tensor.shape[dim]
        if key in self.ports:  # called again: the same columns must read the same channels
            self._join(
                [(size, self.ports[key]), (size, axis)], size, f"{module or 'the model'} is reused on other channels"
            )
        self.ports.setdefault(key, axis)
        if (module, param, dim) in self.bound:
            return
        self.bound.add((module, param, dim))
        offset = 0
        for s, units, width in self.ports[key] or ():
            if s is not None:
                self.spaces.members[self.spaces.find(s)].append(Member(module, param, dim, width, offset, role))
            offset += units * width

    def _produce(self, module: str, units: int, dim: int) -> Axis:
        """The channels a Conv/Linear/Embedding writes: one space per module, however often it is called."""
        key = (id(self.model.get_submodule(module).weight), dim)
        if key not in self.ports:
            self.ports[key] = (Seg(self.spaces.new(units), units, 1),)
        axis = self.ports[key]  # a weight tied to another module's: their outputs are the same channels
        if (module, "weight", dim) not in self.bound:
            for s in _spaces_in(axis):
                self.spaces.producers[self.spaces.find(s)].append(module)
        self._bind(module, "weight", dim, "scored", axis)
        self._bind(module, "bias", 0, "masked", axis)
        return axis

    def _join(self, parts: list[tuple[int, Axis]], size: int, why: str) -> Axis:
        """One dim of values combined entry by entry (broadcast to ``size``): their spaces become one."""
        for s, a in parts:
            if s != size:  # one channel broadcast over many cannot be removed alone
                self._block(a, f"{why}: a single channel is broadcast")
        full = [a for s, a in parts if s == size]
        carrying = [a for a in full if a is not None]
        if not carrying:
            return None
        if (len(carrying) < len(full) and size > 1) or len({_layout(a) for a in carrying}) > 1:
            self._block(carrying, f"{why}: combined with entries that are not these channels")
            return None
        for a in carrying[1:]:
            for first, other in zip(carrying[0], a, strict=False):
                if first.space is not None and other.space is not None:
                    self.spaces.union(first.space, other.space)
        return carrying[0]

    def _broadcast(self, nodes: list[fx.Node], shape: tuple[int, ...], what: str) -> tuple[Axis, ...]:
        out: list[Axis] = []
        for d in range(len(shape)):
            back = len(shape) - d
            parts = [
                (meta.shape[-back], self.axes[nd][-back])
                for nd in nodes
                if isinstance(meta := self.metas.get(nd), Shape) and len(meta.shape) >= back
            ]
            out.append(self._join(parts, shape[d], f"{self._where()} ({what})"))
        return tuple(out)

    def _permute(self, x: fx.Node, order: list[int]) -> tuple[Axis, ...]:
        return tuple(self.axes[x][d] for d in order)

    def _spatial(self, x: fx.Node, k: int, what: str) -> tuple[Axis, ...]:
        axes = list(self.axes[x])
        dims = list(range(len(axes) - k, len(axes)))
        return self._blocker(self.node, axes, dims, f"{self._where()} ({what}) works across these channels")

    def _reduce(self, x: fx.Node, dim: Any, keep: bool, what: str, pieces: int = 0) -> Any:
        axes = list(self.axes[x])
        dims = list(range(len(axes))) if dim is None else [dim] if isinstance(dim, int) else list(dim)
        dims = [d % len(axes) for d in dims]
        out = self._blocker(self.node, axes, dims, f"{self._where()} ({what}) works across these channels")
        if pieces:
            return [out] * pieces
        return out if keep else tuple(a for d, a in enumerate(out) if d not in dims)

    def _getitem(self, x: fx.Node, index: Any) -> Any:
        shape, axes = self.metas[x].shape, self.axes[x]
        items = index if isinstance(index, tuple) else (index,)
        if not all(i is None or i is Ellipsis or isinstance(i, int | slice) for i in items):
            return self._unknown(self.node)
        out: list[Axis] = []
        d = 0
        for item in items:
            if item is Ellipsis:
                k = len(axes) - sum(i is not None and i is not Ellipsis for i in items)
                out += axes[d : d + k]
                d += k
            elif item is None:
                out.append(None)
            else:
                whole = isinstance(item, slice) and item.indices(shape[d]) == (0, shape[d], 1)
                if not whole:
                    self._block(axes[d], f"{self._where()} (indexing) picks some of these channels")
                if isinstance(item, slice):
                    out.append(axes[d] if whole else None)
                d += 1
        return (*out, *axes[d:])

    def _reshape(self, x: fx.Node, shape: tuple[int, ...]) -> tuple[Axis, ...]:
        """A view or reshape: channels follow a dim kept or merged as the outermost, or split off the
        innermost entries of each channel; any other reshape mixes them."""
        old, axes = self.metas[x].shape, self.axes[x]
        out: list[Axis] = [None] * len(shape)
        why = f"{self._where()} reshapes {old} to {shape}, mixing these channels"
        if old != shape:
            self._block([a for a, size in zip(axes, old, strict=False) if size == 1], why)
        src = [d for d, size in enumerate(old) if size > 1]
        dst = [d for d, size in enumerate(shape) if size > 1]
        i = j = 0
        while i < len(src) and j < len(dst):  # pair up runs of dims with equal products
            ins, outs = [src[i]], [dst[j]]
            while (a := math.prod(old[d] for d in ins)) != (b := math.prod(shape[d] for d in outs)):
                if a < b:
                    ins.append(src[i + len(ins)])
                else:
                    outs.append(dst[j + len(outs)])
            i, j = i + len(ins), j + len(outs)
            carrying = [d for d in ins if axes[d] is not None]
            axis = axes[carrying[0]] if carrying else None
            inner = math.prod(shape[d] for d in outs[1:])
            if axis is None:
                continue
            if len(outs) == 1 and carrying == ins[:1]:  # kept, or merged in as the outermost dim
                out[outs[0]] = _widen(axis, math.prod(old[d] for d in ins[1:]))
            elif len(ins) == 1 and all(w % inner == 0 for _, _, w in axis):  # splits each channel's entries
                out[outs[0]] = tuple(Seg(s, u, w // inner) for s, u, w in axis)
            else:
                self._block([axes[d] for d in carrying], why)
        return tuple(out)

    def _cat(self, n: fx.Node, parts: list[fx.Node], dim: int) -> tuple[Axis, ...]:
        shape, stack = self.metas[n].shape, n.target is torch.stack
        dim %= len(shape)
        out: list[Axis] = []
        for d in range(len(shape) - int(stack)):
            if d == dim and not stack:  # side by side: each part's channels at its offset
                segs = [seg for p in parts for seg in self.axes[p][d] or (Seg(None, self.metas[p].shape[d], 1),)]
                out.append(tuple(segs) if any(s.space is not None for s in segs) else None)
            else:
                pairs = [(self.metas[p].shape[d], self.axes[p][d]) for p in parts]
                out.append(self._join(pairs, pairs[0][0], self._where()))
        if stack:
            out.insert(dim, None)
        return tuple(out)

    # --- the result ---------------------------------------------------------------------------------

    def _result(self) -> tuple[tuple[Group, ...], dict[str, str]]:
        sp = self.spaces
        groups: list[Group] = []
        unsupported: dict[str, list[str]] = {m: list(w) for m, w in self.notes.items()}
        for s in range(len(sp.parent)):
            if sp.find(s) != s or not sp.producers[s]:
                continue
            members = sorted(set(sp.members[s]), key=self._position)
            if not sp.reasons[s]:
                name = min(sp.producers[s], key=lambda m: self.order.get(m, -1))
                groups.append(Group("channels", name, "traced", sp.units[s], tuple(members)))
                continue
            seen: set[str] = set()
            for m in members:
                if m.module not in seen:
                    seen.add(m.module)
                    unsupported.setdefault(m.module, []).append(f"{m.tensor} dim {m.dim}: {sp.reasons[s][0]}")
        names = sorted(unsupported, key=lambda m: (self.order.get(m, -1), m))
        return tuple(groups), {m: "; ".join(unsupported[m]) for m in names}

    def _position(self, m: Member) -> tuple[int, int, int, int]:
        """Members in module order, then in their module's own order of tensors (weight, bias, buffers)."""
        module = self.model.get_submodule(m.module)
        names = [n for n, _ in module.named_parameters(recurse=False)] + [
            n for n, _ in module.named_buffers(recurse=False)
        ]
        rank = names.index(m.param) if m.param in names else len(names)
        return self.order.get(m.module, -1), rank, m.dim, m.offset


def _nodes(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found
