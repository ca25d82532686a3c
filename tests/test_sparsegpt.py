"""sparsegpt: masks and reconstructed values against a plain OBS implementation (no lazy batches, no
Cholesky: explicit inverses of the remaining columns' Hessian, float64), reconstruction error against
wanda and magnitude on correlated inputs, exact counts, N:M, dtypes, Conv1D, the Hessian cache, options."""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import prune

import prunespec
from prunespec.methods import sparsegpt
from prunespec.methods.base import MaskContext
from prunespec.methods.sparsegpt import SparseGPT
from prunespec.methods.wanda import Wanda


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny matrices: thread start-up costs more than it saves, most of all on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Conv1D(nn.Module):
    """transformers' Conv1D as prunespec sees it: ``nf`` outputs, weight ``(in, out)``, ``x @ weight + bias``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / math.sqrt(nx))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def correlated(tokens: int, width: int, seed: int) -> torch.Tensor:
    """Inputs whose features are mixed by a random matrix: x = z @ A."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, width, generator=gen)
    return z @ torch.randn(width, width, generator=gen)


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 100)) / math.sqrt(cols)


def context(
    module: nn.Module, values: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor | None = None
) -> MaskContext:
    return MaskContext(
        name="layer.weight",
        module_name="layer",
        param="weight",
        module=module,
        values=values,
        mask=mask,
        options={},
        statistics={"input_gram": gram, "input_sq_norms": gram.diagonal().clone()},
    )


def linear(values: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(values.shape[1], values.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(values)
    return layer


def reference(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    amount: float | int | None = None,
    n: int | None = None,
    m: int | None = None,
    block: int | None = None,
    mask: torch.Tensor | None = None,
    dampening: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's algorithm, straightforwardly: columns one at a time, each pruned weight's error
    spread over its row's later columns with the inverse of the remaining columns' Hessian. Returns
    (kept, reconstructed weight with zeros where pruned)."""
    w = weight.double().clone()
    rows, cols = w.shape
    h = gram.double().clone()
    for j in range(cols):
        if h[j, j] == 0:
            h[j, j] = 1.0
    h += dampening * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    pruned = torch.zeros(rows, cols, dtype=torch.bool) if mask is None else mask == 0
    w[pruned] = 0.0
    # [H_F^-1]_jj, F the columns from j on: the paper's U_jj^2
    denominators = [torch.linalg.inv(h[j:, j:])[0, 0].item() for j in range(cols)]
    block = block or cols
    shares: dict[int, int] = {}
    if n is None:
        assert amount is not None
        left = int((~pruned).sum())
        k = amount if isinstance(amount, int) else round(amount * left)
        done = 0
        so_far = 0
        for start in range(0, cols, block):
            so_far += int((~pruned[:, start : start + block]).sum())
            upto = math.floor(Fraction(k * so_far, left) + Fraction(1, 2))
            shares[start] = upto - done
            done = upto
    for j in range(cols):
        if n is None and j in shares:
            current, done = w.tolist(), pruned.tolist()
            chosen = []
            for r in range(rows):
                for c in range(j, min(j + block, cols)):
                    if not done[r][c]:
                        chosen.append((current[r][c] ** 2 / denominators[c], r * cols + c, r, c))
            for *_, r, c in sorted(chosen)[: shares[j]]:
                pruned[r, c] = True
        if n is not None and m is not None and j % m == 0:
            current, done = w.tolist(), pruned.tolist()
            for r in range(rows):
                group = [
                    (-math.inf if done[r][c] else current[r][c] ** 2 / denominators[c], c) for c in range(j, j + m)
                ]
                for _, c in sorted(group)[: m - n]:
                    pruned[r, c] = True
        inverse = torch.linalg.inv(h[j:, j:])
        error = torch.where(pruned[:, j], w[:, j], 0.0) / inverse[0, 0]
        w[:, j:] -= torch.outer(error, inverse[0])
        w[pruned[:, j], j] = 0.0
    return ~pruned, w


def relative_error(x: torch.Tensor, w: torch.Tensor, pruned_w: torch.Tensor) -> float:
    dense = x @ w.T
    return float((dense - x @ pruned_w.T).pow(2).sum() / dense.pow(2).sum())


# --- against the plain algorithm -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "options"),
    [(0.5, {}), (0.3, {"block_size": 40}), (203, {}), (None, {"n": 2, "m": 4}), (None, {"n": 1, "m": 8})],
)
def test_whole_width_block_is_the_plain_algorithm(amount: float | int | None, options: dict[str, Any]) -> None:
    x = correlated(1500, 40, seed=1)
    gram = x.T @ x
    w = weights(12, 40, seed=1)
    before = w.clone()
    mask, values = SparseGPT(amount, **options).reconstruct(context(linear(w), w, gram))
    kept, expected = reference(w, gram, amount=amount, n=options.get("n"), m=options.get("m"))
    assert torch.equal(mask, kept.to(mask.dtype))
    assert torch.allclose((values * mask).double(), expected, atol=1e-5)
    assert torch.equal(values[mask == 0], before[mask == 0])  # pruned entries keep their old values
    assert torch.equal(w, before)  # ctx.values untouched


@pytest.mark.parametrize(
    ("amount", "options"),
    [(0.5, {"block_size": 8}), (0.6, {"block_size": 7}), (None, {"n": 2, "m": 4, "block_size": 6})],
)
def test_smaller_blocks_are_the_plain_algorithm_with_the_same_mask_blocks(
    amount: float | None, options: dict[str, Any]
) -> None:
    # lazy batches change nothing but rounding; the mask is chosen per block (N:M groups cross block ends)
    x = correlated(1500, 40, seed=2)
    gram = x.T @ x
    w = weights(10, 40, seed=2)
    mask, values = SparseGPT(amount, **options).reconstruct(context(linear(w), w, gram))
    block = None if "n" in options else options["block_size"]
    kept, expected = reference(w, gram, amount=amount, n=options.get("n"), m=options.get("m"), block=block)
    assert torch.equal(mask, kept.to(mask.dtype))
    assert torch.allclose((values * mask).double(), expected, atol=1e-5)
    ours = relative_error(x, w, values * mask)
    assert ours == pytest.approx(relative_error(x, w, expected.float()), rel=1e-3)


# --- better than the data-free and the data-aware mask alone ------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_error_below_wanda_and_magnitude(seed: int) -> None:
    x = correlated(2048, 128, seed)
    gram = x.T @ x
    w = weights(32, 128, seed)
    layer = linear(w)
    ctx = context(layer, w, gram)
    # 50 % unstructured: SparseGPT with blocks smaller than the width (as in use: 128 of thousands)
    mask, values = SparseGPT(0.5, block_size=32).reconstruct(ctx)
    assert int((mask == 0).sum()) == w.numel() // 2
    ours = relative_error(x, w, values * mask)
    wanda = relative_error(x, w, w * Wanda(0.5).mask(ctx))
    magnitude = relative_error(x, w, w * prune.L1Unstructured(0.5).compute_mask(w, torch.ones_like(w)))
    assert ours < 0.8 * min(wanda, magnitude), (ours, wanda, magnitude)
    # 2:4
    mask, values = SparseGPT(n=2, m=4).reconstruct(ctx)
    ours = relative_error(x, w, values * mask)
    wanda = relative_error(x, w, w * Wanda(n=2, m=4).mask(ctx))
    groups = w.abs().reshape(-1, 4)
    by_magnitude = torch.ones_like(groups).scatter_(1, torch.sort(groups, dim=1).indices[:, :2], 0.0)
    magnitude = relative_error(x, w, w * by_magnitude.reshape(w.shape))
    assert ours < 0.8 * min(wanda, magnitude), (ours, wanda, magnitude)


# --- counts and structure --------------------------------------------------------------------------


def earlier_mask(shape: tuple[int, int], fraction: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) >= fraction).to(torch.float32)


@pytest.mark.parametrize(("amount", "block_size"), [(0.3, 7), (0.5, 128), (37, 5), (0.0, 8)])
def test_exact_counts_over_an_earlier_mask(amount: float | int, block_size: int) -> None:
    x = correlated(800, 36, seed=3)
    gram = x.T @ x
    w = weights(9, 36, seed=3)
    earlier = earlier_mask((9, 36), 0.2, seed=3)
    left = int(earlier.sum())
    mask, values = SparseGPT(amount, block_size=block_size).reconstruct(context(linear(w), w, gram, earlier))
    assert int((mask == 0).sum()) == int((earlier == 0).sum()) + prunespec.masks.n_to_prune(amount, left)
    assert torch.all(mask[earlier == 0] == 0)  # earlier zeros stay
    assert torch.equal(values[mask == 0], w[mask == 0])
    assert mask.dtype == earlier.dtype
    # the sweep starts from the masked weight: earlier-pruned values are not compensated for again
    kept, expected = reference(w, gram, amount=amount, block=block_size, mask=earlier)
    assert torch.equal(mask, kept.to(mask.dtype))
    assert torch.allclose((values * mask).double(), expected, atol=1e-5)


def test_block_shares_are_rounded_cumulatively() -> None:
    # 5 blocks of 6 entries, 25 %: 1.5 each; rounding each block alone would prune 10, not round(7.5) = 8
    x = correlated(300, 10, seed=11)
    gram = x.T @ x
    w = weights(3, 10, seed=11)
    mask, _ = SparseGPT(0.25, block_size=2).reconstruct(context(linear(w), w, gram))
    assert (mask == 0).sum(dim=0).reshape(5, 2).sum(dim=1).tolist() == [2, 1, 2, 1, 2]
    kept, _ = reference(w, gram, amount=0.25, block=2)
    assert torch.equal(mask, kept.to(mask.dtype))


def test_a_count_larger_than_whats_left_is_refused() -> None:
    w = weights(4, 8, seed=0)
    x = correlated(100, 8, seed=0)
    with pytest.raises(ValueError, match="larger than the 32 units left"):
        SparseGPT(33).reconstruct(context(linear(w), w, x.T @ x))


def test_n_m_groups() -> None:
    x = correlated(800, 32, seed=4)
    gram = x.T @ x
    w = weights(8, 32, seed=4)
    dense_mask, _ = SparseGPT(n=2, m=4).reconstruct(context(linear(w), w, gram))
    assert torch.all((dense_mask.reshape(-1, 4) == 0).sum(dim=1) == 2)
    earlier = earlier_mask((8, 32), 0.4, seed=4)
    mask, values = SparseGPT(n=1, m=4, block_size=3).reconstruct(context(linear(w), w, gram, earlier))
    zeros_before = (earlier.reshape(-1, 4) == 0).sum(dim=1)
    assert torch.equal((mask.reshape(-1, 4) == 0).sum(dim=1), zeros_before.clamp(min=3))
    assert torch.all(mask[earlier == 0] == 0)
    kept, expected = reference(w, gram, n=1, m=4, mask=earlier)
    assert torch.equal(mask, kept.to(mask.dtype))
    assert torch.allclose((values * mask).double(), expected, atol=1e-5)


# --- dtypes and layouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_computed_in_float32(dtype: torch.dtype) -> None:
    x = correlated(600, 24, seed=5)
    gram = x.T @ x
    w = weights(8, 24, seed=5).to(dtype)
    mask, values = SparseGPT(0.5).reconstruct(context(linear(w.float()).to(dtype), w, gram))
    full_mask, full_values = SparseGPT(0.5).reconstruct(context(linear(w.float()), w.float(), gram))
    assert values.dtype == dtype and mask.dtype == dtype
    assert torch.equal(mask.float(), full_mask)
    assert torch.equal(values, full_values.to(dtype))


def test_conv1d_is_the_transposed_linear() -> None:
    x = correlated(700, 20, seed=6)
    gram = x.T @ x
    conv = Conv1D(nf=12, nx=20)
    w_in_out = conv.weight.detach()
    lin = linear(w_in_out.T.contiguous())
    for method in (SparseGPT(0.5, block_size=8), SparseGPT(n=2, m=4)):
        mask, values = method.reconstruct(context(conv, w_in_out, gram))
        lin_mask, lin_values = method.reconstruct(context(lin, lin.weight.detach(), gram))
        assert mask.shape == values.shape == (20, 12)
        assert values.stride() == w_in_out.stride()
        assert torch.equal(mask, lin_mask.T)
        assert torch.allclose(values, lin_values.T, atol=1e-6)


# --- the Hessian's factor ----------------------------------------------------------------------------


def test_one_cholesky_per_shared_hessian(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = torch.linalg.cholesky_ex

    def counting(a: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(a.shape[0])
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting)
    x = correlated(500, 16, seed=7)
    gram = x.T @ x
    q, k, v = (weights(8, 16, seed=s) for s in (1, 2, 3))
    results = [SparseGPT(0.5).reconstruct(context(linear(t), t, gram)) for t in (q, k, v)]
    assert len(calls) == 1
    # the same as with its own Hessian
    alone = SparseGPT(0.5).reconstruct(context(linear(k), k, gram.clone()))
    assert len(calls) == 2
    assert torch.equal(alone[0], results[1][0]) and torch.equal(alone[1], results[1][1])
    SparseGPT(0.5, dampening=0.1).reconstruct(context(linear(q), q, gram))
    assert len(calls) == 3  # another dampening, another factor
    gram.mul_(2.0)  # changed in place: not served from the cache
    SparseGPT(0.5).reconstruct(context(linear(q), q, gram))
    assert len(calls) == 4


def test_the_cache_forgets_a_freed_hessian_and_stays_small() -> None:
    sparsegpt._cache.clear()
    w = weights(4, 8, seed=8)
    grams = []
    for seed in range(8):
        x = correlated(100, 8, seed)
        grams.append(x.T @ x)
        SparseGPT(0.5).reconstruct(context(linear(w), w, grams[-1]))
    assert len(sparsegpt._cache) <= 4
    del grams, x
    gc.collect()
    assert len(sparsegpt._cache) == 0
    # a new Hessian, whatever its id, is factored afresh
    x = correlated(100, 8, seed=20)
    fresh = x.T @ x
    mask, values = SparseGPT(0.5).reconstruct(context(linear(w), w, fresh))
    kept, expected = reference(w, fresh, amount=0.5)
    assert torch.equal(mask, kept.to(mask.dtype))
    assert torch.allclose((values * mask).double(), expected, atol=1e-5)


def test_the_factor_is_the_dampened_inverses_upper_factor_and_leaves_the_hessian_alone() -> None:
    x = correlated(300, 12, seed=3)
    gram = x.T @ x
    gram[:, 5] = gram[5, :] = 0.0  # a dead input
    before = gram.clone()
    u = sparsegpt._factor(gram, 0.01, torch.device("cpu"), "layer.weight")
    assert torch.equal(gram, before)  # shared by the modules with this input
    h = before.double()
    h[5, 5] = 1.0
    h.diagonal().add_(0.01 * h.diagonal().mean())
    assert torch.equal(u, u.triu())
    assert torch.allclose((u.T @ u).double(), torch.linalg.inv(h), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("size", [1, 2, 5, 8, 13, 40])
@pytest.mark.parametrize("leaf", [1, 2, 3, 256])
def test_a_lower_triangular_matrix_is_inverted_in_place_blockwise(size: int, leaf: int) -> None:
    gen = torch.Generator().manual_seed(size)
    lower = torch.randn(size, size, generator=gen, dtype=torch.float64).tril()
    lower.diagonal().abs_().add_(1.0)  # well conditioned
    expected = torch.linalg.inv(lower)
    t = lower.clone()
    sparsegpt._invert_lower(t, leaf)  # the upper part stays zero
    assert torch.allclose(t, expected, rtol=1e-10, atol=1e-12) and torch.equal(t, t.tril())
    column_major = lower.mT.contiguous().mT  # the layout LAPACK leaves the factor in
    sparsegpt._invert_lower(column_major, leaf)
    assert torch.allclose(column_major, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [1, 2, 3, 6])
@pytest.mark.parametrize("chunk", [1, 4, 1 << 20])
def test_reverse_is_flip_in_place(size: int, chunk: int) -> None:
    t = torch.randn(size, size)
    expected = t.flip(0, 1)
    assert sparsegpt._reverse(t, chunk) is t
    assert torch.equal(t, expected)


def test_a_hessian_that_is_not_positive_definite_is_a_clear_error() -> None:
    w = weights(4, 6, seed=0)
    with pytest.raises(ValueError, match=r"Hessian of layer\.weight .* not positive definite.*raise dampening"):
        SparseGPT(0.5).reconstruct(context(linear(w), w, -torch.eye(6)))


def test_a_dead_input_keeps_its_weight_unless_pruned() -> None:
    x = correlated(800, 16, seed=9)
    x[:, 5] = 0.0  # never active
    gram = x.T @ x
    gram /= gram.diagonal().mean()  # a scale where the dead input's H_jj = 1 weighs in the dampening
    w = weights(10, 16, seed=9)
    mask, values = SparseGPT(4).reconstruct(context(linear(w), w, gram))
    assert int((mask == 0).sum()) == 4
    kept = mask[:, 5] == 1
    assert int(kept.sum()) >= 6  # 4 pruned in all: most of the 10 dead entries are kept
    assert torch.equal(values[kept, 5], w[kept, 5])  # not zeroed as the original script does
    expected_kept, expected = reference(w, gram, amount=4)
    assert torch.equal(mask, expected_kept.to(mask.dtype))
    assert torch.allclose((values * mask).double(), expected, atol=1e-5)
    mask, values = SparseGPT(n=2, m=4).reconstruct(context(linear(w), w, gram))
    assert torch.isfinite(values).all()
    assert torch.all((mask.reshape(-1, 4) == 0).sum(dim=1) == 2)
    kept = mask[:, 5] == 1
    assert torch.equal(values[kept, 5], w[kept, 5])


# --- the method's surface ----------------------------------------------------------------------------


def test_mask_is_reconstructs_mask_and_compute_mask_explains() -> None:
    x = correlated(300, 12, seed=10)
    w = weights(6, 12, seed=10)
    ctx = context(linear(w), w, x.T @ x)
    assert torch.equal(SparseGPT(0.4).mask(ctx), SparseGPT(0.4).reconstruct(ctx)[0])
    with pytest.raises(NotImplementedError, match="reconstruct"):
        SparseGPT(0.4).compute_mask(w, torch.ones_like(w))


def test_missing_or_misshapen_statistic() -> None:
    w = weights(4, 8, seed=0)
    bare = MaskContext("layer.weight", "layer", "weight", linear(w), w, None, {})
    with pytest.raises(ValueError, match=r"needs the input_gram statistic for layer\.weight"):
        SparseGPT(0.5).reconstruct(bare)
    with pytest.raises(ValueError, match=r"has shape \[4, 4\], expected \[8, 8\]"):
        SparseGPT(0.5).reconstruct(context(linear(w), w, torch.eye(4)))


def test_capabilities_and_registration() -> None:
    caps = SparseGPT.capabilities()
    assert caps.updates_values and caps.own_random and not caps.supports_global
    assert caps.statistics == ("input_gram",) and caps.unit == "entries" and caps.takes_amount
    assert SparseGPT.needs_amount({}) and not SparseGPT.needs_amount({"n": 2, "m": 4})
    assert prunespec.load_methods(builtins_only=True)["sparsegpt"].method is SparseGPT


def test_check_tensor() -> None:
    assert SparseGPT.check_tensor((8, 16), {}) is None
    assert SparseGPT.check_tensor((8, 16), {"n": 2, "m": 4}) is None
    assert "shape [2, 3, 4]" in (SparseGPT.check_tensor((2, 3, 4), {}) or "")
    assert "not a multiple of m=4" in (SparseGPT.check_tensor((8, 18), {"n": 2, "m": 4}) or "")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n": 4, "m": 4}, "n=4 must be smaller than m=4"),
        ({"n": 2}, "give both n and m"),
        ({"m": 4}, "give both n and m"),
        ({"n": 2, "m": 4, "block_size": 0}, "greater than or equal to 1"),
        ({"n": 2, "m": 4, "block_size": 2.0}, "valid integer"),
        ({"n": 2, "m": 4, "dampening": 0}, "greater than 0"),
        ({"n": 2, "m": 4, "dampening": math.inf}, "finite number"),
        ({"n": 2, "m": 4, "dampening": True}, "dampening must be a number"),
        ({"n": 2, "m": 4, "dampening": "0.1"}, "dampening must be a number"),
        ({"n": 2, "m": 4, "percdamp": 0.1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SparseGPT(**options)


def test_amount_with_n_m_or_neither_is_refused() -> None:
    with pytest.raises(ValueError, match="with n, m given, sparsegpt takes no amount"):
        SparseGPT(0.5, n=2, m=4)
    with pytest.raises(TypeError, match="amount must be a number"):
        SparseGPT()
    defaults = SparseGPT(0.5)
    assert (defaults.block_size, defaults.dampening, defaults.n, defaults.m) == (128, 0.01, None, None)
