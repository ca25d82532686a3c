"""Prune an FSDP2-sharded model on every rank at once, without gathering a weight.

    torchrun --nproc-per-node 2 examples/distributed.py            # CPU ranks (gloo)
    torchrun --nproc-per-node 4 examples/distributed.py --spec examples/specs/distributed/mlp.yaml

Every rank builds the same model, shards it with ``fully_shard``, and calls ``prunespec.apply`` with
the same spec: each rank prunes its own rows, the global cut is found from counts summed over ranks,
and each mask is a DTensor sharded like its weight. Rank 0 prints the report.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import prunespec

SPEC = {
    "version": 1,
    "rules": [
        {
            "name": "global-50",
            "select": {"types": ["Linear"]},
            "scope": "global",
            "method": "l1_unstructured",
            "amount": 0.5,
        }
    ],
}


def build() -> nn.Module:
    """The example's MLP, the same weights on every rank (seed 0), before sharding."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", help="a spec file (default: 50% of every Linear, globally)")
    args = parser.parse_args()
    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    model = build()
    if torch.cuda.is_available():
        model = model.cuda()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    report = prunespec.apply(model, args.spec or SPEC)
    if rank == 0:
        print(f"{dist.get_world_size()} ranks")
        print(report)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
