"""Held-out perplexity of a small trained Llama after prunespec's magnitude and data-aware methods.

Run it from the repository root (the main venv; nothing is downloaded)::

    python benchmarks/perplexity.py            # trains the model once (a few minutes), then caches it
    python benchmarks/perplexity.py --quick    # a 30-step model and less data: a smoke test
    python benchmarks/perplexity.py --json     # the rows as JSON instead of the table

The model is ``lm.SMALL`` (hidden 256, 4 decoder layers, intermediate 688, byte vocabulary), trained by
``lm.trained_llama`` on the train split of the stdlib corpus (``benchmarks/lm.py``; the weights are cached
under ``benchmarks/.cache/``). Every setting prunes the 28 ``nn.Linear`` weights inside the decoder
blocks (``model.layers.*``; not ``lm_head``, not the embeddings) of a fresh copy of the same dense model:

* ``l1_unstructured`` with ``sparsity: 0.5`` / ``0.7`` (per-tensor magnitude, no data); its 2:4 row is
  magnitude 2:4, the ``nm`` method of the prunespec-nm plugin (``make install`` installs it; skipped with
  a note when absent);
* ``wanda`` with ``sparsity`` (per output row, the paper's default) or ``options: {n: 2, m: 4}`` (2:4);
* ``sparsegpt`` in the same spec form as ``wanda``, when this prunespec has it (else one line says so).

The data-aware methods get the same calibration batches (``--calib-samples`` sequences of ``--seq``
tokens, 4 per batch, the last quarter of the batches padded with ``attention_mask`` 0). Perplexity is
``exp`` of the mean next-token NLL over ``--eval-samples`` held-out windows (files no training or
calibration window came from). The time is ``time.perf_counter`` around ``prunespec.apply`` (plan,
calibration pass, masks, install), with the process's CPU time over it and the share of the CPUs
other processes used meanwhile (``/proc/stat``; on a shared machine wall times move with it). Every
number is as measured in this run; nothing is tuned per method.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import prunespec  # noqa: E402

METHODS = ("l1_unstructured", "wanda", "sparsegpt")
SETTINGS = ("50%", "70%", "2:4")
DATA_AWARE = {"wanda", "sparsegpt"}


def machine_busy() -> float:
    """CPU seconds the whole machine has spent so far (all processes), from /proc/stat; 0 without it."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if not args.json else (lambda text: None)
    train = lm.TrainConfig(steps=30) if args.quick else lm.TrainConfig()
    corpus = lm.load_corpus()
    log(f"corpus: {corpus.describe()}")
    started = time.perf_counter()
    dense, info = lm.trained_llama(lm.SMALL, train, log=log)
    how = f"loaded from {info['cached']}" if info.get("cached") else f"trained in {time.perf_counter() - started:.0f} s"
    log(f"model: {lm.SMALL} ({how}; final train loss {info['final_loss']:.3f})")
    calib = lm.calibration_batches(corpus.calibration, args.calib_samples, args.seq)
    heldout = lm.eval_batches(corpus.heldout, args.eval_samples, args.seq)
    log(
        f"calibration: {args.calib_samples} x {args.seq} tokens in {len(calib)} batches "
        f"({lm.tokens(calib):,} real tokens); held-out: {args.eval_samples} x {args.seq} "
        f"({lm.tokens(heldout):,} tokens)"
    )
    methods = prunespec.load_methods()
    rows: list[dict[str, Any]] = [
        {"method": "dense", "setting": "-", "perplexity": lm.perplexity(dense, heldout), "sparsity": lm.sparsity(dense)}
    ]
    for method in METHODS:
        if method not in methods:
            note = f"{method}: not available in this prunespec"
            print(note, flush=True)
            rows.append({"method": method, "setting": "all", "skipped": "not available in this prunespec"})
            continue
        for setting in SETTINGS:
            spec = lm.prunespec_spec(method, setting)
            if method == "l1_unstructured" and setting == "2:4":
                if "nm" not in methods:  # magnitude N:M is the prunespec-nm plugin's (plugins/prunespec-nm)
                    rows.append({"method": method, "setting": setting, "skipped": "magnitude 2:4 needs prunespec-nm"})
                    continue
                spec = lm.prunespec_spec("nm", setting)
            model = copy.deepcopy(dense)
            data = calib if method in DATA_AWARE else None
            busy, cpu, start = machine_busy(), time.process_time(), time.perf_counter()
            prunespec.apply(model, spec, methods=methods, data=data)
            elapsed, cpu, busy = time.perf_counter() - start, time.process_time() - cpu, machine_busy() - busy
            others = 100 * max(0.0, busy - cpu) / (elapsed * (os.cpu_count() or 1))
            ppl = lm.perplexity(model, heldout)
            rows.append(
                {
                    "method": method,
                    "setting": setting,
                    "perplexity": ppl,
                    "sparsity": lm.sparsity(model),
                    "time_s": elapsed,
                    "cpu_s": cpu,
                    "other_load_pct": others,
                }
            )
            log(f"  {method} {setting}: perplexity {ppl:.3f} in {elapsed:.2f} s")
            del model
    return rows


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if value >= 1 else f"{value * 1000:.0f} ms"


def table(rows: list[dict[str, Any]]) -> str:
    dense = rows[0]["perplexity"]
    head = ["method", "setting", "held-out perplexity", "vs dense", "sparsity (decoder Linears)", "apply time"]
    head += ["apply CPU time", "others' CPU"]
    body = []
    for row in rows:
        if "skipped" in row:
            body.append([row["method"], row["setting"], f"skipped: {row['skipped']}", "", "", "", "", ""])
            continue
        time_s, cpu_s, others = row.get("time_s"), row.get("cpu_s"), row.get("other_load_pct")
        body.append(
            [
                row["method"],
                row["setting"],
                f"{row['perplexity']:.3f}",
                f"{row['perplexity'] / dense:.2f}x",
                f"{row['sparsity']:.2%}",
                _seconds(time_s),
                _seconds(cpu_s),
                "-" if others is None else f"{others:.0f}%",
            ]
        )
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in [head, *body]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Held-out perplexity of a small Llama after prunespec's methods.")
    parser.add_argument("--quick", action="store_true", help="a 30-step model and less data (smoke test)")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default 32; quick 8)")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out sequences (default 256; quick 32)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    args.calib_samples = args.calib_samples or (8 if args.quick else 32)
    args.eval_samples = args.eval_samples or (32 if args.quick else 256)
    rows = run(args)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(
        f"held-out perplexity after pruning the decoder blocks' Linears — {lm.SMALL}, "
        f"{'--quick, ' if args.quick else ''}calibration {args.calib_samples} x {args.seq} tokens, "
        f"held-out {args.eval_samples} x {args.seq} tokens"
    )
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}, "
        f"prunespec from {Path(prunespec.__file__).parent}"
    )
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
