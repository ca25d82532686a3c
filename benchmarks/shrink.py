"""CPU latency of dense models against the same models shrunk (pruned units physically removed), one table.

Run it from the repository root with the main venv (torch-pruning runs in its own venv, see below)::

    python benchmarks/shrink.py                          # all cases, 2-3 minutes on 2 idle cores
    python benchmarks/shrink.py --quick                  # tiny sizes: a smoke test (~45 s)
    python benchmarks/shrink.py --cases resnet50 --repeats 50 --threads 1
    python benchmarks/shrink.py --wait-idle 120 --json   # on a shared machine: wait for idle CPUs per worker

Cases and contenders; each (case, contender) is one worker process, started by this script re-invoking
itself with ``--worker``, that builds the dense model, prunes and shrinks a copy, times both and prints
one JSON line:

* ``resnet50``: ``resnet50_shaped()`` (torchvision-resnet50-shaped, from ``examples/zoo.py``), random
  init (seed 0), 224x224, batch 1 and batch 8.

  - ``prunespec``: one rule ``{select: {types: [Conv2d]}, method: l1_unstructured, amount: 0.5,
    group: {unit: channels}}``, ``prunespec.apply(model, spec, data=[example])`` (the channel groups are
    traced from the example) then ``prunespec.shrink(model, inputs=example)``.
  - ``torch-pruning``: ``tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
    pruning_ratio=0.5, ignored_layers=[model.fc])`` then ``pruner.step()``, in the peer venv's interpreter
    (``$PRUNESPEC_TP_PYTHON``, by default ``../peers/tp/bin/python`` next to the repository). That venv
    has neither prunespec nor torchvision: the worker imports the model's source file by path.

* ``llama_mlp``: one ``LlamaMLP`` of a ``LlamaConfig`` (hidden 2048, intermediate 5632: LLaMA-1B-ish;
  random init, nothing downloaded), wrapped as the ``mlp`` child of a module so that ``names: [mlp]``
  selects it; the MLP block alone, on ``1 x 1`` (decode) and ``1 x 128`` (prefill) hidden states.

  - ``prunespec``: ``{select: {names: [mlp]}, method: l1_unstructured, amount: 0.5, group: {unit: channels,
    round_to: 8}}``, ``apply`` then ``shrink``; the worker checks that gate/up have ``intermediate / 2``
    outputs (down as many inputs) and reports the shapes.
  - ``plain torch at the target shape``: a second ``LlamaMLP`` built directly with intermediate 2816: the
    speed a perfect shrink gives, measured without prunespec.
  - ``torch-pruning``: the same MLP as a plain-torch module (same parameter names and creation order, so
    the same weights from the same seed; checked) in the peer venv, ``MetaPruner`` with
    ``pruning_ratio=0.5``, ``round_to=8``, ``ignored_layers=[down_proj]``.

* ``llama_depth``: a small ``LlamaForCausalLM`` from a ``LlamaConfig`` (hidden 1024, 16 layers,
  intermediate 2816, 16 heads, vocab 32000; random init), end to end: ``1 x 128`` tokens with the logits
  of every position, ``1 x 128`` with the last position's only (``logits_to_keep=1``, as ``generate``'s
  prefill), and ``1 x 1`` (a decode step without a cache).

  - ``prunespec``: ``{select: {names: ["model.layers.*"]}, method: l1_unstructured, amount: 0.25,
    group: {unit: blocks}}``, ``apply`` then ``shrink``: 4 of the 16 blocks removed (checked). (With 8
    layers the untied 32000-row ``lm_head``, as costly as 2.6 blocks, caps what removing 2 blocks can
    give at 1.23x even at the target shape.)
  - ``plain torch at the target shape``: the same config built directly with 12 layers.

How it measures: ``torch.set_num_threads(--threads)`` in every worker (reported), ``model.eval()``,
``torch.inference_mode()``; ``--warmup`` untimed forwards of each model and input, then ``--repeats``
timed forwards (``time.perf_counter``) alternating between the dense and the shrunk model (the order
swapped every round), so load that comes and goes hits both alike; the table shows the medians and
their ratio dense / shrunk, measured in the same process. "MACs ratio" is the ratio of multiply-adds in
the Conv2d and Linear layers (forward hooks), the speed-up that the removed work alone would give.
Both models of a worker start from the same dense weights; the dense weights' SHA-256 is compared
between the workers of a case (the peer's must equal prunespec's). prunespec's shrunk outputs are
compared with the masked model's (before shrink) on every input.

A prunespec without ``shrink``, or whose ``apply``/``shrink`` raises a ``prunespec.PrunespecError`` for
the spec (the CNN path is not finished), gives "prunespec: <error> (not available in this prunespec)"
and the case goes on; a missing peer interpreter is skipped with the install commands. A worker that
fails otherwise (or a shrunk shape, an output or a dense weight hash that is wrong) is listed with its
exact error under "failures" and makes the exit status 1. Targets (printed, not enforced by the exit
status): resnet50 at batch 1 >= 2.4x and >= torch-pruning's ratio; llama_mlp >= 1.9x; llama_depth
>= 1.25x.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine  # noqa: E402  (torch only: importable in the peer venv too)

REPO_ROOT = HERE.parent
TP_ENV = "PRUNESPEC_TP_PYTHON"
TP_INSTALL = (
    "python3 -m venv ../peers/tp && ../peers/tp/bin/pip install torch==2.13.0 && "
    "../peers/tp/bin/pip install torch-pruning==1.6.1 torch==2.13.0"
)
CASES = ("resnet50", "llama_mlp", "llama_depth")
CONTENDERS = {
    "resnet50": ("prunespec", "torch-pruning"),
    "llama_mlp": ("prunespec", "manual", "torch-pruning"),
    "llama_depth": ("prunespec", "manual"),
}
LABELS = {"prunespec": "prunespec", "manual": "plain torch at the target shape", "torch-pruning": "torch-pruning"}
TARGETS = {"resnet50": 2.4, "llama_mlp": 1.9, "llama_depth": 1.25}
NOT_AVAILABLE = "(not available in this prunespec)"


# --- sizes -------------------------------------------------------------------------------------------------


def sizes(quick: bool) -> dict[str, dict[str, Any]]:
    """Model sizes and inputs of each case."""
    if quick:
        return {
            "resnet50": {"width": 16, "layers": [1, 1, 1, 1], "image": 64, "batches": [1, 2]},
            "llama_mlp": {"hidden": 256, "intermediate": 704, "tokens": [1, 16]},
            "llama_depth": {
                "hidden": 128,
                "layers": 4,
                "intermediate": 352,
                "heads": 4,
                "vocab": 1000,
                "tokens": 16,
            },
        }
    return {
        "resnet50": {"width": 64, "layers": [3, 4, 6, 3], "image": 224, "batches": [1, 8]},
        "llama_mlp": {"hidden": 2048, "intermediate": 5632, "tokens": [1, 128]},
        "llama_depth": {"hidden": 1024, "layers": 16, "intermediate": 2816, "heads": 16, "vocab": 32000, "tokens": 128},
    }


def zoo_file() -> Path:
    """``examples/zoo.py``, loaded by path (torch-pruning's venv has no prunespec)."""
    return REPO_ROOT / "examples" / "zoo.py"


# --- models ------------------------------------------------------------------------------------------------


def load_file(path: str) -> Any:
    """Import a Python source file by path (the peer venv cannot import ``examples`` as a package)."""
    spec = importlib.util.spec_from_file_location(f"_shrink_model_{Path(path).stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_resnet(size: dict[str, Any], zoo: str) -> nn.Module:
    torch.manual_seed(0)
    return load_file(zoo).resnet50_shaped(width=size["width"], layers=tuple(size["layers"])).eval()


class PlainMLP(nn.Module):
    """``LlamaMLP`` in plain torch (for the peer venv, which has no transformers): same names, same order."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MLPHolder(nn.Module):
    """A model whose only child is ``mlp``, so that ``names: [mlp]`` selects the MLP block."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def llama_config(hidden: int, intermediate: int, layers: int = 1, heads: int = 16, vocab: int = 32000) -> Any:
    import transformers
    from transformers import LlamaConfig

    transformers.logging.set_verbosity_error()
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def build_mlp(size: dict[str, Any], intermediate: int | None = None, plain: bool = False) -> nn.Module:
    torch.manual_seed(0)
    width = intermediate or size["intermediate"]
    if plain:
        return MLPHolder(PlainMLP(size["hidden"], width)).eval()
    from transformers.models.llama.modeling_llama import LlamaMLP

    return MLPHolder(LlamaMLP(llama_config(size["hidden"], width))).eval()


def build_llama(size: dict[str, Any], layers: int | None = None) -> nn.Module:
    from transformers import LlamaForCausalLM

    config = llama_config(size["hidden"], size["intermediate"], layers or size["layers"], size["heads"], size["vocab"])
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


# --- inputs --------------------------------------------------------------------------------------------------

Forward = Callable[[nn.Module], torch.Tensor]


def case_inputs(case: str, size: dict[str, Any]) -> list[tuple[str, Forward]]:
    """(label, forward) for each timed input of the case; ``forward(model)`` returns the output tensor."""
    generator = torch.Generator().manual_seed(1)
    out: list[tuple[str, Forward]] = []
    if case == "resnet50":
        for b in size["batches"]:
            x = torch.randn(b, 3, size["image"], size["image"], generator=generator)
            out.append((f"batch {b}, {size['image']}x{size['image']}", lambda m, x=x: m(x)))
    elif case == "llama_mlp":
        for t in size["tokens"]:
            x = torch.randn(1, t, size["hidden"], generator=generator)
            label = f"1 x {t} token{'s' if t > 1 else ''} ({'decode' if t == 1 else 'prefill'})"
            out.append((label, lambda m, x=x: m(x)))
    else:
        t = size["tokens"]
        ids = torch.randint(size["vocab"], (1, t), generator=generator)
        one = ids[:, :1].clone()
        out.append((f"1 x {t} tokens, all logits", lambda m: m(input_ids=ids, use_cache=False).logits))
        out.append(
            (
                f"1 x {t} tokens, last logits",
                lambda m: m(input_ids=ids, use_cache=False, logits_to_keep=1).logits,
            )
        )
        out.append(("1 x 1 token, no cache", lambda m: m(input_ids=one, use_cache=False).logits))
    return out


def example_input(case: str, size: dict[str, Any]) -> Any:
    """The example input given to ``prunespec.shrink`` and to torch-pruning's tracer."""
    generator = torch.Generator().manual_seed(2)
    if case == "resnet50":
        return torch.randn(1, 3, size["image"], size["image"], generator=generator)
    if case == "llama_mlp":
        return torch.randn(1, 8, size["hidden"], generator=generator)
    return torch.randint(size["vocab"], (1, 16), generator=generator)


# --- measurement ---------------------------------------------------------------------------------------------


def macs(model: nn.Module, forward: Forward) -> int:
    """Multiply-adds of the model's Conv2d and Linear layers in one ``forward`` (hooks on their outputs)."""
    total = 0

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.inference_mode():
            forward(model)
    finally:
        for h in handles:
            h.remove()
    return total


def latencies(dense: nn.Module, shrunk: nn.Module, forward: Forward, repeats: int, warmup: int) -> dict[str, Any]:
    """Median milliseconds per forward of each model, timed alternately (the order swapped every round)."""
    times: dict[str, list[float]] = {"dense": [], "shrunk": []}
    models = {"dense": dense, "shrunk": shrunk}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                forward(model)
        for i in range(repeats):
            for name in ("dense", "shrunk") if i % 2 == 0 else ("shrunk", "dense"):
                start = time.perf_counter()
                forward(models[name])
                times[name].append((time.perf_counter() - start) * 1000)
    out: dict[str, Any] = {}
    for name, samples in times.items():
        q = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
        out[f"{name}_ms"] = statistics.median(samples)
        out[f"{name}_iqr_ms"] = [q[0], q[2]]
    out["ratio"] = out["dense_ms"] / out["shrunk_ms"]
    return out


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the state dict (names, shapes and bytes), to show that two processes built the same model."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def n_params(model: nn.Module) -> int:
    seen = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in seen.values())


def masks_left(model: nn.Module) -> int:
    return sum(1 for name, _ in model.named_buffers() if name.endswith("_mask"))


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise Failure(f"shrunk output shape {tuple(a.shape)} != masked output shape {tuple(b.shape)}")
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / scale


class Skip(Exception):
    """This contender cannot run here; the message says why."""


class Failure(Exception):
    """The contender ran but its result is wrong (a shape, an output)."""


# --- contenders ------------------------------------------------------------------------------------------------


def spec_for(case: str) -> dict[str, Any]:
    if case == "resnet50":
        rule = {
            "name": "channels",
            "select": {"types": ["Conv2d"]},
            "method": "l1_unstructured",
            "amount": 0.5,
            "group": {"unit": "channels"},
        }
    elif case == "llama_mlp":
        rule = {
            "name": "mlp",
            "select": {"names": ["mlp"]},
            "method": "l1_unstructured",
            "amount": 0.5,
            "group": {"unit": "channels", "round_to": 8},
        }
    else:
        rule = {
            "name": "depth",
            "select": {"names": ["model.layers.*"]},
            "method": "l1_unstructured",
            "amount": 0.25,
            "group": {"unit": "blocks"},
        }
    return {"version": 1, "rules": [rule]}


def build_dense(case: str, size: dict[str, Any], zoo: str, plain: bool = False) -> nn.Module:
    if case == "resnet50":
        return build_resnet(size, zoo)
    if case == "llama_mlp":
        return build_mlp(size, plain=plain)
    return build_llama(size)


def prunespec_shrunk(
    case: str, size: dict[str, Any], model: nn.Module, inputs: Sequence[tuple[str, Forward]], result: dict[str, Any]
) -> nn.Module:
    """``prunespec.apply`` then ``prunespec.shrink`` on ``model`` (in place); checks against the masked model."""
    import prunespec

    if not hasattr(prunespec, "shrink"):
        raise Skip(f"prunespec: AttributeError: module 'prunespec' has no attribute 'shrink' {NOT_AVAILABLE}")
    spec = spec_for(case)
    example = example_input(case, size)
    try:
        start = time.perf_counter()
        prunespec.apply(model, spec, data=[example] if case == "resnet50" else None)
        result["apply_s"] = time.perf_counter() - start
        with torch.inference_mode():
            masked = [forward(model) for _, forward in inputs]
        start = time.perf_counter()
        prunespec.shrink(model, inputs=example)
        result["shrink_s"] = time.perf_counter() - start
    except prunespec.PrunespecError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise Skip(f"prunespec: {type(exc).__name__}: {first} {NOT_AVAILABLE}") from exc
    model.eval()
    with torch.inference_mode():
        diffs = [max_rel_diff(forward(model), want) for (_, forward), want in zip(inputs, masked, strict=True)]
    result["max_rel_diff_vs_masked"] = max(diffs)
    if max(diffs) > 1e-4:
        raise Failure(f"shrunk outputs differ from the masked model's: max relative difference {max(diffs):.3g}")
    result["masks_left"] = masks_left(model)
    return model


def tp_shrunk(case: str, size: dict[str, Any], model: nn.Module, result: dict[str, Any]) -> nn.Module:
    """torch-pruning's ``MetaPruner`` with L1 magnitude importance, one step."""
    try:
        import torch_pruning as tp
    except ImportError as exc:
        raise Skip(f"torch-pruning cannot be imported: {exc}") from exc
    from importlib import metadata

    result["torch_pruning_version"] = metadata.version("torch-pruning")
    result["torch_pruning_module_version"] = getattr(tp, "__version__", "?")
    example = example_input(case, size)
    if case == "resnet50":
        ignored, extra = [model.fc], {}
    elif case == "llama_mlp":
        ignored, extra = [model.mlp.down_proj], {"round_to": 8}
    else:
        raise Skip("torch-pruning removes channels, not blocks")
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=ignored,
        **extra,
    )
    pruner.step()
    result["prune_s"] = time.perf_counter() - start
    return model.eval()


def shapes(case: str, model: nn.Module) -> str:
    """The shapes that show what shrink removed."""
    if case == "llama_mlp":
        mlp = model.mlp
        return ", ".join(f"{n} {tuple(getattr(mlp, n).weight.shape)}" for n in ("gate_proj", "up_proj", "down_proj"))
    if case == "llama_depth":
        return f"{len(model.model.layers)} decoder layers"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    out = [m.out_channels for m in convs]
    return f"{len(convs)} Conv2d, {sum(out):,} output channels in all (first conv {convs[0].out_channels})"


def check_shape(case: str, size: dict[str, Any], dense: nn.Module, model: nn.Module) -> None:
    if case == "llama_mlp":
        half = size["intermediate"] // 2
        mlp = model.mlp
        got = (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features)
        if got != (half, half, half):
            raise Failure(f"expected gate/up out_features and down in_features {half}, got {got}")
    elif case == "llama_depth":
        want = size["layers"] - round(size["layers"] * 0.25)
        got = len(model.model.layers)
        if got != want:
            raise Failure(f"expected {want} decoder layers after removing 25%, got {got}")
    elif n_params(model) >= n_params(dense):
        raise Failure(f"nothing was removed: {n_params(model):,} parameters, as dense")


def run_worker(case: str, contender: str, config: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(config["threads"])
    size = config["size"]
    result: dict[str, Any] = {"case": case, "contender": contender, "threads": torch.get_num_threads()}
    result["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    inputs = case_inputs(case, size)
    dense = build_dense(case, size, config["zoo"], plain=contender == "torch-pruning")
    result["dense_sha256"] = fingerprint(dense)
    result["dense_params"] = n_params(dense)
    result["dense_shapes"] = shapes(case, dense)
    try:
        if contender == "manual":
            if case == "llama_mlp":
                shrunk = build_mlp(size, intermediate=size["intermediate"] // 2)
            else:
                shrunk = build_llama(size, layers=size["layers"] - round(size["layers"] * 0.25))
        else:
            shrunk = copy.deepcopy(dense)
            if contender == "prunespec":
                prunespec_shrunk(case, size, shrunk, inputs, result)
            else:
                tp_shrunk(case, size, shrunk, result)
    except Skip as exc:
        return {**result, "skipped": str(exc)}
    check_shape(case, size, dense, shrunk)
    result["shrunk_params"] = n_params(shrunk)
    result["shrunk_shapes"] = shapes(case, shrunk)
    rows = []
    for label, forward in inputs:
        row = {"input": label, "macs_ratio": macs(dense, forward) / max(1, macs(shrunk, forward))}
        row.update(latencies(dense, shrunk, forward, config["repeats"], config["warmup"]))
        rows.append(row)
    result["rows"] = rows
    if case != "resnet50" and contender != "torch-pruning":
        import transformers

        result["versions"]["transformers"] = transformers.__version__
    return result


# --- parent ------------------------------------------------------------------------------------------------


def tp_python() -> Path:
    return Path(os.environ.get(TP_ENV) or REPO_ROOT.parent / "peers" / "tp" / "bin" / "python")


def run_one(python: str, case: str, contender: str, config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--worker", case, contender, json.dumps(config)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if contender != "torch-pruning":
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    label = f"{case} {LABELS[contender]}"
    print(f"  running {label} ...", file=sys.stderr, flush=True)
    if args.wait_idle:
        engine.wait_idle(args.wait_idle)
    base = {"case": case, "contender": contender}
    usage, busy, start = resource.getrusage(resource.RUSAGE_CHILDREN), engine.busy_seconds(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {args.timeout:.0f} s"}
    wall, busy = time.perf_counter() - start, engine.busy_seconds() - busy
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        result = {**base, "error": f"exit {proc.returncode}:\n{tail}"}
    else:
        result = json.loads(lines[-1])
    result["other_load_pct"] = 100 * max(0.0, busy - own) / (wall * (os.cpu_count() or 1))
    result["worker_wall_s"] = wall
    if "skipped" in result or "error" in result:
        done = result.get("skipped") or "FAILED: " + result["error"].splitlines()[0]
    else:
        done = ", ".join(f"{r['ratio']:.2f}x" for r in result["rows"])
    print(f"  ... {label}: {done} ({wall:.0f} s)", file=sys.stderr, flush=True)
    return result


def check_same_model(results: list[dict[str, Any]]) -> None:
    """Every worker of a case must have started from the same dense weights: a mismatch is an error."""
    for case in CASES:
        mine = [r for r in results if r["case"] == case and "dense_sha256" in r]
        if not mine:
            continue
        ref = mine[0]
        for r in mine[1:]:
            if r["dense_sha256"] != ref["dense_sha256"] and "error" not in r:
                r["error"] = (
                    f"dense weights differ from {LABELS[ref['contender']]}'s: sha256 {r['dense_sha256']} "
                    f"!= {ref['dense_sha256']} ({r['dense_shapes']} vs {ref['dense_shapes']})"
                )


def run_parent(args: argparse.Namespace) -> int:
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    peer = tp_python()
    have_tp = peer.is_file()
    notes: list[str] = []
    if not have_tp and any("torch-pruning" in CONTENDERS[c] for c in chosen):
        notes.append(
            f"torch-pruning: skipped, no interpreter at {peer} (set {TP_ENV}, or install it next to the "
            f"repository: {TP_INSTALL})"
        )
        print(notes[-1], flush=True)
    all_sizes = sizes(args.quick)
    config_base = {
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "zoo": str(zoo_file()),
    }
    results: list[dict[str, Any]] = []
    load_before = engine.other_load(1.0)
    for case in chosen:
        for contender in CONTENDERS[case]:
            if contender == "torch-pruning" and not have_tp:
                continue
            python = str(peer) if contender == "torch-pruning" else sys.executable
            config = {**config_base, "size": all_sizes[case]}
            results.append(run_one(python, case, contender, config, args))
    check_same_model(results)
    if args.json:
        print(json.dumps({"results": results, "notes": notes, "load_before_pct": 100 * load_before}))
    else:
        print(report(results, notes, args, load_before))
    return 1 if any("error" in r for r in results) else 0


# --- report ------------------------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 100 else f"{value:.1f} ms"


def _spread(row: dict[str, Any], name: str) -> str:
    low, high = row[f"{name}_iqr_ms"]
    return f"{100 * (high - low) / row[f'{name}_ms']:.0f}%"


def _verdict(case: str, contender: str, index: int, ratio: float, results: Sequence[dict[str, Any]]) -> str:
    if contender == "torch-pruning":
        return "-"
    target = TARGETS[case]
    if case == "resnet50":
        if index != 0:
            return "-"
        peers = (r for r in results if r["case"] == case and r["contender"] == "torch-pruning" and "rows" in r)
        peer = next(peers, None)
        parts = [f">= {target}x"]
        ok = ratio >= target
        if peer is not None:
            parts.append(f">= torch-pruning's {peer['rows'][0]['ratio']:.2f}x")
            ok = ok and ratio >= peer["rows"][0]["ratio"]
        return f"{' and '.join(parts)}: {'met' if ok else 'NOT met'}"
    return f">= {target}x: {'met' if ratio >= target else 'NOT met'}"


def report(
    results: Sequence[dict[str, Any]], notes: Sequence[str], args: argparse.Namespace, load_before: float
) -> str:
    threads = next((r["threads"] for r in results if "threads" in r), args.threads)
    peer_version = next((r["torch_pruning_version"] for r in results if "torch_pruning_version" in r), None)
    transformers_version = next(
        (r["versions"]["transformers"] for r in results if "transformers" in r.get("versions", {})), None
    )
    out = [
        "Dense vs shrunk CPU latency" + (" (--quick)" if args.quick else ""),
        f"prunespec {engine.git_revision()}; torch {torch.__version__}, {threads} thread(s) "
        f"(torch.set_num_threads), {os.cpu_count()} CPUs, Python {platform.python_version()}"
        + (f", transformers {transformers_version}" if transformers_version else "")
        + (f"; torch-pruning {peer_version} ({tp_python()})" if peer_version else ""),
        f"median of {args.repeats} timed forwards per model and input after {args.warmup} warm-up, "
        f"dense and shrunk alternating in one process; ResNet from {zoo_file().relative_to(REPO_ROOT)}; "
        f"other processes used {100 * load_before:.0f}% of the CPUs just before the runs",
        "",
    ]
    headers = [
        "case",
        "contender",
        "input",
        "dense",
        "shrunk",
        "speed-up",
        "MACs ratio",
        "target",
        "IQR / median (dense, shrunk)",
        "others' CPU",
    ]
    rows = []
    for r in results:
        label = LABELS[r["contender"]]
        load = f"{r['other_load_pct']:.0f}%"
        if "rows" not in r:
            what = "skipped (see below)" if "skipped" in r else "FAILED (see below)"
            rows.append([r["case"], label, what, "-", "-", "-", "-", "-", "-", load])
            continue
        for i, row in enumerate(r["rows"]):
            rows.append(
                [
                    r["case"],
                    label,
                    row["input"],
                    _ms(row["dense_ms"]),
                    _ms(row["shrunk_ms"]),
                    f"{row['ratio']:.2f}x",
                    f"{row['macs_ratio']:.2f}x",
                    _verdict(r["case"], r["contender"], i, row["ratio"], results),
                    f"{_spread(row, 'dense')}, {_spread(row, 'shrunk')}",
                    load,
                ]
            )
    out.append(engine.markdown_table(headers, rows))
    details = []
    for r in results:
        if "rows" not in r:
            continue
        bits = [f"params {r['dense_params']:,} -> {r['shrunk_params']:,}", f"{r['shrunk_shapes']}"]
        if r["contender"] == "prunespec":
            bits.append(
                f"apply {engine._fmt_time(r['apply_s'])}, shrink {engine._fmt_time(r['shrink_s'])}, "
                f"outputs vs masked model: max relative difference {r['max_rel_diff_vs_masked']:.1e}, "
                f"masks left {r['masks_left']}"
            )
        if r["contender"] == "torch-pruning":
            bits.append(f"prune {engine._fmt_time(r['prune_s'])}")
        bits.append(f"dense sha256 {r['dense_sha256']}")
        details.append(f"* {r['case']} {LABELS[r['contender']]}: " + "; ".join(bits))
    if details:
        out += ["", "shapes and checks (dense: " + "; ".join(_dense_shapes(results)) + "):", *details]
    skipped = [r for r in results if "skipped" in r]
    if skipped or notes:
        out += ["", "skipped:", *[f"* {n}" for n in notes]]
        out += [f"* {r['case']} {LABELS[r['contender']]}: {r['skipped']}" for r in skipped]
    failed = [r for r in results if "error" in r]
    if failed:
        out += ["", "failures:"]
        for r in failed:
            out += [f"* {r['case']} {LABELS[r['contender']]}:", r["error"]]
    return "\n".join(out)


def _dense_shapes(results: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, str] = {}
    for r in results:
        if "dense_shapes" in r and r["case"] not in seen:
            seen[r["case"]] = f"{r['case']} {r['dense_shapes']}, {r['dense_params']:,} params"
    return list(seen.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CPU latency of dense vs shrunk models (prunespec, torch-pruning).")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)} (default all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards per model and input (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards first (default 3)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads in every worker (default: CPUs)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    engine.add_wait_idle(parser)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per worker (default 1200)")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "CONTENDER", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        case, contender, config = args.worker
        try:
            result = run_worker(case, contender, json.loads(config))
        except Exception as exc:  # reported by the parent with the exact message
            tail = traceback.format_exc().strip().splitlines()[-9:-1]  # the last line repeats the message
            result = {"case": case, "contender": contender, "error": f"{type(exc).__name__}: {exc}\n" + "\n".join(tail)}
        print(json.dumps(result), flush=True)
        return 0
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    unknown = {c.strip() for c in args.cases.split(",") if c.strip()} - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))} (choose from {', '.join(CASES)})")
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
