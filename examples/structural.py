"""Structural pruning end to end: plan, prune by coupled groups, shrink, save, load into a fresh model.

A small Llama (random weights, built from a config) loses half of each MLP's width, half of its KV
heads and a quarter of its layers (``specs/structural/llama.yaml``); a ResNet-50-shaped network loses
half of its channels (``specs/structural/resnet.yaml``). Each shrunk model computes what the masked
one did, and its checkpoint loads into a freshly built model of the original architecture.

    python examples/structural.py
    prunespec plan examples/specs/structural/llama.yaml --model examples/structural.py:small_llama \\
        --data examples/structural.py:token_batches
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo

import prunespec

SPECS = Path(__file__).resolve().parent / "specs" / "structural"


def small_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    """A 4-layer Llama, 128 wide, 8 query heads sharing 4 KV heads, MLP width 384."""
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        num_hidden_layers=4,
        hidden_size=128,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=384,
        vocab_size=256,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def token_batches() -> list[dict[str, torch.Tensor]]:
    """Four calibration batches of random token ids (a real run uses text from the model's domain)."""
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 256, (2, 32), generator=generator)} for _ in range(4)]


def small_resnet() -> nn.Module:
    """A ResNet-50-shaped network at a quarter of the width, one bottleneck per stage."""
    torch.manual_seed(0)
    return zoo.resnet50_shaped(num_classes=10, width=16, layers=(1, 1, 1, 1)).eval()


def image_batches() -> list[torch.Tensor]:
    """Example inputs: the channel groups are traced from the first."""
    return [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))]


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    for make, spec, data in ((small_llama, "llama.yaml", token_batches), (small_resnet, "resnet.yaml", image_batches)):
        model, batches = make(), data()
        dense = parameters(model)
        print(prunespec.plan(model, SPECS / spec, data=batches))  # the groups, before anything changes
        report = prunespec.apply(model, SPECS / spec, data=batches)  # masks, then shrink (checked)
        print()
        print(report.shrink)
        prunespec.save(model, folder / "shrunk.pt")  # the shrink is recorded with the weights
        fresh = make(seed=1) if make is small_llama else make()
        prunespec.load(fresh, folder / "shrunk.pt")  # shrunk the same way, then loaded
        example = batches[0]
        with torch.no_grad():
            same = torch.equal(
                *(m(**example).logits if isinstance(example, dict) else m(example) for m in (model, fresh))
            )
        print(f"\n{dense:,} -> {parameters(model):,} parameters; a fresh model loads it: {same}\n")


if __name__ == "__main__":
    main()
