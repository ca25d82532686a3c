"""prunespec's ``wanda``/``sparsegpt`` against llm-compressor's ``WandaPruningModifier``/``SparseGPTModifier``,
on the same model and the same calibration batches, each in its own process, plus plain-torch floors.

Run it from the repository root with the main venv (llm-compressor runs in its own venv, see below)::

    python benchmarks/calibration.py             # all three settings, about 20 minutes on 2 cores
    python benchmarks/calibration.py --quick     # small sizes: a smoke test
    python benchmarks/calibration.py --settings speed --json
    python benchmarks/calibration.py --wait-idle 120   # on a shared machine: wait for idle CPUs per worker

Contenders, each one worker process per (contender, setting), started by this script re-invoking itself
with ``--worker``:

* ``prunespec wanda`` / ``prunespec sparsegpt``: ``prunespec.apply(model, spec, data=batches,
  finalize=True)`` in this interpreter (the main venv), with one rule over the ``nn.Linear`` modules of
  the decoder blocks (``lm.prunespec_spec``: ``sparsity: 0.5``, or ``options: {n: 2, m: 4}`` for 2:4).
  ``finalize=True`` leaves plain weights with zeros, as llm-compressor does. A method this prunespec
  lacks is skipped with a message. Twice: with the default ``snapshot="memory"`` (every mask, and
  sparsegpt's new values, held until the end so that a failure leaves the model as it was) and as
  ``prunespec (snapshot disk)`` (each tensor written at its stop, its old values in a temporary file
  for the same promise), and both again with ``replay_blocks=True`` (``prunespec (replay blocks)``,
  ``prunespec (replay, disk)``: the batches wait at each block's entry holding only its input, and the
  block runs again for each stop inside it; the same masks, the least memory).
* ``llm-compressor wanda`` / ``sparsegpt``: ``llmcompressor.oneshot(model=..., recipe=Modifier(sparsity=0.5,
  mask_structure="0:0" | "2:4", targets=["Linear"], ignore=["re:.*lm_head"]), dataset=DataLoader(batches,
  batch_size=None))`` in the peer venv's interpreter: ``$PRUNESPEC_LLMC_PYTHON``, by default
  ``../peers/llmc/bin/python`` next to the repository. Handing ``oneshot`` a ``DataLoader`` (its API
  allows it) skips its own dataset handling (shuffling, ``LengthAwareSampler`` reordering, truncation or
  padding collators), so it sees exactly the batches prunespec sees, in the same order. Its default
  pipeline is the sequential one (calibrate a decoder layer, prune it, propagate the pruned outputs).

Both load the model from the same ``save_pretrained`` directory (a temporary directory; it also holds the
byte tokenizer, because ``oneshot`` refuses to start without a processor when given data) with
``lm.load_llama``, which copies the weights into the process's memory (``from_pretrained`` maps the
safetensors file, and a weight's pages would otherwise count in the RSS only once the pruning touched them:
up to the whole model charged as "beyond the model"), and the batches from the same ``torch.save`` file
(``torch.load(weights_only=True)``). Each worker prints one JSON line: the wall and CPU time of the pruning
call alone (``time.perf_counter``), the RSS after loading the model and the data, the peak RSS during the
pruning call (the kernel's ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, as ``engine.py``
does), so "peak beyond the model" is peak minus that RSS. ``getrusage``'s ``ru_maxrss`` is in the JSON too
but not in the table: it cannot be reset, and a child starts with its parent's high-water mark at fork
(every worker reported this script's own ~780 MiB in a test run), so it says nothing about the pruning. Then
the held-out perplexity after pruning (``lm.perplexity``) and the achieved sparsity of the decoder Linears
(and of ``lm_head``, which must stay 0).

Settings:

* ``quality``: the trained small Llama of ``perplexity.py`` (``lm.SMALL``, from the cache), 50%
  unstructured and 2:4, 32 calibration sequences of 128 tokens (4 per batch, the last quarter padded);
  compares perplexities.
* ``speed``: a random-init Llama (``lm.LARGE``: hidden 1024, 8 layers, intermediate 2816, byte vocabulary,
  so ``lm_head`` is small) at 50% unstructured, 16 calibration sequences of 128 tokens, where the methods'
  own work dominates. Its perplexity is only a sanity check (random weights). In the same run, a
  ``floors`` worker measures with plain torch ops in this interpreter: one plain forward of the model over
  the same calibration batches (``use_cache=False``: no key/value cache to build); the Hessian products
  ``X^T X`` (float32) for each distinct Linear input, the tokens captured from a forward (q/k/v share one
  input, gate/up another; padded tokens left out); and one ``(rows x cols) @ (cols x cols)`` matmul per
  pruned Linear, about SparseGPT's update cost. Printed: wanda's time / the forward floor (target <= 1.5x)
  and sparsegpt's time / (forward + Hessian products + update matmuls) (target <= 3x), for both tools.
* ``speed-64``: the same model and the same measurements with 64 calibration sequences of 128 tokens.
  A forward's cost grows with the tokens, while choosing the masks (a ``topk`` per row), packing them
  and the reconstruction errors (a fixed 256-token sample) cost the same per weight whatever the data:
  so the ratios to the floors fall as the calibration set grows. 16 sequences is far below what these
  methods are run with (the Wanda and SparseGPT papers: 128 sequences of 2048 tokens; llm-compressor's
  ``oneshot`` default: 512 samples); 64 shows where between the two the ratios move. Both are printed.
* ``speed-128`` (not run by default: about 15 minutes more): 128 sequences of 128 tokens, the papers'
  number of sequences (of shorter ones). ``--settings speed-128 --methods wanda`` runs it for wanda only.

Every worker (contenders and floors) first runs one untimed forward of the first batch
(``warmed_up``), so that no one pays the first call's one-off costs inside the measurement
(transformers imports attention and masking code lazily; llm-compressor imports much of it up front).

The allocator: by default every worker (each contender and the floors) runs with
``MALLOC_MMAP_THRESHOLD_=131072``. glibc starts with that threshold but raises it each time a mapped block
is freed (up to 32 MiB), after which tensors of that size come from the heap, where a freed one stays in
the RSS until the heap is trimmed, and long-lived tensors among them keep the pages around them. A peak
RSS then depends on the order of allocations more than on what the pruning keeps alive: the same
prunespec worker peaked 107 and 136 MiB beyond the model in two back-to-back runs, and llm-compressor's
wanda 105 and 180 MiB in two runs of the same version. With the threshold fixed, tensors over 128 KiB
are mapped and unmapped, the peak follows the live tensors and repeats to the MiB, for every contender
alike; what it costs is page faults on each such tensor's first use (a quarter to a half more time here,
for everyone). ``--malloc default`` measures with glibc as it comes.

Timings on a shared machine move several-fold with other processes' load (reported per worker as
"others' CPU"); compare only ratios from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine  # noqa: E402  (memory and contention helpers)
import lm  # noqa: E402

REPO_ROOT = HERE.parent
MIB = 1024 * 1024
LLMC_ENV = "PRUNESPEC_LLMC_PYTHON"
LLMC_INSTALL = (
    "python3 -m venv ../peers/llmc && ../peers/llmc/bin/pip install torch==2.13.0 && "
    "../peers/llmc/bin/pip install llmcompressor torch==2.13.0"
)
TOOLS = (
    "prunespec",
    "prunespec-disk",
    "prunespec-replay",
    "prunespec-replay-disk",
    "prunespec-blocks",
    "prunespec-blocks-disk",
    "llmc",
)
OURS = {  # our contenders: finalize with this snapshot, blocks replayed or not, calibration.sequential
    "prunespec": ("memory", False, True),
    "prunespec-disk": ("disk", False, True),
    "prunespec-replay": ("memory", True, True),
    "prunespec-replay-disk": ("disk", True, True),
    "prunespec-blocks": ("memory", False, "blocks"),
    "prunespec-blocks-disk": ("disk", False, "blocks"),
}
METHODS = ("wanda", "sparsegpt")
TOOL_NAMES = {
    "prunespec": "prunespec",
    "prunespec-disk": "prunespec (snapshot disk)",
    "prunespec-replay": "prunespec (replay blocks)",
    "prunespec-replay-disk": "prunespec (replay, disk)",
    "prunespec-blocks": "prunespec (sequential: blocks)",
    "prunespec-blocks-disk": "prunespec (blocks, disk)",
    "llmc": "llm-compressor",
}
TARGETS = {"wanda": 1.5, "sparsegpt": 3.0}
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
MMAP_BYTES = 128 * 1024  # glibc's starting threshold, kept fixed
MALLOC_NAMES = {
    "fixed": f"glibc, {MMAP_THRESHOLD}={MMAP_BYTES} (larger tensors mapped and unmapped: RSS follows live memory)",
    "default": "glibc as it comes (dynamic mmap threshold: peaks depend on the heap's history)",
}


# --- sizes -----------------------------------------------------------------------------------------------


def sizes(quick: bool) -> dict[str, dict[str, Any]]:
    """Model, data and settings of each benchmark setting."""
    if quick:
        return {
            "quality": {
                "train": lm.TrainConfig(steps=30),
                "calib": (8, 128),
                "heldout": (32, 128),
                "settings": ["50%", "2:4"],
            },
            "speed": {
                "model": lm.LMConfig(hidden=512, layers=2, heads=8, kv_heads=8, intermediate=1408, max_positions=256),
                "calib": (4, 128),
                "heldout": (4, 128),
                "settings": ["50%"],
            },
            "speed-64": {
                "model": lm.LMConfig(hidden=512, layers=2, heads=8, kv_heads=8, intermediate=1408, max_positions=256),
                "calib": (16, 128),
                "heldout": (4, 128),
                "settings": ["50%"],
            },
        }
    return {
        "quality": {"train": lm.TrainConfig(), "calib": (32, 128), "heldout": (256, 128), "settings": ["50%", "2:4"]},
        "speed": {"model": lm.LARGE, "calib": (16, 128), "heldout": (8, 128), "settings": ["50%"]},
        "speed-64": {"model": lm.LARGE, "calib": (64, 128), "heldout": (8, 128), "settings": ["50%"]},
        "speed-128": {"model": lm.LARGE, "calib": (128, 128), "heldout": (8, 128), "settings": ["50%"]},
    }


# --- worker ------------------------------------------------------------------------------------------------


def _mib(n: float) -> float:
    return round(n / MIB, 1)


def measured(call: Callable[[], Any]) -> dict[str, Any]:
    """Wall/CPU time and peak RSS of ``call()``, the RSS just before it being the baseline."""
    gc.collect()
    engine.malloc_trim()
    before = engine.rss_bytes()
    peak = engine.PeakRSS()
    cpu, start = time.process_time(), time.perf_counter()
    call()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    top = max(peak.stop(), before)
    return {
        "time_s": wall,
        "cpu_s": cpu,
        "rss_model_mib": _mib(before),
        "peak_mib": _mib(top),
        "peak_beyond_model_mib": _mib(top - before),
        "mem_method": peak.method,
    }


def prunespec_call(
    method: str,
    setting: str,
    model: Any,
    batches: list[lm.Batch],
    snapshot: str = "memory",
    replay: bool = False,
    sequential: bool | str = True,
) -> Callable[[], Any]:
    import prunespec

    methods = prunespec.load_methods()
    if method not in methods:
        raise Skip(f"{method}: not available in this prunespec")
    spec = {**lm.prunespec_spec(method, setting), "calibration": {"sequential": sequential}}
    return lambda: prunespec.apply(
        model, spec, methods=methods, data=batches, finalize=True, snapshot=snapshot, replay_blocks=replay
    )


def llmc_call(method: str, setting: str, model: Any, batches: list[lm.Batch]) -> Callable[[], Any]:
    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    except ImportError as exc:
        raise Skip(f"llmcompressor cannot be imported: {exc}") from exc
    from torch.utils.data import DataLoader

    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    structure = "2:4" if setting == "2:4" else "0:0"  # llm-compressor's N:M counts the PRUNED ones: 2:4 either way
    sparsity = 0.5 if setting == "2:4" else int(setting.rstrip("%")) / 100
    recipe = modifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    loader = DataLoader(batches, batch_size=None, shuffle=False)  # each item is already a batch: as is, in order
    return lambda: oneshot(model=model, recipe=recipe, dataset=loader)


class Skip(Exception):
    """The contender cannot run here (a method or a tool absent); the message says why."""


def run_worker(tool: str, method: str, setting: str, model_dir: str, data_path: str) -> dict[str, Any]:
    result: dict[str, Any] = {"tool": tool, "method": method, "setting": setting}
    data = lm.load_data(data_path)
    if tool == "floors":
        result.update(floors(warmed_up(lm.load_llama(model_dir), data["calibration"]), data["calibration"]))
        return result
    try:
        model = warmed_up(lm.load_llama(model_dir), data["calibration"])
        if tool in OURS:
            call = prunespec_call(method, setting, model, data["calibration"], *OURS[tool])
        else:
            call = llmc_call(method, setting, model, data["calibration"])
    except Skip as exc:
        return {**result, "skipped": str(exc)}
    result.update(measured(call))
    result["rss_after_mib"] = _mib(engine.rss_bytes())
    result["ru_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["sparsity"] = lm.sparsity(model)
    result["lm_head_sparsity"] = float((model.lm_head.weight == 0).float().mean())
    result["perplexity"] = lm.perplexity(model, data["heldout"])
    result["versions"] = versions(tool)
    return result


@torch.no_grad()
def warmed_up(model: Any, batches: list[lm.Batch]) -> Any:
    """``model`` after one untimed forward of the first batch, so that no contender and no floor pays the
    first call's one-off costs (transformers' lazy imports, the allocator's first growth)."""
    model(**batches[0], use_cache=False)
    return model


def versions(tool: str) -> dict[str, str]:
    import transformers

    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": str(torch.get_num_threads()),
    }
    with contextlib.suppress(Exception):
        if tool == "llmc":
            import llmcompressor

            out["llmcompressor"] = llmcompressor.__version__
    return out


# --- floors ------------------------------------------------------------------------------------------------


@torch.no_grad()
def floors(model: Any, batches: list[lm.Batch]) -> dict[str, Any]:
    """Plain-torch lower bounds of the methods' work on this model and data (see the module docstring)."""
    start = time.perf_counter()
    for batch in batches:
        model(**batch, use_cache=False)  # no key/value cache: the least a forward does
    forward = time.perf_counter() - start

    # the tokens each distinct Linear input carried, captured from a second (untimed) forward
    linears = lm.decoder_linears(model)
    inputs: dict[tuple[str, ...], list[torch.Tensor]] = {}
    current: dict[int, tuple[list[str], torch.Tensor]] = {}

    def hook(name: str) -> Callable[..., None]:
        def pre(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0]
            current.setdefault(id(x), ([], x))[0].append(name)

        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears]
    try:
        for batch in batches:
            current.clear()
            model(**batch, use_cache=False)
            keep = batch["attention_mask"].bool()
            for names, x in current.values():
                inputs.setdefault(tuple(names), []).append(x[keep].reshape(-1, x.shape[-1]).float())
    finally:
        for h in handles:
            h.remove()
    groups = len(inputs)
    matrices = [torch.cat(parts) for parts in inputs.values()]
    del inputs
    current.clear()
    start = time.perf_counter()
    for x in matrices:
        x.T @ x
    hessian = time.perf_counter() - start
    del matrices

    update = 0.0
    generator = torch.Generator().manual_seed(0)
    for _, module in linears:
        rows, cols = module.weight.shape
        a = torch.randn(rows, cols, generator=generator)
        b = torch.randn(cols, cols, generator=generator)
        start = time.perf_counter()
        a @ b
        update += time.perf_counter() - start
    return {
        "forward_s": forward,
        "hessian_s": hessian,
        "update_s": update,
        "hessian_groups": groups,
        "tokens": lm.tokens(batches),
        "linears": len(linears),
    }


# --- parent ------------------------------------------------------------------------------------------------


def llmc_python() -> Path:
    return Path(os.environ.get(LLMC_ENV) or REPO_ROOT.parent / "peers" / "llmc" / "bin" / "python")


def worker_env(malloc: str) -> dict[str, str]:
    """The environment every worker runs in: with ``malloc="fixed"``, glibc's mmap threshold fixed at its
    starting value (see the module docstring), so that a peak RSS is what the pruning kept alive."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if malloc == "fixed":
        env[MMAP_THRESHOLD] = str(MMAP_BYTES)
    return env


def run_one(
    python: str,
    tool: str,
    method: str,
    setting: str,
    model_dir: str,
    data: str,
    timeout: float,
    wait: float = 0,
    malloc: str = "fixed",
) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--worker", tool, method, setting, model_dir, data]
    env = worker_env(malloc)
    if tool != "llmc":
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    label = f"{TOOL_NAMES.get(tool, tool)} {method} {setting}".strip()
    print(f"  running {label} ...", file=sys.stderr, flush=True)
    if wait:
        engine.wait_idle(wait)
    usage, busy, start = resource.getrusage(resource.RUSAGE_CHILDREN), engine.busy_seconds(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"tool": tool, "method": method, "setting": setting, "error": f"timed out after {timeout:.0f} s"}
    wall, busy = time.perf_counter() - start, engine.busy_seconds() - busy
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        result = {"tool": tool, "method": method, "setting": setting, "error": f"exit {proc.returncode}:\n{tail}"}
    else:
        result = json.loads(lines[-1])
    result["other_load_pct"] = 100 * max(0.0, busy - own) / (wall * (os.cpu_count() or 1))
    result["worker_wall_s"] = wall
    if "skipped" in result or "error" in result:
        done = result.get("skipped") or "FAILED: " + result["error"].splitlines()[0]
    else:
        done = f"{result.get('time_s', result.get('forward_s', 0)):.2f} s"
    print(f"  ... {label}: {done}", file=sys.stderr, flush=True)
    return result


def prepare_setting(name: str, size: dict[str, Any], folder: Path) -> dict[str, Any]:
    corpus = lm.load_corpus()
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if name == "quality":
        model, info = lm.trained_llama(lm.SMALL, size["train"], log=log)
        desc = f"trained {lm.SMALL} ({size['train'].steps} steps, final train loss {info['final_loss']:.3f})"
    else:
        model = lm.build_llama(size["model"], seed=0)
        desc = f"random-init {size['model']} (seed 0)"
    calib = lm.calibration_batches(corpus.calibration, *size["calib"])
    heldout = lm.eval_batches(corpus.heldout, *size["heldout"])
    model_dir, data = folder / f"{name}-model", folder / f"{name}-data.pt"
    lm.save_llama(model, model_dir)
    lm.save_data(data, calibration=calib, heldout=heldout)
    dense = lm.perplexity(model, heldout)
    params = sum(m.weight.numel() for _, m in lm.decoder_linears(model))
    del model
    n, seq = size["calib"]
    return {
        "setting": name,
        "model": desc,
        "pruned_params": params,
        "calibration": f"{n} x {seq} tokens in {len(calib)} batches of 4 ({lm.tokens(calib):,} real tokens; "
        f"padded batches at the end: {sum(1 for b in calib if not bool(b['attention_mask'].all()))})",
        "heldout": f"{size['heldout'][0]} x {size['heldout'][1]} tokens",
        "dense_perplexity": dense,
        "model_dir": str(model_dir),
        "data": str(data),
    }


def run_parent(args: argparse.Namespace) -> int:
    peer = llmc_python()
    have_llmc = peer.is_file()
    if not have_llmc:
        print(
            f"llm-compressor: skipped, no interpreter at {peer} (set {LLMC_ENV}, or install it next to the "
            f"repository: {LLMC_INSTALL})",
            flush=True,
        )
    try:
        import prunespec

        available = set(prunespec.load_methods())
    except ImportError as exc:
        print(f"prunespec cannot be imported in {sys.executable}: {exc}", flush=True)
        available = set()
    for method in METHODS:
        if method not in available:
            print(f"{method}: not available in this prunespec", flush=True)
    chosen = _listed(args.settings)
    wanted_tools, wanted_methods = set(_listed(args.tools)), set(_listed(args.methods))
    tools = [t for t in TOOLS if t in wanted_tools]  # in the table's order, whatever the command line's
    methods = [m for m in METHODS if m in wanted_methods]
    all_sizes = sizes(args.quick)
    results: list[dict[str, Any]] = []
    setups: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="prunespec-calib-") as tmp:
        for name in chosen:
            size = all_sizes[name]
            print(f"{name}: preparing the model and data", file=sys.stderr, flush=True)
            setup = prepare_setting(name, size, Path(tmp))
            setups.append(setup)
            for setting in size["settings"]:
                for method in methods:
                    for tool in tools:
                        if tool in OURS and method not in available:
                            continue
                        if tool == "llmc" and not have_llmc:
                            continue
                        python = str(peer) if tool == "llmc" else sys.executable
                        r = run_one(
                            python,
                            tool,
                            method,
                            setting,
                            setup["model_dir"],
                            setup["data"],
                            args.timeout,
                            args.wait_idle,
                            args.malloc,
                        )
                        results.append({**r, "bench": name})
            if "model" in size:  # the speed settings: their floors too
                r = run_one(
                    sys.executable,
                    "floors",
                    "-",
                    "-",
                    setup["model_dir"],
                    setup["data"],
                    args.timeout,
                    args.wait_idle,
                    args.malloc,
                )
                results.append({**r, "bench": name})
    if args.json:
        print(json.dumps({"setups": setups, "results": results}))
    else:
        print(report(setups, results, args))
    return 1 if any("error" in r for r in results) else 0


def _listed(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# --- report ------------------------------------------------------------------------------------------------


def _t(seconds: float | None) -> str:
    return engine._fmt_time(seconds)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _find(results: Sequence[dict[str, Any]], bench: str, tool: str, method: str, setting: str) -> dict[str, Any] | None:
    for r in results:
        if (r["bench"], r["tool"], r["method"], r["setting"]) == (bench, tool, method, setting):
            return r
    return None


def _ok(r: dict[str, Any] | None) -> bool:
    return r is not None and "error" not in r and "skipped" not in r


def report(setups: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    out = [
        "prunespec vs llm-compressor, data-aware pruning of the decoder blocks' Linears"
        + (" (--quick)" if args.quick else ""),
        f"prunespec {engine.git_revision()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; peer: {llmc_python()}",
        f"every worker's allocator: {MALLOC_NAMES[args.malloc]}",
    ]
    peer_versions = next((r["versions"] for r in results if r.get("tool") == "llmc" and "versions" in r), None)
    if peer_versions:
        out.append("peer versions: " + ", ".join(f"{k} {v}" for k, v in peer_versions.items()))
    for setup in setups:
        bench = setup["setting"]
        out += ["", f"## {bench}: {setup['model']}; {setup['pruned_params']:,} weights in the pruned Linears"]
        out.append(
            f"calibration {setup['calibration']}; held-out {setup['heldout']}; "
            f"dense perplexity {setup['dense_perplexity']:.3f}"
        )
        mine = [r for r in results if r["bench"] == bench and r["tool"] != "floors"]
        rows = []
        for r in mine:
            name = f"{TOOL_NAMES[r['tool']]} {r['method']}"
            if "skipped" in r or "error" in r:
                rows.append(
                    [name, r["setting"], "skipped: " + r["skipped"] if "skipped" in r else "FAILED", *["-"] * 6]
                )
                continue
            rows.append(
                [
                    name,
                    r["setting"],
                    f"{r['perplexity']:.3f}",
                    f"{r['sparsity']:.2%}"
                    + ("" if r["lm_head_sparsity"] == 0 else f" (lm_head {r['lm_head_sparsity']:.0%}!)"),
                    _t(r["time_s"]),
                    _t(r["cpu_s"]),
                    f"{r['rss_model_mib']:.0f}",
                    f"{r['peak_beyond_model_mib']:.0f}",
                    f"{r['other_load_pct']:.0f}%",
                ]
            )
        headers = [
            "contender",
            "setting",
            "held-out ppl",
            "sparsity",
            "time",
            "CPU time",
            "RSS model+data MiB",
            "peak beyond MiB",
            "others' CPU",
        ]
        rows = [r[: len(headers)] + [""] * (len(headers) - len(r[: len(headers)])) for r in rows]
        out += ["", engine.markdown_table(headers, rows)]

        ratio_rows = []
        for setting in sizes(args.quick)[bench]["settings"]:
            for method, ours in ((m, t) for m in METHODS for t in OURS):
                p, q = (
                    _find(results, bench, ours, method, setting),
                    _find(results, bench, "llmc", method, setting),
                )
                if not (_ok(p) and _ok(q)):
                    continue
                assert p is not None and q is not None
                ratio_rows.append(
                    [
                        f"{TOOL_NAMES[ours]} {method}",
                        setting,
                        _x(q["time_s"] / p["time_s"]),
                        _x(p["peak_beyond_model_mib"] / q["peak_beyond_model_mib"])
                        if q["peak_beyond_model_mib"] > 0
                        else "-",
                        f"{p['perplexity']:.3f} / {q['perplexity']:.3f}",
                        f"{p['perplexity'] / q['perplexity']:.3f}",
                    ]
                )
        if ratio_rows:
            out += ["", "prunespec vs llm-compressor:", ""]
            out.append(
                engine.markdown_table(
                    [
                        "contender",
                        "setting",
                        "speed-up (llmc time / prunespec time)",
                        "peak beyond model (prunespec / llmc)",
                        "ppl prunespec / llmc",
                        "ppl ratio",
                    ],
                    ratio_rows,
                )
            )
        floor = next((r for r in results if r["bench"] == bench and r["tool"] == "floors"), None)
        if floor is not None and "error" not in floor:
            sgpt_floor = floor["forward_s"] + floor["hessian_s"] + floor["update_s"]
            out += [
                "",
                f"floors (plain torch, this interpreter, others' CPU {floor['other_load_pct']:.0f}%): "
                f"one forward over the calibration batches {_t(floor['forward_s'])}; "
                f"X^T X of {floor['hessian_groups']} distinct Linear inputs ({floor['tokens']:,} tokens) "
                f"{_t(floor['hessian_s'])}; one rows x cols x cols matmul per pruned Linear ({floor['linears']}) "
                f"{_t(floor['update_s'])}; sparsegpt floor (the sum) {_t(sgpt_floor)}",
                "",
            ]
            floor_rows = []
            for r in mine:
                if not _ok(r):
                    continue
                base = floor["forward_s"] if r["method"] == "wanda" else sgpt_floor
                what = "forward" if r["method"] == "wanda" else "forward + X^T X + updates"
                ratio = r["time_s"] / base
                target = TARGETS[r["method"]]
                verdict = f"<= {target}x: {'met' if ratio <= target else 'NOT met'}" if r["tool"] in OURS else "-"
                floor_rows.append([f"{TOOL_NAMES[r['tool']]} {r['method']}", r["setting"], what, _x(ratio), verdict])
            out.append(engine.markdown_table(["contender", "setting", "floor", "time / floor", "target"], floor_rows))
        elif floor is not None:
            out += ["", f"floors FAILED: {floor['error']}"]
    failed = [r for r in results if "error" in r]
    if failed:
        out += ["", "failures:"]
        for r in failed:
            out += [f"* {r['bench']} {TOOL_NAMES.get(r['tool'], r['tool'])} {r['method']} {r['setting']}:", r["error"]]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="prunespec's data-aware methods vs llm-compressor's, same model, same data."
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument(
        "--settings",
        default="quality,speed,speed-64",
        help="comma-separated: quality, speed, speed-64, speed-128 (default the first three)",
    )
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help=f"comma-separated, of: {', '.join(TOOLS)} (default all)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: wanda, sparsegpt (default both)")
    parser.add_argument("--json", action="store_true", help="print setups and results as JSON")
    engine.add_wait_idle(parser)
    parser.add_argument(
        "--malloc",
        choices=sorted(MALLOC_NAMES),
        default="fixed",
        help=f"fixed (default): every worker with {MMAP_THRESHOLD}={MMAP_BYTES}, so that peak RSS follows the live "
        "tensors; default: glibc as it comes (peaks then depend on the heap's history, up to 2x between runs)",
    )
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per worker (default 1200)")
    parser.add_argument(
        "--worker", nargs=5, metavar=("TOOL", "METHOD", "SETTING", "MODEL_DIR", "DATA"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.worker:
        try:
            result = run_worker(*args.worker)
        except Exception as exc:  # reported by the parent with the exact message
            tail = traceback.format_exc().strip().splitlines()[-9:-1]  # the last line repeats the message
            result = {
                "tool": args.worker[0],
                "method": args.worker[1],
                "setting": args.worker[2],
                "error": f"{type(exc).__name__}: {exc}\n" + "\n".join(tail),
            }
        print(json.dumps(result), flush=True)
        return 0
    for what, given, known in (
        ("settings", args.settings, list(sizes(args.quick))),
        ("tools", args.tools, list(TOOLS)),
        ("methods", args.methods, list(METHODS)),
    ):
        unknown = sorted(set(_listed(given)) - set(known))
        if unknown:
            parser.error(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(known)})")
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
