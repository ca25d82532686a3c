"""The ``prunespec`` command line (also ``python -m prunespec``).

Exit status: 0 when fine, 1 for a spec, plan, apply or checkpoint error (printed without a traceback unless
``--traceback``, with file:line:column where it comes from a file; as JSON on stdout with ``--json``), 2 for
usage errors (a bad ``--model`` REF or a missing spec file among them). Warnings print as one line each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

from torch import nn

from . import __version__, api, checkpoint, hf, sparse_file
from .engine import Progress
from .errors import Issue, ModelRefError, PrunespecError, SpecError
from .files import atomic_write_text, check_writable
from .inventory import inventory
from .loader import load_spec
from .plugins import MethodRegistry, PluginWarning, load_methods
from .render import options as format_options
from .render import table
from .report import sparsity
from .schema import schema_json

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def load_model(ref: str) -> nn.Module:
    """Build the model named by ``path/to/file.py:factory`` or ``package.module:factory`` (see
    :func:`load_object`); anything but a ``torch.nn.Module`` is a :class:`ModelRefError` naming the REF."""
    model = load_object(ref, "model")
    if not isinstance(model, nn.Module):
        fix = "REF must name a class or function that builds the model with no arguments; write one that does"
        raise ModelRefError(f"{ref} returned {type(model).__name__}, not a torch.nn.Module ({fix})")
    return model


def load_data(ref: str) -> Iterable[Any]:
    """The calibration batches named by ``--data`` REF: its factory must return an iterable of batches."""
    data = load_object(ref, "data")
    if isinstance(data, (nn.Module, str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise ModelRefError(
            f"{ref} returned {type(data).__name__}, not an iterable of batches (return a list of Tensors, of "
            "tuples, or of mappings such as {'input_ids': ..., 'attention_mask': ...})"
        )
    return data


def load_object(ref: str, what: str = "model", *, call: bool = True) -> Any:
    """Call the factory named by ``path/to/file.py:factory`` or ``package.module:factory`` and return what
    it builds (``what``: the model, the data; used in errors).

    A file is imported with its own folder on ``sys.path`` (so it can import its sibling modules), a module
    with the current directory on it, as ``python -m`` has; ``sys.path`` is restored afterwards. The factory
    is called with no arguments and must return a ``torch.nn.Module``; anything else is a
    :class:`ModelRefError` naming the REF.
    """
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise ModelRefError(
            f"{what} reference {ref!r} must look like path/to/file.py:Factory or package.module:factory"
        )
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    path = Path(target)
    if is_file and not path.is_file():
        raise ModelRefError(f"{what} file {target!r} does not exist")
    with _on_sys_path(str(path.resolve().parent) if is_file else os.getcwd()):
        try:
            module = _import_file(path) if is_file else importlib.import_module(target)
        except ModelRefError:
            raise
        except Exception as exc:
            raise ModelRefError(f"importing {target!r} failed: {type(exc).__name__}: {exc}") from exc
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ModelRefError(f"{target!r} has no callable {attr!r}")
        return _build(ref, attr, factory, what) if call else factory


def _import_file(path: Path) -> Any:
    module_name = f"_prunespec_model_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelRefError(f"cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _on_sys_path(folder: str) -> Iterator[None]:
    """``folder`` first on ``sys.path`` for the duration, unless it is there already."""
    present = folder in sys.path or (folder == os.getcwd() and "" in sys.path)
    if not present:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if not present and folder in sys.path:
            sys.path.remove(folder)


def _build(ref: str, attr: str, factory: Any, what: str) -> Any:
    fix = f"REF must name a class or function that builds the {what} with no arguments; write one that does"
    try:
        needed = [
            p.name
            for p in inspect.signature(factory).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
    except (TypeError, ValueError):  # no signature to read (some builtins): just call it
        needed = []
    if needed:
        raise ModelRefError(f"{ref}: {attr} needs arguments ({', '.join(needed)}); {fix}")
    try:
        return factory()
    except Exception as exc:
        raise ModelRefError(f"{ref}: calling {attr}() failed: {type(exc).__name__}: {exc} ({fix})") from exc


def _model(args: argparse.Namespace) -> nn.Module:
    model = _build_model(args)
    if getattr(args, "weights", None):
        state_dict, _ = checkpoint.read(args.weights)
        checkpoint.load_state_dict(model, state_dict)
    return model


def _build_model(args: argparse.Namespace) -> nn.Module:
    """``--model``: a local transformers directory (its masks restored when prunespec saved them), a
    factory REF, or with ``--config FILE`` a REF called with that config."""
    ref = args.model
    config_file = getattr(args, "config", None)
    if hf.is_model_dir(ref):
        if config_file:
            raise ModelRefError(f"--config is for a factory REF; {ref} is a model directory with its own config.json")
        model = hf.load_dir(ref, getattr(args, "model_class", None))
        if (Path(ref) / hf.SIDECAR).is_file():
            checkpoint.load(model, ref)
        return model
    if getattr(args, "model_class", None):
        raise ModelRefError("--model-class names the class of a model directory; --model is not one")
    if config_file:
        return load_model_with_config(ref, config_file)
    if "/" in ref and ":" not in ref and not Path(ref).exists():
        raise ModelRefError(
            f"{ref}: no such directory; prunespec never downloads (a hub id must be downloaded first, e.g. "
            "huggingface-cli download, and the folder passed)"
        )
    return load_model(ref)


def load_model_with_config(ref: str, config_file: str) -> nn.Module:
    """``REF`` called with the config read from ``config_file`` (a transformers ``config.json``): a
    transformers model class reads it as its own config class."""
    import transformers

    path = Path(config_file)
    if not path.is_file():
        raise ModelRefError(f"--config {config_file}: no such file")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelRefError(f"--config {config_file}: not a transformers config: {type(exc).__name__}: {exc}") from exc
    factory = load_object(ref, "model", call=False)
    try:
        model = factory(config)
    except Exception as exc:
        raise ModelRefError(f"{ref}: calling it with the config failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelRefError(f"{ref} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def cmd_validate(args: argparse.Namespace, methods: MethodRegistry) -> int:
    failed = 0
    results = []
    for path in args.specs:
        try:
            load_spec(path, methods=methods)
            results.append({"spec": path, "valid": True, "issues": []})
            if not args.json:
                print(f"{path}: valid")
        except SpecError as exc:
            failed += 1
            results.append({"spec": path, "valid": False, "issues": [str(i) for i in exc.issues]})
            if not args.json:
                print(exc, file=sys.stderr)
    if args.json:
        _print_json(results)
    return EXIT_ERROR if failed else EXIT_OK


def cmd_schema(args: argparse.Namespace, methods: MethodRegistry) -> int:
    if args.out:  # whole or not at all: an editor or CI never reads half a schema
        atomic_write_text(args.out, schema_json(methods))
    else:
        sys.stdout.write(schema_json(methods))
    return EXIT_OK


def cmd_methods(args: argparse.Namespace, methods: MethodRegistry) -> int:
    rows: list[dict[str, Any]] = []
    for name in sorted(methods):
        info = methods[name]
        options = {
            key: (
                "required" if field.is_required() else field.get_default(call_default_factory=True, validated_data={})
            )
            for key, field in info.options_model.model_fields.items()
        }
        caps = info.capabilities
        rows.append(
            {
                "name": name,
                "granularity": caps.granularity,
                "unit": caps.unit if caps.takes_amount else None,
                "scores": caps.scores,
                "global": caps.supports_global,
                "statistics": list(caps.statistics),
                "PRUNING_TYPE": info.pruning_type,
                "takes_amount": info.takes_amount,
                "provider": info.provider,
                "package": info.package,
                "version": info.version,
                "options": options,
                "summary": info.summary,
            }
        )
    if args.json:
        _print_json(rows)
        return EXIT_OK
    headers = ["method", "prunes", "amount counts", "global", "options", "package", "summary"]
    cells = [
        [
            str(r["name"]),
            str(r["granularity"]),
            str(r["unit"] or "- (decides alone)"),
            "yes" if r["global"] else "no",
            format_options(r["options"]) or "-",
            f"{r['package'] or r['provider']} {r['version'] or ''}".strip(),
            r["summary"],
        ]
        for r in rows
    ]
    print(table(headers, cells))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace, methods: MethodRegistry) -> int:
    found = inventory(_model(args))
    if args.json:
        _print_json(found.to_dict())
    else:
        print(found)
    return EXIT_OK


def cmd_plan(args: argparse.Namespace, methods: MethodRegistry) -> int:
    data = list(load_data(args.data)) if args.data else None
    plan = api.plan(_model(args), args.spec, methods=methods, data=data)
    if args.json:
        _print_json(plan.to_dict())
    else:
        print(plan)
    return EXIT_OK


def cmd_apply(args: argparse.Namespace, methods: MethodRegistry) -> int:
    model = _model(args)
    out_format: Literal["pt", "sparse", "pretrained"] = "pt"
    if args.out:
        out_format = "pretrained" if hf.is_pretrained(model) and not Path(args.out).suffix else _out_format(args.out)
    if args.out and out_format != "pretrained":  # before the work: a bad --out must not cost a whole apply
        check_writable(args.out)
    data = list(load_data(args.data)) if args.data else None  # listed: OWL's allocation reads it too
    plan = api.plan(model, args.spec, methods=methods, data=data)
    report = api.apply(
        model,
        plan,
        finalize=True if args.finalize else None,
        shrink=True if args.shrink else None,
        progress=_progress_bar(args),
        data=data,
        snapshot=args.snapshot,
        replay_blocks=args.replay_blocks,
        offload_activations=args.offload_activations,
    )
    if args.out:
        changed = {k: True for k in ("finalize", "shrink") if getattr(args, k)}
        applied = plan.spec.model_copy(update=changed) if changed else plan.spec
        checkpoint.save(model, args.out, spec=applied, methods=methods, record=report.calibration, format=out_format)
    if args.json:
        _print_json({"plan": plan.to_dict(), "report": report.to_dict(), "out": args.out})
        return EXIT_OK
    print(plan)
    print()
    print(report)
    if args.out:
        print(f"\nSaved to {args.out}")
    return EXIT_OK


def _progress_bar(args: argparse.Namespace) -> Progress | None:
    """A one-line progress bar on stderr, when stderr is a terminal (or --progress)."""
    if not (args.progress or (args.progress is None and sys.stderr.isatty())):
        return None

    started = time.monotonic()

    def show(done: int, total: int, what: str) -> None:
        width = 30
        filled = width * done // max(total, 1)
        elapsed = time.monotonic() - started
        eta = f" ETA {_duration(elapsed / done * (total - done))}" if 0 < done < total else ""
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}{eta} {what}"[:120].ljust(120)
        sys.stderr.write(line + ("\n" if done >= total else ""))
        sys.stderr.flush()

    return show


def _duration(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``."""
    whole = round(seconds)
    return (
        f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
        if whole >= 3600
        else f"{whole // 60}:{whole % 60:02d}"
    )


def _out_format(path: str) -> Literal["pt", "sparse"]:
    """A ``.safetensors`` file is written in the sparse format, anything else as a ``.pt`` checkpoint."""
    return "sparse" if Path(path).suffix == ".safetensors" else "pt"


def cmd_export(args: argparse.Namespace, methods: MethodRegistry) -> int:
    check_writable(args.out)
    model = _build_model(args)
    spec = checkpoint.load(model, args.checkpoint, methods=methods)
    record = checkpoint.inspect(args.checkpoint, methods=methods).calibration
    checkpoint.save(model, args.out, spec=spec, methods=methods, record=record, format="sparse")
    encodings = {name: entry.get("encoding", "tied") for name, entry in sparse_file.contents(args.out).items()}
    sizes = {"checkpoint_bytes": os.path.getsize(args.checkpoint), "out_bytes": os.path.getsize(args.out)}
    counts = {name: list(encodings.values()).count(name) for name in sorted(set(encodings.values()))}
    if args.json:
        _print_json({"checkpoint": args.checkpoint, "out": args.out, **sizes, "encodings": encodings})
        return EXIT_OK
    ratio = sizes["out_bytes"] / max(sizes["checkpoint_bytes"], 1)
    print(f"Exported {args.checkpoint} to {args.out}: {sizes['out_bytes']:,} bytes ({ratio:.2f}x the checkpoint)")
    print("tensors: " + ", ".join(f"{n} {name}" for name, n in counts.items()))
    return EXIT_OK


def cmd_report(args: argparse.Namespace, methods: MethodRegistry) -> int:
    model = _build_model(args)
    state_dict, _ = checkpoint.read(args.checkpoint)
    checkpoint.load_state_dict(model, state_dict)
    report = sparsity(model)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report)
    return EXIT_OK


def _global_flags(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """The flags every command takes, before or after its name: the sub-command's copies default to
    ``SUPPRESS`` so that they do not undo a flag given before the command."""
    parser.add_argument("--json", action="store_true", default=default, help="machine-readable output")
    parser.add_argument(
        "--builtins-only",
        action="store_true",
        default=default,
        help="load no third-party plugins (or PRUNESPEC_BUILTINS_ONLY=1)",
    )
    parser.add_argument(
        "--traceback", action="store_true", default=default, help="on an error, show the traceback and its cause"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunespec", description="Declarative pruning for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"prunespec {__version__}")
    _global_flags(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, default=argparse.SUPPRESS)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    p = add("validate", "check spec files against the schema and the installed methods")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.set_defaults(run=cmd_validate)
    p = add("schema", "print the JSON Schema of specs, covering every installed method")
    p.add_argument("--out", metavar="FILE", help="write it to FILE (atomically) instead of printing it")
    p.set_defaults(run=cmd_schema)
    p = add("methods", "list the installed pruning methods")
    p.set_defaults(run=cmd_methods)
    model_help = (
        "the model: path/to/file.py:Factory or package.module:factory, or a local transformers model directory "
        "(a folder with config.json; never downloaded)"
    )

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, metavar="REF", help=model_help)
        p.add_argument(
            "--model-class",
            metavar="CLASS",
            help="for a model directory: the transformers class (default: its config's)",
        )
        p.add_argument("--config", metavar="FILE", help="call the factory REF with this transformers config.json")

    p = add("inspect", "list a model's modules as patterns, with selectors, tied parameters and known structures")
    model_args(p)
    p.add_argument("--weights", metavar="CKPT", help="load these weights into the model first")
    p.set_defaults(run=cmd_inspect)
    p = add("plan", "show what a spec will do to a model, without changing it")
    p.add_argument("spec", metavar="SPEC")
    model_args(p)
    p.add_argument("--weights", metavar="CKPT", help="load these weights into the model first")
    p.add_argument(
        "--data", metavar="REF", help="calibration batches (file.py:factory): OWL rules then show each block's sparsity"
    )
    p.set_defaults(run=cmd_plan)
    p = add("apply", "prune a model as a spec says and report the result")
    p.add_argument("spec", metavar="SPEC")
    model_args(p)
    p.add_argument("--weights", metavar="CKPT", help="load these weights into the model first")
    p.add_argument(
        "--out",
        metavar="PATH",
        help="save the result: FILE.pt (prunespec's checkpoint), FILE.safetensors (the compact sparse format), or "
        "for a transformers model a DIR without a suffix (save_pretrained that plain from_pretrained loads, with "
        "prunespec.yaml and the masks)",
    )
    p.add_argument("--finalize", action="store_true", help="make the pruning permanent (prune.remove)")
    p.add_argument(
        "--snapshot",
        choices=("memory", "disk", "none"),
        default="memory",
        help="with finalize: how a failure is undone: masks held in memory until the end (default), old values "
        "saved to a temporary file while each tensor is written at once (least memory), or no undo",
    )
    p.add_argument(
        "--replay-blocks",
        action="store_true",
        help="with --data: calibrate holding only each block's inputs, running the block again for each stop "
        "inside it (less memory, about 1.3 more forwards; the same masks)",
    )
    p.add_argument(
        "--offload-activations",
        action="store_true",
        help="with --replay-blocks or calibration.sequential: blocks, on an accelerator: keep the waiting "
        "batches' inputs to the block on the CPU (the same masks)",
    )
    p.add_argument(
        "--shrink",
        action="store_true",
        help="remove the units that group rules pruned (as the spec's `shrink: true`; outputs are checked)",
    )
    p.add_argument(
        "--data",
        metavar="REF",
        help="calibration batches for data-aware methods (wanda, sparsegpt, owl): path/to/file.py:factory or "
        "package.module:factory returning an iterable of batches",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )
    p.set_defaults(run=cmd_apply)
    p = add("report", "show how sparse a checkpoint is")
    p.add_argument("checkpoint", metavar="CKPT")
    model_args(p)
    p.set_defaults(run=cmd_report)
    p = add("export", "write a checkpoint as a compact sparse safetensors file (kept values, masks as bits)")
    p.add_argument("checkpoint", metavar="CKPT")
    model_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="the sparse file to write (FILE.safetensors)")
    p.set_defaults(run=cmd_export)
    return parser


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """A warning as one line, ``warning: <message>``, without Python's source echo."""
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


def _missing_spec(args: argparse.Namespace) -> str | None:
    paths = getattr(args, "specs", None) or ([args.spec] if getattr(args, "spec", None) else [])
    for path in paths:
        if not Path(path).is_file():
            return f"spec file {path!r} {'is not a file' if Path(path).exists() else 'does not exist'}"
    return None


def _error_json(exc: PrunespecError) -> dict[str, Any]:
    issues = getattr(exc, "issues", None) or (Issue(str(exc)),)
    return {
        "error": {
            "type": type(exc).__name__,
            "message": str(exc),
            "issues": [
                {
                    "message": i.message,
                    "path": i.path,
                    "file": i.file,
                    "line": i.line,
                    "column": i.column,
                    "hint": i.hint,
                }
                for i in issues
            ],
        }
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help and --version
        return int(exc.code or 0)
    missing = _missing_spec(args)
    if missing:
        print(f"prunespec {args.command}: error: {missing}", file=sys.stderr)
        return EXIT_USAGE
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", PluginWarning)  # every run says what is wrong with the plugins
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        methods = load_methods(builtins_only=True if args.builtins_only else None)
        code: int = args.run(args, methods)
        return code
    except PrunespecError as exc:
        if args.traceback:
            traceback.print_exception(exc, file=sys.stderr)
        if args.json:
            _print_json(_error_json(exc))
        else:
            print(f"prunespec{'' if isinstance(exc, ModelRefError) else ' ' + args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ModelRefError) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `prunespec methods --json | head -1`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
