"""Checkpoint sizes of prunespec's sparse format, the pruned model's forward time, and the extra memory of
``finalize: true``, on GPT-2-shaped models. Nothing is downloaded.

Run it from the repository root with the main venv::

    python benchmarks/checkpoints.py               # GPT-2 124M: sizes at 50% and 90%, forward ratio, memory
    python benchmarks/checkpoints.py --quick       # small models: a smoke test
    python benchmarks/checkpoints.py --no-memory   # without the finalize-memory workers (~1 min less)
    python benchmarks/checkpoints.py --json

What is measured, in one run:

* **Sizes**: ``transformers.GPT2LMHeadModel(GPT2Config())`` (the config's defaults: 124M parameters,
  random init from seed 0, fp32), pruned with one rule, ``l1_unstructured`` at ``sparsity`` 50% and 90%
  on the transformer blocks' Conv1D weights (``select: {types: [Conv1D]}``: 48 tensors, 85M entries;
  the embeddings, norms, biases and the tied ``lm_head`` stay dense). For each sparsity, the bytes on
  disk of: the finalized model's ``torch.save(model.state_dict())`` (dense: the reference); prunespec's
  torch-layout checkpoint ``prunespec.save(model, "x.pt")`` of the pruned model (``weight_orig`` and
  ``weight_mask`` for every pruned tensor); the sparse file of the pruned model
  (``prunespec.save(..., format="sparse")``); and the sparse file of the finalized model. Ratios are
  sparse / dense and sparse / ``.pt``, for the whole file and for the pruned tensors alone (their bytes
  in the sparse file, from its header, over ``numel * 4``); the issue's targets (<= 0.55x at 50%,
  <= 0.15x at 90%) are about what the format can compress, the pruned tensors, since the dense
  embeddings (31% of the parameters) bound the whole file's ratio. Each sparse file is loaded back
  into a model (``prunespec.load``) and checked: masks equal, ``weight_orig * weight_mask`` and every
  other tensor equal (``torch.equal``); the write and load times of both formats are in the JSON.
* **Forward time**: the pruned model (50%, not finalized, eval, ``torch.no_grad()``) against the same
  model before pruning (a deep copy, dense), on one batch of 1 x 32 token ids; after warm-up, the two
  are timed alternately (``time.perf_counter`` around one forward) for ``--rounds`` rounds in this
  process; the ratio is median pruned / median dense (target <= 1.05x: prunespec's hooks reuse the
  masked weight, ``layout.MaskedWeight``).
* **Finalize memory** (skipped with ``--no-memory``): a stack of bf16 MLP blocks (``Linear(d, 4d)``,
  ``Linear(4d, d)``, no bias; d = 2048, 16 blocks: 537M parameters, 1.0 GiB; plain init in bf16), each
  side in a fresh process: ``prunespec.apply(model, spec, finalize=True, snapshot=...)`` (l1_unstructured
  50% on every Linear; each snapshot: ``memory``, ``disk``, ``none``) against torch's
  ``prune.l1_unstructured(m, "weight", amount=0.5)`` + ``prune.remove(m, "weight")`` loop. Peak RSS
  beyond the RSS before (after ``gc.collect()`` and ``malloc_trim``), from the kernel's ``VmHWM`` after
  ``echo 5 > /proc/self/clear_refs`` (as ``engine.py``), over the model's bytes (target <= 0.25x); every
  side must leave the same number of zeros.

Timings move with other processes' load: the table says how busy the other CPUs were.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine  # noqa: E402  (memory, contention and table helpers)

REPO_ROOT = HERE.parent
MIB = 1024 * 1024
SPARSITIES = (0.5, 0.9)
TARGETS = {0.5: 0.55, 0.9: 0.15}
FORWARD_TARGET = 1.05
MEMORY_TARGET = 0.25


def spec(sparsity: float) -> dict[str, Any]:
    rule = {"select": {"types": ["Conv1D"]}, "method": "l1_unstructured", "sparsity": sparsity}
    return {"version": 1, "rules": [rule]}


def gpt2(quick: bool) -> nn.Module:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=64) if quick else GPT2Config()
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


# --- sizes ---------------------------------------------------------------------------------------------------


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Masks equal, ``weight_orig * weight_mask`` equal, every other tensor equal."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    for key, value in sa.items():
        if key.endswith("_orig"):
            mask = key.removesuffix("_orig") + "_mask"
            if not torch.equal(value * sa[mask], sb[key] * sb[mask]):
                return False
        elif not torch.equal(value, sb[key]):
            return False
    return True


def sizes(dense: nn.Module, sparsity: float, folder: Path) -> dict[str, Any]:
    import prunespec
    from prunespec import layout, sparse_file

    model = copy.deepcopy(dense)
    methods = prunespec.load_methods(builtins_only=True)
    prunespec.apply(model, spec(sparsity), methods=methods)
    pruned = [name for name, *_ in layout.pruned_in(model)]
    numel = sum(model.get_buffer(name + "_mask").numel() for name in pruned)
    files = {k: folder / f"{k}-{sparsity}" for k in ("pt", "sparse", "final_sparse", "dense")}
    out: dict[str, Any] = {"sparsity": sparsity, "pruned_tensors": len(pruned), "pruned_entries": numel}
    out["pt_write_s"], _ = timed(lambda: prunespec.save(model, files["pt"], spec=spec(sparsity), methods=methods))
    out["sparse_write_s"], _ = timed(
        lambda: prunespec.save(model, files["sparse"], spec=spec(sparsity), methods=methods, format="sparse")
    )
    contents = sparse_file.contents(files["sparse"])
    out["encodings"] = {e: sum(1 for n in pruned if contents[n]["encoding"] == e) for e in sparse_file.ENCODINGS}
    out["sparse_pruned_bytes"] = sum(contents[n]["bytes"] for n in pruned)
    for kind in ("pt", "sparse"):
        fresh = copy.deepcopy(dense)
        out[f"{kind}_load_s"], _ = timed(lambda: prunespec.load(fresh, files[kind], methods=methods))  # noqa: B023
        out[f"{kind}_equal"] = same_state(model, fresh)
        del fresh
    prunespec.finalize(model)
    torch.save(model.state_dict(), files["dense"])
    prunespec.save(model, files["final_sparse"], methods=methods, format="sparse")
    final = sparse_file.contents(files["final_sparse"])
    out["final_sparse_pruned_bytes"] = sum(final[n]["bytes"] for n in pruned)
    fresh = copy.deepcopy(dense)
    prunespec.load(fresh, files["final_sparse"], methods=methods)
    out["final_sparse_equal"] = same_state(model, fresh)
    for kind, path in files.items():
        out[f"{kind}_bytes"] = path.stat().st_size
        path.unlink()
    return out


# --- forward time --------------------------------------------------------------------------------------------


def forward_ratio(dense: nn.Module, rounds: int) -> dict[str, Any]:
    import prunespec

    model = copy.deepcopy(dense)
    prunespec.apply(model, spec(0.5), methods=prunespec.load_methods(builtins_only=True))
    vocab = dense.config.vocab_size
    tokens = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    with torch.no_grad():
        for _ in range(3):  # warm-up: the first forward of each allocates, and the hooks make their products
            dense(tokens)
            model(tokens)
        for _ in range(rounds):
            for name, m in (("dense", dense), ("pruned", model)):
                start = time.perf_counter()
                m(tokens)
                times[name].append(time.perf_counter() - start)
        same = torch.equal(model(tokens).logits, model(tokens).logits)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "rounds": rounds,
        "dense_s": medians["dense"],
        "pruned_s": medians["pruned"],
        "ratio": medians["pruned"] / medians["dense"],
        "repeatable": same,
    }


# --- finalize memory (workers) --------------------------------------------------------------------------------


# prunespec with each snapshot (how a failure is undone: masks held in memory, old values on disk, none)
MEMORY_CONTENDERS = ("prunespec:memory", "prunespec:disk", "prunespec:none", "torch")


def mlp_stack(quick: bool) -> nn.Module:
    d, blocks = (256, 2) if quick else (2048, 16)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [
            nn.Linear(d, 4 * d, bias=False, dtype=torch.bfloat16),
            nn.Linear(4 * d, d, bias=False, dtype=torch.bfloat16),
        ]
    return nn.Sequential(*layers)


def memory_worker(impl: str, quick: bool) -> dict[str, Any]:
    model = mlp_stack(quick)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if impl.startswith("prunespec"):
        import prunespec

        methods = prunespec.load_methods(builtins_only=True)
        rule = {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.5}
        snapshot = impl.partition(":")[2] or "memory"

        def run() -> None:
            prunespec.apply(model, {"version": 1, "rules": [rule]}, methods=methods, finalize=True, snapshot=snapshot)

    else:
        from torch.nn.utils import prune

        def run() -> None:
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    prune.l1_unstructured(module, "weight", amount=0.5)
                    prune.remove(module, "weight")

    gc.collect()
    engine.malloc_trim()
    before = engine.rss_bytes()
    peak = engine.PeakRSS()
    wall, _ = timed(run)
    top = max(peak.stop(), before)
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {
        "impl": impl,
        "params": sum(p.numel() for p in model.parameters()),
        "model_mib": model_bytes / MIB,
        "extra_peak_mib": (top - before) / MIB,
        "ratio": (top - before) / model_bytes,
        "time_s": wall,
        "zeros": zeros,
        "finalized": not any(hasattr(m, "weight_orig") for m in model.modules()),
        "mem_method": peak.method,
    }


def run_memory(impl: str, quick: bool, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-worker", impl] + (["--quick"] if quick else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    print(f"  finalize memory: {impl} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"impl": impl, "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --- report ----------------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / MIB:,.1f} MiB"


def _x(value: float) -> str:
    return f"{value:.3f}x"


def report(setup: dict[str, Any], results: dict[str, Any]) -> str:
    lines = [
        f"prunespec sparse checkpoints — {setup['model']}; prunespec {setup['revision']}; torch {setup['torch']}, "
        f"{setup['threads']} threads, {setup['cpus']} CPUs, Python {setup['python']}; other processes used "
        f"{setup['load_before']:.0%} of the CPUs just before the run and {setup['load_during']:.0%} during it",
        "",
    ]
    rows = []
    for r in results["sizes"]:
        s = r["sparsity"]
        pruned_dense = r["pruned_entries"] * 4
        for label, kind in (("pruned model", "sparse"), ("finalized model", "final_sparse")):
            rows.append(
                [
                    f"{s:.0%}",
                    label,
                    _mb(r[f"{kind}_bytes"]),
                    _x(r[f"{kind}_bytes"] / r["dense_bytes"]),
                    _x(r[f"{kind}_bytes"] / r["pt_bytes"]),
                    _x(r[f"{kind}_pruned_bytes"] / pruned_dense),
                    f"<= {TARGETS[s]}x: {'yes' if r[f'{kind}_pruned_bytes'] / pruned_dense <= TARGETS[s] else 'NO'}",
                    "yes" if r[f"{kind}_equal"] else "NO",
                ]
            )
    headers = [
        "sparsity",
        "sparse file of",
        "size",
        "/ dense .pt (finalized)",
        "/ prunespec .pt",
        "pruned tensors / dense",
        "target",
        "loads back equal",
    ]
    lines += ["File sizes (fp32):", "", engine.markdown_table(headers, rows), ""]
    refs = [
        [
            f"{r['sparsity']:.0%}",
            _mb(r["dense_bytes"]),
            _mb(r["pt_bytes"]),
            ", ".join(f"{n} {e}" for e, n in r["encodings"].items() if n),
            f"{r['pt_write_s']:.2f} s / {r['sparse_write_s']:.2f} s",
            f"{r['pt_load_s']:.2f} s / {r['sparse_load_s']:.2f} s",
        ]
        for r in results["sizes"]
    ]
    headers = [
        "sparsity",
        "dense .pt",
        "prunespec .pt",
        "pruned tensors' encoding",
        "write .pt / sparse",
        "load .pt / sparse",
    ]
    lines += [engine.markdown_table(headers, refs), ""]
    f = results["forward"]
    verdict = "yes" if f["ratio"] <= FORWARD_TARGET else "NO"
    lines += [
        f"Forward, batch 1 x 32 tokens, eval, no_grad, 50% pruned (not finalized) vs dense, alternating, median of "
        f"{f['rounds']}: pruned {f['pruned_s'] * 1e3:.1f} ms, dense {f['dense_s'] * 1e3:.1f} ms, ratio "
        f"{f['ratio']:.3f}x (target <= {FORWARD_TARGET}x: {verdict})",
    ]
    memory = results.get("memory")
    if memory:
        rows = []
        for m in memory:
            if "error" in m:
                rows.append([m["impl"], "FAILED: " + m["error"].splitlines()[0][:80], "", "", "", ""])
                continue
            rows.append(
                [
                    m["impl"],
                    f"{m['extra_peak_mib']:,.1f} MiB",
                    _x(m["ratio"]),
                    f"{m['time_s']:.2f} s",
                    f"{m['zeros']:,}",
                    "yes" if m["finalized"] else "NO",
                ]
            )
        first = next((m for m in memory if "error" not in m), None)
        desc = (
            f"{first['params']:,} parameters, {first['model_mib']:,.0f} MiB in bf16; {first['mem_method']}"
            if first
            else ""
        )
        headers = ["finalize: true", "extra peak", "/ model bytes", "time", "zeros", "finalized"]
        lines += [
            "",
            f"Extra peak memory of pruning + finalizing (l1 50% on every Linear) — MLP stack, {desc}; "
            f"target <= {MEMORY_TARGET}x:",
            "",
            engine.markdown_table(headers, rows),
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small models: a smoke test")
    parser.add_argument("--rounds", type=int, default=30, help="forward-time rounds (default 30)")
    parser.add_argument("--no-memory", action="store_true", help="skip the finalize-memory workers")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per memory worker")
    parser.add_argument("--json", action="store_true", help="print the setup and results as JSON")
    parser.add_argument("--memory-worker", choices=MEMORY_CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.quick)))
        return 0
    setup = {
        "revision": engine.git_revision(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_before": engine.other_load(),
    }
    busy, start, own = engine.busy_seconds(), time.perf_counter(), time.process_time()
    print("building the model ...", file=sys.stderr, flush=True)
    dense = gpt2(args.quick)
    params = sum(p.numel() for p in dense.parameters())
    setup["model"] = f"GPT-2 ({'quick' if args.quick else 'GPT2Config() defaults'}), {params:,} parameters, random init"
    results: dict[str, Any] = {"sizes": []}
    with tempfile.TemporaryDirectory(prefix="prunespec-ckpt-") as tmp:
        for sparsity in SPARSITIES:
            print(f"sizes at {sparsity:.0%} ...", file=sys.stderr, flush=True)
            results["sizes"].append(sizes(dense, sparsity, Path(tmp)))
    print("forward time ...", file=sys.stderr, flush=True)
    results["forward"] = forward_ratio(dense, args.rounds)
    wall = time.perf_counter() - start
    others = max(0.0, engine.busy_seconds() - busy - (time.process_time() - own))
    setup["load_during"] = others / (wall * (os.cpu_count() or 1))
    del dense
    if not args.no_memory:
        results["memory"] = [run_memory(impl, args.quick, args.timeout) for impl in MEMORY_CONTENDERS]
    if args.json:
        print(json.dumps({"setup": setup, "results": results}, indent=2))
    else:
        print(report(setup, results))
    failed = [r for r in results["sizes"] if not (r["sparse_equal"] and r["final_sparse_equal"] and r["pt_equal"])]
    return 1 if failed or any("error" in m for m in results.get("memory", [])) else 0


if __name__ == "__main__":
    raise SystemExit(main())
