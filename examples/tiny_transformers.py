"""Pruning transformers models: tiny GPT-2, BERT and Llama with random weights (nothing is downloaded).

``tiny_gpt2()`` is a model factory for the command line::

    prunespec plan examples/specs/transformers/gpt2_prunable.yaml --model examples/tiny_transformers.py:tiny_gpt2
    prunespec apply examples/specs/transformers/gpt2_prunable.yaml \\
        --model examples/tiny_transformers.py:tiny_gpt2 --out gpt2-pruned.pt
    prunespec report gpt2-pruned.pt --model examples/tiny_transformers.py:tiny_gpt2

and ``python examples/tiny_transformers.py`` does the same from Python. For a real GPT-2, build the model
with ``GPT2LMHeadModel.from_pretrained("gpt2")`` instead: the spec does not change.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import prunespec

SPEC = Path(__file__).resolve().parent / "specs" / "transformers" / "gpt2_prunable.yaml"


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (64-wide, 128-token vocabulary) with weights drawn from ``seed``, in eval mode.

    Dropout is off, so forward passes are repeatable in train mode too. ``lm_head.weight`` is tied to
    ``transformer.wte.weight``, as in the real GPT-2.
    """
    transformers.logging.set_verbosity_error()
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> BertForMaskedLM:
    """A 2-layer BERT (64-wide, 128-token vocabulary, no dropout) with weights drawn from ``seed``."""
    transformers.logging.set_verbosity_error()
    config = BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertForMaskedLM(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (64-wide, 128-token vocabulary) with weights drawn from ``seed``."""
    transformers.logging.set_verbosity_error()
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    model = tiny_gpt2()
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    print(prunespec.plan(model, SPEC))  # what will be pruned; the model is not touched yet
    report = prunespec.apply(model, SPEC)
    print()
    print(report)
    with torch.no_grad():
        logits = model(tokens).logits  # the pruned model runs as before
    print(f"\nlogits {tuple(logits.shape)}, {len(report.tensors)} tensors pruned, {report.global_sparsity:.2%} sparse")


if __name__ == "__main__":
    main()
