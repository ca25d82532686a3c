"""Files appear whole or not at all: a save killed at any moment leaves the previous checkpoint loading,
with its old content; ``prunespec.files`` checks a target before long work and cleans up after failures.

The kill test uses real processes: one worker process (torch imported once) forks a child per round, the
child saves a ~50 MB pruned model over the old checkpoint, and the test SIGKILLs it at a random moment.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from torch import nn

import prunespec
from prunespec import files
from prunespec.cli import main

WORKER = """
import os, sys, time
import torch
from torch import nn
import prunespec

torch.set_num_threads(1)
path = sys.argv[1]
methods = prunespec.load_methods(builtins_only=True)


def big(fill):
    model = nn.Sequential(nn.Linear(1024, 4096), nn.Linear(4096, 1024))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) * fill + i)
    spec = {"version": 1, "rules": [{"select": {"names": ["0"]}, "method": "l1_unstructured", "amount": 0.5}]}
    prunespec.apply(model, spec, methods=methods)
    return model


model = big(-1.0)
start = time.perf_counter()
prunespec.save(model, path + ".timing", methods=methods)
print("ready", time.perf_counter() - start, flush=True)
os.unlink(path + ".timing")
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        prunespec.save(model, path, methods=methods)
        os._exit(0)
    print("pid", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("status", status, flush=True)
"""


def big(fill: float) -> nn.Module:
    """The worker's model, with other weights (``fill``) than the worker's own (-1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.Linear(4096, 1024))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) * fill + i)
    return model


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], v) for k, v in b.items())


def temp_files(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.tmp-*"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the worker forks a child per round")
def test_a_killed_save_leaves_the_old_checkpoint(tmp_path: Path, methods: prunespec.MethodRegistry) -> None:
    path = tmp_path / "ckpt.pt"
    old = big(1.0)
    prunespec.save(old, path, methods=methods)
    old_state = {k: v.clone() for k, v in torch.load(path, weights_only=True)["state_dict"].items()}
    new = big(-1.0)
    prunespec.apply(
        new,
        {"version": 1, "rules": [{"select": {"names": ["0"]}, "method": "l1_unstructured", "amount": 0.5}]},
        methods=methods,
    )
    new_state = new.state_dict()

    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert worker.stdin is not None and worker.stdout is not None
    try:
        ready = worker.stdout.readline().split()
        assert ready and ready[0] == "ready", ready
        duration = float(ready[1])
        rng = random.Random(0)
        outcomes = []
        for _ in range(6):
            worker.stdin.write("save\n")
            worker.stdin.flush()
            pid = int(worker.stdout.readline().split()[1])
            time.sleep(rng.uniform(0.0, 1.2) * duration)
            with contextlib.suppress(ProcessLookupError):  # the save finished, and the worker reaped it
                os.kill(pid, signal.SIGKILL)
            status = int(worker.stdout.readline().split()[1])
            killed = os.WIFSIGNALED(status)
            loaded = torch.load(path, weights_only=True)["state_dict"]  # whatever happened, it loads
            same_as_old = same(loaded, old_state)
            same_as_new = same(loaded, new_state)
            assert same_as_old or same_as_new, "the checkpoint is neither the old one nor the new one"
            assert killed or same_as_new, "a save that finished must have replaced the file"
            leftovers = temp_files(tmp_path, path.name)
            outcomes.append((killed, same_as_old, bool(leftovers)))
            for leftover in leftovers:  # what a killed save leaves: its temporary file, named for the target
                assert leftover.parent == path.parent
                leftover.unlink()
            prunespec.save(old, path, methods=methods)  # the next round starts from the old file again
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)
    # at least one kill landed while the new file was half written: the old one survived it
    assert any(killed and old and leftover for killed, old, leftover in outcomes), outcomes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


# --- prunespec.files -----------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_and_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "out.bin"
    files.atomic_write_bytes(path, b"old")
    os.chmod(path, 0o640)

    def fails(file: object) -> None:
        assert hasattr(file, "write")
        file.write(b"half")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, fails)
    assert path.read_bytes() == b"old"
    assert not temp_files(tmp_path, path.name), "the temporary file is removed after a failure"

    files.atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640), "a rewritten file keeps its permissions"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_write_through_a_symlink_writes_its_target(tmp_path: Path) -> None:
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    files.atomic_write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: d / "missing" / "x.pt", "does not exist"),
        (lambda d: d, "is a folder"),
    ],
    ids=["no folder", "a folder"],
)
def test_check_writable_names_the_problem(tmp_path: Path, make: object, words: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(prunespec.PrunespecError, match=words):
        files.check_writable(path)
    with pytest.raises(prunespec.PrunespecError, match=words):
        files.atomic_write_bytes(path, b"x")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_check_writable_refuses_a_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(prunespec.PrunespecError, match="not writable"):
            files.check_writable(folder / "x.pt")
    finally:
        folder.chmod(0o700)


def test_save_to_a_missing_folder_is_an_error_and_writes_nothing(
    tmp_path: Path, methods: prunespec.MethodRegistry
) -> None:
    with pytest.raises(prunespec.PrunespecError, match="does not exist"):
        prunespec.save(nn.Linear(2, 2), tmp_path / "nope" / "x.pt", methods=methods)
    assert list(tmp_path.iterdir()) == []


def test_cli_checks_out_before_applying(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "version: 1\nrules:\n  - select: {types: [Linear]}\n    method: l1_unstructured\n    amount: 0.5\n",
        encoding="utf-8",
    )
    applied: list[object] = []
    real_apply = prunespec.api.apply
    monkeypatch.setattr(prunespec.api, "apply", lambda *a, **k: applied.append(a) or real_apply(*a, **k))
    out = tmp_path / "missing" / "pruned.pt"
    code = main(["apply", str(spec), "--model", f"{ROOT / 'examples' / 'lenet.py'}:make_lenet", "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{out}: the folder {out.parent} does not exist" in err, err
    assert applied == [], "the model was pruned before --out was found unusable"
