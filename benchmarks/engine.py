"""Benchmark prunespec's planner and mask engine against hand-written ``torch.nn.utils.prune`` loops.

Run it from the repository root::

    python benchmarks/engine.py                 # GPT-2-small-sized model (124M parameters), every case
    python benchmarks/engine.py --params 350M --repeat 3 --cases global_l1_50,local_l1_50
    python benchmarks/engine.py --json          # results as JSON on stdout instead of the table

What is measured
----------------
Each (case, implementation) pair runs in a fresh Python process: this script re-invokes itself with the
hidden ``--worker CASE IMPL`` arguments, the worker builds the model (deterministically, from ``--seed``),
prunes it once and prints one JSON line, and the parent collects the lines. A fresh process per run means
neither implementation inherits warm caches, allocator state or memory high-water marks from the other.

* **Time** is ``time.perf_counter`` around the pruning only: building the model, importing modules and
  checking the result afterwards are excluded. For prunespec it is ``prunespec.plan(model, spec)`` plus
  ``prunespec.apply(model, plan)``, reported together and separately; this includes what any caller of
  ``plan`` pays on first use (loading the method registry, validating the spec). For torch it is the
  hand-written loop, including its own ``named_modules()`` walk. The process's CPU time over the same
  stretch is reported too.
* **Extra peak memory** is the process's peak resident set size while pruning minus its resident set size
  just before pruning. Before pruning the worker runs ``gc.collect()`` and glibc's ``malloc_trim(0)``
  (so memory freed while building the model is not counted as "before"), reads ``VmRSS`` and then resets
  the kernel's high-water mark to the current RSS by writing ``5`` to ``/proc/self/clear_refs`` (Linux
  >= 4.0). After pruning, ``VmHWM`` from ``/proc/self/status`` is the exact peak over the pruning alone,
  tracked by the kernel at page granularity, so even a short-lived temporary is counted. (The
  ``ru_maxrss`` of ``getrusage`` cannot be reset, so it would also include any higher peak reached while
  building the model; it is not used.) Where ``clear_refs`` cannot be written, the worker falls back to
  sampling ``/proc/self/statm`` from a background thread every millisecond, which can miss peaks shorter
  than that; the JSON says which method was used (``mem_method``). The "retained" figure is RSS after
  pruning minus RSS before (masks and masked weights that stay on the model).
* **Counts**: after timing, each worker counts the zeros in every ``weight_mask`` buffer of the model and
  hashes the masks (in module order), and the parent checks that prunespec and torch agree; a mismatch
  is flagged loudly and makes the script exit with status 1. For ``plan_10k``, where nothing is pruned,
  the count is the number of tensors selected. Masks that differ only in which entries tied at the L1
  threshold are pruned are reported as such (see :func:`mask_summary`); masks that differ elsewhere are
  flagged like a count mismatch.
* **Contention**: the parent reads ``/proc/stat`` around each worker and reports how much CPU the other
  processes on the machine used meanwhile; on a shared machine timings move a lot with it. ``--wait-idle``
  waits for the CPUs to go idle before each worker.

Cases
-----
* ``global_l1_50``: one ``scope: global`` L1 rule, 50% of every Linear weight, vs
  ``prune.global_unstructured(..., pruning_method=prune.L1Unstructured, amount=0.5)``.
* ``local_l1_50``: per-tensor L1 50% on every Linear weight vs ``prune.l1_unstructured`` in a loop.
* ``ln_structured_50``: ``ln_structured`` 50%, ``n=2, dim=0`` on every Linear weight vs
  ``prune.ln_structured`` in a loop.
* ``plan_10k``: ``prunespec.plan`` of the local L1 rule on a model of 10,000 tiny Linear modules vs the
  closest hand-written equivalent, the loop's module walk
  ``[(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]``.
* ``apply_10k``: ``plan`` + ``apply`` of the same rule on the same model vs the full hand-written
  ``prune.l1_unstructured`` loop, i.e. the per-module overhead of each.
* ``global_l1_50_loaded``: ``global_l1_50`` while another process keeps one CPU busy (a busy loop the
  parent starts before the worker and kills after it), for both sides: how each degrades on a shared
  machine. Compare its speed-up with ``global_l1_50``'s from the same run.

The model for the first three cases is GPT-2-small-shaped: ``d = 768``, blocks of ``attn.c_attn``
(Linear(d, 3d)), ``attn.c_proj`` (Linear(d, d)), ``mlp.c_fc`` (Linear(d, 4d)), ``mlp.c_proj``
(Linear(4d, d)) and two LayerNorms, plus token and position Embeddings, which are not pruned. About 68.5%
of the requested parameters go to the blocks, as in GPT-2 small (124M: 12 blocks and a 49,684-row token
embedding); ``--no-embedding`` puts all of them in blocks. ``torch.set_num_threads`` is left at torch's
default.

For a profile of one worker, run it directly with ``--profile`` (the cProfile table goes to stderr)::

    python benchmarks/engine.py --worker global_l1_50 prunespec --profile
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

REPO_ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("prunespec", "torch")
D_MODEL = 768
N_POSITIONS = 1024
MANY_BLOCKS = 2_500  # x 4 Linears = 10,000 tiny modules
MANY_WIDTH = 8
MIB = 1024 * 1024


# --- models ------------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = Attention(d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)


class GPT2Shaped(nn.Module):
    """GPT-2's parameter layout (names included) with plain ``nn.Linear`` layers; no forward is needed."""

    def __init__(self, n_blocks: int, vocab: int, d: int = D_MODEL) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d) if vocab else None
        self.wpe = nn.Embedding(N_POSITIONS, d) if vocab else None
        self.h = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(d)


class TinyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)


class ManyModules(nn.Module):
    """10,000 tiny Linear modules (2,500 blocks of 4), to measure per-module overhead."""

    def __init__(self, n_blocks: int = MANY_BLOCKS, width: int = MANY_WIDTH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(width) for _ in range(n_blocks))


def block_params(d: int = D_MODEL) -> int:
    return (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 4 * d


def gpt2_layout(params: int, embedding: bool = True, d: int = D_MODEL) -> tuple[int, int]:
    """(blocks, token-embedding rows) for about ``params`` parameters."""
    per_block = block_params(d)
    if not embedding:
        return max(1, round(params / per_block)), 0
    n_blocks = max(1, round(0.685 * params / per_block))
    rest = params - n_blocks * per_block - N_POSITIONS * d - 2 * d
    return n_blocks, max(0, rest // d)


def build_model(case: str, params: int, seed: int, embedding: bool) -> nn.Module:
    torch.manual_seed(seed)
    if case.endswith("_10k"):
        return ManyModules()
    return GPT2Shaped(*gpt2_layout(params, embedding))


def parse_size(text: str) -> int:
    """``"124M"`` -> 124_000_000; accepts k/M/B (case-insensitive), decimals and plain integers."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (try 10M, 124M, 1.5B)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[match.group(2).lower()]
    value = round(float(match.group(1)) * scale)
    if value <= 0:
        raise argparse.ArgumentTypeError("the parameter count must be positive")
    return value


# --- cases -------------------------------------------------------------------------------------


def _spec(method: str, scope: str = "local", **options: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"select": {"types": ["Linear"]}, "method": method, "amount": 0.5, "scope": scope}
    if options:
        rule["options"] = options
    return {"version": 1, "rules": [rule]}


SPECS: dict[str, dict[str, Any]] = {
    "global_l1_50": _spec("l1_unstructured", scope="global"),
    "local_l1_50": _spec("l1_unstructured"),
    "ln_structured_50": _spec("ln_structured", n=2, dim=0),
    "plan_10k": _spec("l1_unstructured"),
    "apply_10k": _spec("l1_unstructured"),
    "global_l1_50_loaded": _spec("l1_unstructured", scope="global"),
}
CASES = tuple(SPECS)
LOADED = "_loaded"  # the same case while another process keeps one CPU busy (see run_one)


def base_case(case: str) -> str:
    """``global_l1_50_loaded`` -> ``global_l1_50``: what runs; the suffix only says how."""
    return case.removesuffix(LOADED)


PLAN_ONLY = {"plan_10k"}


def linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def torch_prune(case: str, model: nn.Module) -> int | None:
    """The hand-written loop; returns the number of tensors selected for ``plan_10k``."""
    case = base_case(case)
    if case == "global_l1_50":
        targets = [(m, "weight") for _, m in linears(model)]
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.5)
    elif case in ("local_l1_50", "apply_10k"):
        for _, m in linears(model):
            prune.l1_unstructured(m, "weight", amount=0.5)
    elif case == "ln_structured_50":
        for _, m in linears(model):
            prune.ln_structured(m, "weight", amount=0.5, n=2, dim=0)
    elif case == "plan_10k":
        return len(linears(model))
    else:
        raise ValueError(f"unknown case {case!r}")
    return None


# --- memory --------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    """Current resident set size, from /proc/self/statm (pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def malloc_trim() -> None:
    """Give memory glibc holds on free lists back to the OS, so the 'before' RSS is what is in use."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakRSS:
    """Peak RSS over a stretch of code: the kernel's VmHWM after a reset, or 1 ms sampling as a fallback."""

    def __init__(self) -> None:
        self.method = "VmHWM after clear_refs=5" if reset_peak() else "statm sampled every 1 ms"
        self._sampled = rss_bytes()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.method.startswith("statm"):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, rss_bytes())
            time.sleep(0.001)

    def peak(self) -> int:
        """The peak so far (bytes)."""
        if self._thread is None:
            return _status_kib("VmHWM") * 1024
        return max(self._sampled, rss_bytes())

    def stop(self) -> int:
        peak = self.peak()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return peak


# --- worker --------------------------------------------------------------------------------------


L1_CASES = {"global_l1_50", "local_l1_50", "apply_10k", "global_l1_50_loaded"}


def mask_summary(model: nn.Module, case: str) -> dict[str, Any]:
    """Zeros in all ``weight_mask`` buffers, and two digests of the masks in module order.

    ``mask_digest`` hashes the masks as they are. ``tie_digest`` first marks, for the L1 cases, every
    entry whose magnitude equals the threshold (the largest pruned magnitude: per tensor for local rules,
    over the whole group for the global one) as "tied": two implementations that both prune exactly the
    entries below the threshold plus some of the tied ones have equal ``tie_digest`` even when they pick
    different tied entries (prunespec documents that it picks the first ones; torch's ``topk`` does not say).
    """
    pruned: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (module, weight_orig, weight_mask)
    for name, m in linears(model):
        orig, mask = m._parameters.get("weight_orig"), m._buffers.get("weight_mask")
        if orig is not None and mask is not None:
            pruned.append((name, orig.detach(), mask))
    magnitudes = {name: orig.abs() for name, orig, _ in pruned} if case in L1_CASES else {}
    thresholds = {
        name: float(magnitudes[name][mask == 0].max()) if bool((mask == 0).any()) else -1.0
        for name, _, mask in pruned
        if name in magnitudes
    }
    if base_case(case) == "global_l1_50" and thresholds:
        thresholds = dict.fromkeys(thresholds, max(thresholds.values()))
    zeros, ties = 0, 0
    digest, tie_digest = hashlib.blake2b(digest_size=12), hashlib.blake2b(digest_size=12)
    for name, _, mask in pruned:
        zero = mask == 0
        zeros += int(zero.sum())
        header = f"{name}{tuple(zero.shape)}".encode()
        digest.update(header)
        digest.update(zero.numpy().tobytes())
        codes = zero.to(torch.uint8)
        if name in thresholds:
            tied = magnitudes[name] == thresholds[name]
            ties += int(tied.sum())
            codes[tied] = 2
        tie_digest.update(header)
        tie_digest.update(codes.numpy().tobytes())
    return {
        "zeros": zeros,
        "masks": len(pruned),
        "mask_digest": digest.hexdigest(),
        "tie_digest": tie_digest.hexdigest(),
        "entries_at_threshold": ties if case in L1_CASES else None,
    }


@contextlib.contextmanager
def maybe_profile(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(15)


def run_worker(case: str, impl: str, params: int, seed: int, embedding: bool, profile: bool) -> dict[str, Any]:
    if impl == "prunespec":
        sys.path.insert(0, str(REPO_ROOT))  # benchmark the checkout this script lives in
        import prunespec

        plan_fn: Callable[..., Any] = prunespec.plan
        apply_fn: Callable[..., Any] = prunespec.apply
    model = build_model(case, params, seed, embedding)
    n_params = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for _, m in linears(model))
    spec = SPECS[case]

    gc.collect()
    malloc_trim()
    before = rss_bytes()
    memory = PeakRSS()
    plan_s = apply_s = plan_peak = None
    selected: int | None = None
    with maybe_profile(profile):
        c0 = time.process_time()
        t0 = time.perf_counter()
        if impl == "prunespec":
            the_plan = plan_fn(model, spec)
            t1 = time.perf_counter()
            plan_peak = memory.peak()
            if case in PLAN_ONLY:
                selected = len(the_plan.steps)
            else:
                apply_fn(model, the_plan)
            t2 = time.perf_counter()
            plan_s, apply_s = t1 - t0, (None if case in PLAN_ONLY else t2 - t1)
        else:
            selected = torch_prune(case, model)
            t2 = time.perf_counter()
    cpu_s = time.process_time() - c0
    peak = memory.stop()
    after = rss_bytes()

    masks = mask_summary(model, case)
    return {
        "case": case,
        "impl": impl,
        "time_s": t2 - t0,
        "cpu_s": cpu_s,
        "plan_s": plan_s,
        "apply_s": apply_s,
        "rss_before_mib": before / MIB,
        "peak_extra_mib": (peak - before) / MIB,
        "plan_peak_extra_mib": None if plan_peak is None else (plan_peak - before) / MIB,
        "retained_mib": (after - before) / MIB,
        "count": selected if case in PLAN_ONLY else masks["zeros"],
        "count_kind": "tensors selected" if case in PLAN_ONLY else "mask zeros",
        **masks,
        "model_params": n_params,
        "linear_weight_params": n_linear,
        "mem_method": memory.method,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# --- parent --------------------------------------------------------------------------------------


def busy_seconds() -> float:
    """CPU time spent by the whole machine so far (all CPUs, all processes), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def other_load(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPUs busy over ``seconds`` (this script sleeps meanwhile: it is others)."""
    before, start = busy_seconds(), time.perf_counter()
    time.sleep(seconds)
    return (busy_seconds() - before) / ((time.perf_counter() - start) * (os.cpu_count() or 1))


def add_wait_idle(parser: argparse.ArgumentParser) -> None:
    """The ``--wait-idle SECONDS`` option every benchmark takes (see :func:`wait_idle`)."""
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each worker, wait up to SECONDS for other processes to leave the CPUs idle (default: no wait)",
    )


def wait_idle(limit: float) -> None:
    """Wait, up to ``limit`` seconds, until other processes use under 10% of the CPUs."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        if other_load() < 0.10:
            return
    print(f"  (the machine did not go idle within {limit:.0f} s; running anyway)", file=sys.stderr, flush=True)


def run_one(case: str, impl: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, impl, "--params", str(args.params)]
    cmd += ["--seed", str(args.seed)] + (["--no-embedding"] if args.no_embedding else [])
    if args.wait_idle:
        wait_idle(args.wait_idle)
    # a loaded case keeps one CPU busy with another process meanwhile, as a shared machine does
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if case.endswith(LOADED) else None
    try:
        usage, busy, start = resource.getrusage(resource.RUSAGE_CHILDREN), busy_seconds(), time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        wall, busy = time.perf_counter() - start, busy_seconds() - busy
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {case}/{impl} failed (exit {proc.returncode}):\n{proc.stderr.strip()}")
    result: dict[str, Any] = json.loads(lines[-1])
    # CPU the rest of the machine used while the worker ran, as a share of all CPUs: contention
    result["other_load_pct"] = 100 * max(0.0, busy - own) / (wall * (os.cpu_count() or 1))
    return result


def median_of(runs: Sequence[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(case: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"case": case}
    for impl in IMPLS:
        rs = runs[impl]
        out[impl] = {
            key: median_of(rs, key)
            for key in (
                "time_s",
                "cpu_s",
                "plan_s",
                "apply_s",
                "peak_extra_mib",
                "plan_peak_extra_mib",
                "retained_mib",
                "other_load_pct",
            )
        }
        out[impl]["counts"] = sorted({r["count"] for r in rs})
        out[impl]["digests"] = sorted({r["mask_digest"] for r in rs})
        out[impl]["tie_digests"] = sorted({r["tie_digest"] for r in rs})
        out[impl]["entries_at_threshold"] = median_of(rs, "entries_at_threshold")
        out[impl]["runs"] = rs
    ps, th = out["prunespec"], out["torch"]
    out["speedup"] = th["time_s"] / ps["time_s"] if ps["time_s"] else None
    out["memory_ratio"] = ps["peak_extra_mib"] / th["peak_extra_mib"] if th["peak_extra_mib"] >= 1 else None
    out["counts_equal"] = len(ps["counts"]) == 1 and ps["counts"] == th["counts"]
    out["masks_equal"] = len(ps["digests"]) == 1 and ps["digests"] == th["digests"]
    out["masks_equal_but_ties"] = len(ps["tie_digests"]) == 1 and ps["tie_digests"] == th["tie_digests"]
    first = runs["prunespec"][0]
    out["count_kind"] = first["count_kind"]
    out["count"] = ps["counts"][0] if out["counts_equal"] else None
    out["model_params"] = first["model_params"]
    out["linear_weight_params"] = first["linear_weight_params"]
    out["mem_method"] = first["mem_method"]
    return out


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _contention(results: Sequence[dict[str, Any]]) -> str:
    loads = [run["other_load_pct"] for r in results for impl in IMPLS for run in r[impl]["runs"]]
    return f"{statistics.median(loads):.0f}% (median over runs; max {max(loads):.0f}%)" if loads else "-"


def mask_verdict(result: dict[str, Any]) -> str:
    """How the two implementations' masks compare (see :func:`mask_summary`)."""
    if result["count_kind"] != "mask zeros":
        return "-"
    if result["masks_equal"]:
        return "identical"
    if result["masks_equal_but_ties"]:
        ties = result["prunespec"]["entries_at_threshold"]
        return f"same but for which of the {ties:,} entries tied at the threshold are pruned"
    return "DIFFERENT"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(lines)


def report(results: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    headers = [
        "case",
        "prunespec time",
        "torch time",
        "speed-up (torch/prunespec)",
        "prunespec extra peak MiB",
        "torch extra peak MiB",
        "memory ratio",
        "counts equal",
    ]
    rows, breakdown = [], []
    for r in results:
        ps, th = r["prunespec"], r["torch"]
        equal = "yes" if r["counts_equal"] else "**NO — MISMATCH**"
        if r["counts_equal"] and mask_verdict(r) == "DIFFERENT":
            equal = "yes, **but masks differ**"
        rows.append(
            [
                r["case"],
                _fmt_time(ps["time_s"]),
                _fmt_time(th["time_s"]),
                _fmt(r["speedup"], ".2f", "x"),
                _fmt(ps["peak_extra_mib"], ".1f"),
                _fmt(th["peak_extra_mib"], ".1f"),
                _fmt(r["memory_ratio"], ".2f", "x"),
                equal,
            ]
        )
        breakdown.append(
            [
                r["case"],
                _fmt_time(ps["plan_s"]),
                _fmt_time(ps["apply_s"]),
                _fmt_time(ps["cpu_s"]),
                _fmt_time(th["cpu_s"]),
                f"{ps['other_load_pct']:.0f}% / {th['other_load_pct']:.0f}%",
                _fmt(ps["plan_peak_extra_mib"], ".1f"),
                _fmt(ps["retained_mib"], ".1f"),
                _fmt(th["retained_mib"], ".1f"),
                f"{r['count']:,} {r['count_kind']}" if r["count"] is not None else "-",
                mask_verdict(r),
            ]
        )
    big = next((r for r in results if not r["case"].endswith("_10k")), None)
    model = (
        f"GPT-2-shaped model: {big['model_params']:,} parameters, {big['linear_weight_params']:,} in Linear weights"
        if big
        else "GPT-2-shaped model: not run"
    )
    parts = [
        f"prunespec vs torch.nn.utils.prune — {model}; --params {args.params_text}, seed {args.seed}, "
        f"median of {args.repeat} run(s), each in a fresh process",
        f"prunespec {args.revision}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"peak memory from {results[0]['mem_method'] if results else '-'}; "
        f"other processes used {args.load_before:.0f}% of the CPUs just before the runs and "
        f"{_contention(results)} during them",
        "",
        markdown_table(headers, rows),
        "",
        "prunespec breakdown and checks:",
        "",
        markdown_table(
            [
                "case",
                "plan",
                "apply",
                "prunespec CPU",
                "torch CPU",
                "others' CPU use",
                "plan extra peak MiB",
                "prunespec retained MiB",
                "torch retained MiB",
                "count (both)",
                "masks",
            ],
            breakdown,
        ),
    ]
    return "\n".join(parts)


def git_revision() -> str:
    """The checkout's commit, and whether prunespec/ has uncommitted changes ("unknown" outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "prunespec"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}" + (" + uncommitted changes in prunespec/" if dirty else "")


def run_parent(args: argparse.Namespace) -> int:
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else list(CASES)
    unknown = [c for c in cases if c not in SPECS]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    args.revision = git_revision()
    args.load_before = 100 * other_load()
    if args.load_before > 10 and not args.wait_idle:
        print(
            f"warning: other processes are using {args.load_before:.0f}% of the CPUs; they compete with the "
            "benchmark and make its timings noisy (see --wait-idle)",
            file=sys.stderr,
            flush=True,
        )
    start = time.perf_counter()
    results, failed = [], []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case}: running {args.repeat}x prunespec + torch ...", file=sys.stderr, flush=True)
        case_start = time.perf_counter()
        runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLS}
        try:
            for rep in range(args.repeat):
                order = IMPLS if rep % 2 == 0 else IMPLS[::-1]  # alternate which goes first
                for impl in order:
                    runs[impl].append(run_one(case, impl, args))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"[{i}/{len(cases)}] {case}: FAILED: {exc}", file=sys.stderr, flush=True)
            failed.append(case)
            continue
        result = summarize(case, runs)
        results.append(result)
        ps, th = result["prunespec"], result["torch"]
        print(
            f"[{i}/{len(cases)}] {case}: prunespec {_fmt_time(ps['time_s'])}, torch {_fmt_time(th['time_s'])} "
            f"(speed-up {_fmt(result['speedup'], '.2f', 'x')}), extra peak {ps['peak_extra_mib']:.0f} vs "
            f"{th['peak_extra_mib']:.0f} MiB, counts {'equal' if result['counts_equal'] else 'MISMATCH'}, "
            f"masks {mask_verdict(result).split(' but ')[0]} "
            f"[{time.perf_counter() - case_start:.0f} s]",
            file=sys.stderr,
            flush=True,
        )
        if not result["counts_equal"]:
            print(
                f"!!! {case}: COUNT MISMATCH: prunespec {ps['counts']} vs torch {th['counts']} "
                f"({result['count_kind']}) !!!",
                file=sys.stderr,
                flush=True,
            )
        elif mask_verdict(result) == "DIFFERENT":
            print(f"!!! {case}: same counts but DIFFERENT MASKS (beyond ties) !!!", file=sys.stderr, flush=True)
    total = time.perf_counter() - start
    print(f"done in {total:.0f} s", file=sys.stderr, flush=True)
    if args.json:
        doc = {
            "params": args.params,
            "seed": args.seed,
            "repeat": args.repeat,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "prunespec_revision": args.revision,
            "other_load_pct_before": args.load_before,
            "total_s": total,
            "failed": failed,
            "results": results,
        }
        print(json.dumps(doc, indent=2))
    elif results:
        print(report(results, args))
    mismatch = any(not r["counts_equal"] or mask_verdict(r) == "DIFFERENT" for r in results)
    return 1 if failed or mismatch else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark prunespec.plan/apply against hand-written torch.nn.utils.prune loops."
    )
    parser.add_argument(
        "--params", type=str, default="124M", help="model size: 10M, 124M (default, GPT-2 small), 350M, 1.5B"
    )
    parser.add_argument("--cases", default=None, help=f"comma-separated cases (default: all): {', '.join(CASES)}")
    parser.add_argument("--repeat", type=int, default=1, help="fresh-process runs per case and side; the median")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model's weights (default 0)")
    parser.add_argument("--no-embedding", action="store_true", help="put every parameter in Linear blocks")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per worker (default 600)")
    add_wait_idle(parser)
    parser.add_argument("--profile", action="store_true", help="(with --worker) cProfile the pruning to stderr")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.params_text = args.params
    try:
        args.params = parse_size(args.params)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.worker:
        case, impl = args.worker
        if case not in SPECS or impl not in IMPLS:
            parser.error(f"--worker takes one of {', '.join(CASES)} and one of {', '.join(IMPLS)}")
        print(json.dumps(run_worker(case, impl, args.params, args.seed, not args.no_embedding, args.profile)))
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
