"""A small language-model workbench for the data-aware benchmarks: corpus, tokenizer, Llama, training, evaluation.

Shared by ``perplexity.py`` and ``calibration.py`` and imported by both the main venv and the
llm-compressor peer venv, so it uses only torch, transformers and the standard library (no prunespec).
Nothing is downloaded: the text is the Python standard library's own ``.py`` sources.

* **Corpus** (:func:`load_corpus`): every ``.py`` file under the stdlib directory (``sysconfig``'s
  ``stdlib`` path), except ``site-packages``/``dist-packages`` and test directories (``test``,
  ``tests``, ``idle_test``), in sorted order of their relative POSIX paths. Each file goes to one split
  by the SHA-256 of its relative path (not by position, so adding a file moves no other file):
  5% calibration, 5% held-out, the rest train. The splits never share a file. The corpus fingerprint
  (a hash of every path and its bytes) is part of the training cache key, so another Python version
  trains its own model.
* **Tokenizer**: bytes are tokens ``0..255``; :data:`PAD_ID` (256) pads, so the vocabulary is 257.
* **Model** (:func:`build_llama`): ``LlamaForCausalLM`` from an :class:`LMConfig`, random init after
  ``torch.manual_seed(seed)``, untied ``lm_head``, KV cache off.
* **Training** (:func:`trained_llama`): AdamW on random windows of the train split, a fixed seed,
  linear warm-up then cosine decay; the weights are cached under :data:`CACHE_DIR` (git-ignored),
  keyed by the model config, the training settings and the corpus fingerprint.
* **Calibration** (:func:`calibration_batches`): ``n`` windows of ``seq`` tokens evenly spaced over the
  calibration split, in batches of ``{"input_ids", "attention_mask"}``; the last batches are padded
  on the right (random lengths from a fixed generator, ``attention_mask`` 0 and :data:`PAD_ID` on padding).
* **Evaluation** (:func:`perplexity`): ``exp`` of the mean next-token NLL over the positions whose
  target is a real (unpadded) token, under ``torch.no_grad()``.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import math
import os
import sysconfig
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

PAD_ID = 256
VOCAB_SIZE = 257
CACHE_DIR = Path(os.environ.get("PRUNESPEC_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SPLIT_SHARES = {"calibration": 5, "heldout": 5}  # percent of files; the rest is train
CACHE_FORMAT = 1
Batch = dict[str, torch.Tensor]


# --- corpus ------------------------------------------------------------------------------------------


def stdlib_dir() -> Path:
    """The standard library's source directory (where ``os.py`` lives)."""
    path = Path(sysconfig.get_paths()["stdlib"])
    if not (path / "os.py").is_file():
        import inspect

        path = Path(inspect.getfile(os)).parent
    return path


def corpus_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the corpus's ``.py`` files under ``root`` (default: the stdlib), sorted."""
    root = stdlib_dir() if root is None else root
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        found.append(rel.as_posix())
    return sorted(found)


def split_of(rel: str) -> str:
    """``"calibration"``, ``"heldout"`` or ``"train"`` for a file, from the SHA-256 of its relative path."""
    bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") % 100
    if bucket < SPLIT_SHARES["calibration"]:
        return "calibration"
    if bucket < SPLIT_SHARES["calibration"] + SPLIT_SHARES["heldout"]:
        return "heldout"
    return "train"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Token ids (uint8 tensors: one byte each) of the three splits, with where they came from."""

    train: torch.Tensor
    calibration: torch.Tensor
    heldout: torch.Tensor
    files: Mapping[str, int]  # split -> number of files
    root: str
    fingerprint: str

    def describe(self) -> str:
        parts = [f"{name} {self.files[name]} files / {len(getattr(self, name)):,} bytes" for name in SPLITS]
        return f"stdlib .py sources of {self.root} ({'; '.join(parts)}; fingerprint {self.fingerprint[:12]})"


SPLITS = ("train", "calibration", "heldout")


@functools.lru_cache(maxsize=2)
def load_corpus(root: str | None = None) -> Corpus:
    """Read the corpus (about 12 MB for CPython 3.11) and split it by file; each file ends with a newline."""
    base = stdlib_dir() if root is None else Path(root)
    chunks: dict[str, list[bytes]] = {name: [] for name in SPLITS}
    digest = hashlib.sha256()
    for rel in corpus_files(base):
        data = (base / rel).read_bytes()
        if not data.endswith(b"\n"):
            data += b"\n"
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        chunks[split_of(rel)].append(data)
    tensors = {name: encode(b"".join(parts)) for name, parts in chunks.items()}
    files = {name: len(parts) for name, parts in chunks.items()}
    return Corpus(**tensors, files=files, root=str(base), fingerprint=digest.hexdigest())


# --- tokenizer -----------------------------------------------------------------------------------------


def encode(data: bytes | str) -> torch.Tensor:
    """Bytes (UTF-8 for a str) to token ids, a uint8 tensor (cast with ``.long()`` to feed a model)."""
    raw = data.encode() if isinstance(data, str) else data
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)


def decode(ids: Iterable[int] | torch.Tensor) -> bytes:
    """Token ids back to bytes; :data:`PAD_ID` is dropped."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(int(i) for i in values if int(i) != PAD_ID)


# --- model ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A Llama's shape; the vocabulary is the bytes plus :data:`PAD_ID`."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 688
    max_positions: int = 256


SMALL = LMConfig()  # the trained model of perplexity.py and calibration.py's quality setting
LARGE = LMConfig(hidden=1024, layers=8, heads=16, kv_heads=16, intermediate=2816, max_positions=512)  # speed


def llama_config(cfg: LMConfig) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,
        attention_dropout=0.0,
    )


def build_llama(cfg: LMConfig, seed: int = 0) -> Any:
    """A ``LlamaForCausalLM`` with random weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
    import transformers
    from transformers import LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    config = llama_config(cfg)
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    return model.eval()


def load_llama(path: str | os.PathLike[str]) -> Any:
    """A model saved with ``save_pretrained``, in float32 and eval mode."""
    import transformers
    from transformers import LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return resident(model)


def resident(model: nn.Module) -> nn.Module:
    """``model`` with every parameter and buffer in the process's own memory, as a model built or trained
    in it is. ``from_pretrained`` maps safetensors files: a weight's pages are read in, and then counted
    in the RSS, only when something first touches them, which a memory benchmark would then charge to
    whatever ran first (up to the whole model)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    gc.collect()
    return model


def byte_chars() -> dict[int, str]:
    """The printable character byte-level BPE tokenizers (GPT-2's, ``tokenizers``' ``ByteLevel``) show
    for each byte: printable Latin-1 bytes stand for themselves, the others for ``chr(256 + k)`` in order."""
    direct = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)}
    chars, extra = {}, 0
    for b in range(256):
        if b in direct:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def hf_tokenizer() -> Any:
    """:func:`encode` as a transformers tokenizer (byte-level BPE without merges: id = byte value, pad
    :data:`PAD_ID`), for tools that insist on loading one from the model's directory (llm-compressor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in byte_chars().items()}
    vocab["<pad>"] = PAD_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def save_llama(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """``save_pretrained`` (safetensors) plus the byte tokenizer (:func:`hf_tokenizer`), into ``path``."""
    model.save_pretrained(str(path))
    hf_tokenizer().save_pretrained(str(path))


class _seeded:
    """Seed torch's global RNG for a block and restore its state afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.random.set_rng_state(self.state)


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules inside the decoder blocks (``model.layers.*``): not ``lm_head``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]


DECODER_LINEARS = {"types": ["Linear"], "names": [r"re:model\.layers\..*"]}  # a prunespec ``select``


def prunespec_spec(method: str, setting: str) -> dict[str, Any]:
    """A prunespec spec (a plain mapping) of one rule over :func:`decoder_linears`: ``sparsity`` for
    ``"50%"``/``"70%"``, ``options: {n: 2, m: 4}`` (2 of every 4 kept) for ``"2:4"``."""
    rule: dict[str, Any] = {"select": DECODER_LINEARS, "method": method}
    if setting == "2:4":
        rule["options"] = {"n": 2, "m": 4}
    else:
        rule["sparsity"] = int(setting.rstrip("%")) / 100
    return {"version": 1, "rules": [rule]}


def sparsity(model: nn.Module) -> float:
    """The fraction of zeros over the weights of :func:`decoder_linears` (the effective, masked weights)."""
    zeros = total = 0
    for _, module in decoder_linears(model):
        weight = module.weight.detach()
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0


# --- training ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A short AdamW run on random windows of the train split (the same windows for the same seed)."""

    steps: int = 200
    batch: int = 16
    seq: int = 128
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0


def cache_key(cfg: LMConfig, train: TrainConfig, corpus: Corpus, seed: int) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "model": dataclasses.asdict(cfg),
        "train": dataclasses.asdict(train),
        "corpus": corpus.fingerprint,
        "init_seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def train_llama(
    cfg: LMConfig, train: TrainConfig, corpus: Corpus, seed: int = 0, log: Callable[[str], None] = print
) -> tuple[Any, dict[str, Any]]:
    """Train a fresh model (see :class:`TrainConfig`); returns it in eval mode and a summary."""
    model = build_llama(cfg, seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=train.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < train.warmup:
            return (step + 1) / train.warmup
        progress = (step - train.warmup) / max(1, train.steps - train.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(train.seed)
    data = corpus.train
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(train.steps):
        starts = torch.randint(0, len(data) - train.seq, (train.batch,), generator=generator)
        ids = torch.stack([data[s : s + train.seq] for s in starts.tolist()]).long()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.clip)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == train.steps - 1:
            log(f"  step {step + 1}/{train.steps}: loss {losses[-1]:.3f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    tail = losses[-20:]
    info = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss": sum(tail) / len(tail),
        "torch": torch.__version__,
    }
    return model, info


def trained_llama(
    cfg: LMConfig = SMALL,
    train: TrainConfig | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Any, dict[str, Any]]:
    """The model :func:`train_llama` gives, from the cache when it holds one for exactly these settings."""
    train = TrainConfig() if train is None else train
    corpus = load_corpus()
    cache_dir = CACHE_DIR if cache_dir is None else cache_dir
    key = cache_key(cfg, train, corpus, seed)
    weights, meta = cache_dir / f"llama-{key}.pt", cache_dir / f"llama-{key}.json"
    if weights.is_file() and meta.is_file():
        model = build_llama(cfg, seed)
        model.load_state_dict(torch.load(weights, weights_only=True))
        info = json.loads(meta.read_text())
        info["cached"] = str(weights)
        return model.eval(), info
    log(f"training {cfg} with {train} (cached afterwards as {weights})")
    model, info = train_llama(cfg, train, corpus, seed, log)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, weights)
    meta.write_text(json.dumps({**info, "model": dataclasses.asdict(cfg), "train_config": dataclasses.asdict(train)}))
    info["cached"] = None
    return model, info


# --- calibration and evaluation data -------------------------------------------------------------------


def windows(data: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """``n`` non-overlapping windows of ``seq`` tokens evenly spaced over ``data``, as int64 ``(n, seq)``."""
    if n * seq > len(data):
        raise ValueError(f"{n} windows of {seq} tokens need {n * seq:,} tokens; the split has {len(data):,}")
    stride = len(data) // n
    return torch.stack([data[i * stride : i * stride + seq] for i in range(n)]).long()


def calibration_batches(
    data: torch.Tensor, n: int, seq: int, batch_size: int = 4, padded_batches: int | None = None, seed: int = 0
) -> list[Batch]:
    """``n`` calibration sequences of ``seq`` tokens in batches of ``batch_size``.

    The last ``padded_batches`` batches (default: a quarter of them, at least one when there are two or
    more) are padded on the right: each of their sequences keeps a random length in ``[seq // 4, seq)``
    (a generator seeded with ``seed``), the rest is :data:`PAD_ID` with ``attention_mask`` 0.
    """
    ids = windows(data, n, seq)
    count = math.ceil(n / batch_size)
    if padded_batches is None:
        padded_batches = count // 4 if count >= 4 else (1 if count >= 2 else 0)
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(count):
        chunk = ids[b * batch_size : (b + 1) * batch_size].clone()
        mask = torch.ones_like(chunk)
        if b >= count - padded_batches:
            lengths = torch.randint(max(1, seq // 4), seq, (len(chunk),), generator=generator)
            for row, length in enumerate(lengths.tolist()):
                chunk[row, length:] = PAD_ID
                mask[row, length:] = 0
        batches.append({"input_ids": chunk, "attention_mask": mask})
    return batches


def eval_batches(data: torch.Tensor, n: int, seq: int, batch_size: int = 8) -> list[Batch]:
    """``n`` held-out windows of ``seq`` tokens (no padding) in batches of ``batch_size``."""
    ids = windows(data, n, seq)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(batch_size)]


def tokens(batches: Sequence[Batch]) -> int:
    """Real (unpadded) tokens in ``batches``."""
    return sum(int(b["attention_mask"].sum()) for b in batches)


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Batch]) -> float:
    """``exp`` of the mean next-token NLL over positions whose target is a real token (mask 1)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:]
            keep = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
            nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
            total += float(nll)
            count += int(keep.sum())
    finally:
        model.train(was_training)
    return math.exp(total / count) if count else float("nan")


def save_data(path: str | os.PathLike[str], **splits: Sequence[Batch]) -> None:
    """Write lists of batches (e.g. ``calibration=..., heldout=...``) for another process to load."""
    torch.save({name: [dict(b) for b in batches] for name, batches in splits.items()}, path)


def load_data(path: str | os.PathLike[str]) -> dict[str, list[Batch]]:
    """Read what :func:`save_data` wrote (``weights_only=True``: tensors, lists and dicts only)."""
    data = torch.load(path, weights_only=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of batch lists, got {type(data).__name__}")
    return data
