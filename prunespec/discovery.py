"""Channel groups of CNN-like and plain-PyTorch models, found from their real computation.

The model is traced with :mod:`torch.fx` (torch.nn modules are leaves), the example inputs are run
through the traced graph once under ``torch.no_grad()`` in eval mode to learn every value's shape, and
each dim of each value is mapped to the *channel spaces* it carries. A Conv or Linear starts a space
(its output channels, the producer) and reads the spaces of its input (the consumer's columns); a
per-channel op keeps them; a residual add or a product joins them; ``torch.cat`` along channels
places them side by side (``Member.offset``); a flatten into a Linear widens each channel to the
columns it became (``Member.width``). Spaces that reach the model's input or output, or that meet an
op whose effect on channels is not known, are *blocked*: they are in no group, and
:attr:`Discovery.unsupported` says why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from prunespec.channels import Analysis, Check, Shape, op_name
from prunespec.groups import Group


class DiscoveryError(Exception):
    """The model could not be traced or resolved in time: ``op`` in ``module`` ("" is the model itself)."""

    def __init__(self, op: str, module: str, message: str) -> None:
        self.op = op
        self.module = module
        self.message = message
        super().__init__(f"{f'module {module!r}' if module else 'the model'}, {op}: {message}")


@dataclass(frozen=True)
class Discovery:
    """What :func:`analyze` found: the channel ``groups`` (kind ``"channels"``, structure ``"traced"``),
    and for every module with channels in no group, why (``unsupported``: module name -> reasons, each
    naming the tensor and dim, and the op or place that keeps those channels)."""

    groups: tuple[Group, ...]
    unsupported: Mapping[str, str]
    outputs: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # each called module's output shape


Inputs = tuple[Any, ...] | Mapping[str, Any] | torch.Tensor


def discover(model: nn.Module, example_inputs: Inputs, *, timeout_s: float = 10.0) -> list[Group]:
    """Every coupled channel group of ``model``, from running ``example_inputs`` (a tensor, positional
    arguments or keyword arguments of ``forward``). Raises :class:`DiscoveryError` if the model cannot
    be traced or resolved within ``timeout_s``. The model is left as it was."""
    return list(analyze(model, example_inputs, timeout_s=timeout_s).groups)


def analyze(model: nn.Module, example_inputs: Inputs, *, timeout_s: float = 10.0) -> Discovery:
    """:func:`discover`, and why the modules in no group are in none."""
    end = time.monotonic() + timeout_s

    def check(op: str, module: str) -> None:
        if time.monotonic() >= end:
            raise DiscoveryError(op, module, f"could not resolve the model in {timeout_s:g} s")

    check("start", "")
    tracer = _Tracer(check)
    try:
        graph = tracer.trace(model)
    except DiscoveryError:
        raise
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError...
        op = "control flow on a traced tensor" if "control flow" in str(e) else type(e).__name__
        if "iterated" in str(e):
            op = "iteration over a traced tensor"
        module = tracer.failed_in or ""
        raise DiscoveryError(op, module, f"cannot be traced ({e}); after `{tracer.last_op}`") from e
    metas = _shapes(fx.GraphModule(model, graph), graph, example_inputs, check)
    groups, unsupported = Analysis(model, check).run(graph, metas)
    outputs: dict[str, tuple[int, ...]] = {}
    for node in graph.nodes:  # the first call of a module, as it ran on the example
        meta = metas.get(node)
        if node.op == "call_module" and isinstance(meta, Shape) and str(node.target) not in outputs:
            outputs[str(node.target)] = meta.shape
    return Discovery(groups, unsupported, outputs)


class _Tracer(fx.Tracer):
    """fx's tracer, noting the module each node is created in, and checking the deadline per node."""

    def __init__(self, check: Check) -> None:
        super().__init__()
        self.check = check
        self.stack = [""]
        self.failed_in: str | None = None
        self.last_op = "the inputs"

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        self.check("tracing", self.stack[-1])
        node = super().create_node(*args, **kwargs)
        node.meta["prunespec_scope"] = self.stack[-1]
        self.last_op = op_name(node)
        return node


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return Shape(tuple(value.shape))
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, tuple | list):
        return [_meta(v) for v in value]
    if isinstance(value, dict):
        return {k: _meta(v) for k, v in value.items()}
    return value


def _shapes(gm: fx.GraphModule, graph: fx.Graph, inputs: Inputs, check: Check) -> dict[fx.Node, Any]:
    """Every node's result, with tensors as their shapes: one run, in eval mode and without grad."""
    names = [n for n in graph.nodes if n.op == "placeholder"]
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, Mapping):
        unknown = set(inputs) - {n.target for n in names}
        if unknown:
            raise DiscoveryError("inputs", "", f"forward takes no argument {sorted(unknown)}")
        args = []
        for n in names:
            if n.target not in inputs and not n.args:
                raise DiscoveryError("inputs", "", f"no example input for argument {n.target!r}")
            args.append(inputs[n.target] if n.target in inputs else n.args[0])
        inputs = tuple(args)
    metas: dict[fx.Node, Any] = {}

    class Run(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            check("running", n.meta.get("prunespec_scope", ""))
            try:
                result = super().run_node(n)
            except DiscoveryError:
                raise
            except Exception as e:
                scope = n.meta.get("prunespec_scope", "")
                raise DiscoveryError(op_name(n), scope, f"the example inputs do not run: {e}") from e
            metas[n] = _meta(result)
            return result

    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            run = Run(gm, garbage_collect_values=True)
            run.extra_traceback = False  # fx would print the whole graph into the message: seconds, and noise
            run.run(*inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return metas
