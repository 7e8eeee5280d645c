"""Every backend's exit head and compaction against the plain-torch reference, on fresh random
inputs and odd sizes; decisions compared away from the threshold; compaction bit-exact."""

from __future__ import annotations

import pytest
import torch
from helpers import random_branch_weights

from fastbert_kernels import ops
from fastbert_kernels.ops import BACKENDS, reference

# (rows N, sequence S, classes C): covers N in {0, 1, 7, 129}, S in {1, 128}, C in {2, 3, 77}.
SIZES = [(0, 5, 2), (1, 1, 3), (1, 128, 77), (7, 128, 2), (7, 1, 77), (129, 128, 3), (129, 1, 2)]
HIDDEN = 48  # not a power of two on purpose
# Logit tolerance per hidden dtype: the kernels run the H -> R projection in that dtype (as torch
# would), the reference in float32; float32 differs only by the folded summation order.
TOLERANCE = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _inputs(n: int, s: int, c: int, dtype=torch.float32, r: int = 32, heads: int = 2):
    hidden = torch.randn(n, s, HIDDEN).to(dtype)
    lengths = torch.randint(1, s + 1, (n,))
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    # Left-padded rows too: the CLS token is then masked as a key, which the math must handle.
    left = torch.rand(n) < 0.25
    mask[left] = mask[left].flip(1)
    return hidden, mask, random_branch_weights(HIDDEN, r, c, dtype), heads


def _compare_exit_head(name: str, n: int, s: int, c: int, dtype: torch.dtype) -> None:
    hidden, mask, weights, heads = _inputs(n, s, c, dtype)
    ref_logits, ref_u, _ = reference.exit_head(hidden, mask, weights, heads, 0.5)
    speed = float(ref_u.median()) if n else 0.5  # a threshold that splits the batch
    logits, u, exits = BACKENDS[name].exit_head(hidden, mask, weights, heads, speed)
    assert logits.shape == (n, c) and logits.dtype == torch.float32
    assert u.shape == (n,) and u.dtype == torch.float32
    assert exits.shape == (n,) and exits.dtype == torch.bool
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)
    torch.testing.assert_close(u, ref_u, atol=tol, rtol=tol)
    away = (ref_u - speed).abs() > 4 * tol  # decisions compared away from the threshold
    assert torch.equal(exits[away], (ref_u < speed)[away])
    assert torch.equal(exits, u < speed)  # the decision is the kernel's own u < speed, exactly


@pytest.mark.parametrize("n,s,c", SIZES)
def test_exit_head_matches_reference(backend, n, s, c):
    _compare_exit_head(backend, n, s, c, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,s,c", [(7, 33, 3), (1, 1, 77)])
def test_exit_head_low_precision(backend, dtype, n, s, c):
    _compare_exit_head(backend, n, s, c, dtype)


@pytest.mark.parametrize("r,heads", [(32, 1), (48, 3), (128, 2)])
def test_exit_head_branch_shapes(backend, r, heads):
    hidden, mask, _, _ = _inputs(5, 19, 4)
    weights = random_branch_weights(HIDDEN, r, 4)
    expected = reference.exit_head(hidden, mask, weights, heads, 0.5)
    got = BACKENDS[backend].exit_head(hidden, mask, weights, heads, 0.5)
    torch.testing.assert_close(got[0], expected[0], atol=2e-4, rtol=2e-4)


def test_exit_head_speed_bounds(backend):
    hidden, mask, weights, heads = _inputs(9, 11, 3)
    assert not BACKENDS[backend].exit_head(hidden, mask, weights, heads, 0.0)[2].any()  # u >= 0: nobody
    _, u, exits = BACKENDS[backend].exit_head(hidden, mask, weights, heads, 1.0)
    assert torch.equal(exits, u < 1.0)


@pytest.mark.parametrize("n,s", [(0, 4), (1, 1), (7, 128), (129, 9)])
@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_bit_exact(backend, n, s, trim, dtype):
    hidden = torch.randn(n, s, HIDDEN).to(dtype)
    lengths = torch.randint(1, s + 1, (n,))
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    rows = torch.randperm(max(n, 1) * 3)[:n]
    keep = torch.rand(n) < 0.5
    expected = reference.compact(hidden, mask, rows, keep, trim)
    got = BACKENDS[backend].compact(hidden, mask, rows, keep, trim)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert torch.equal(g, e)
    if n:
        kept = keep.nonzero().flatten()
        assert torch.equal(got[2], rows[kept])  # order kept, nothing lost or duplicated
        if trim and kept.numel():
            assert got[0].shape[1] == int(lengths[kept].max())


def test_compact_all_and_none(backend):
    hidden, mask, _, _ = _inputs(6, 10, 2)
    rows = torch.arange(6)
    everyone = BACKENDS[backend].compact(hidden, mask, rows, torch.ones(6, dtype=torch.bool), False)
    assert torch.equal(everyone[0], hidden) and torch.equal(everyone[2], rows)
    # Nothing changes, so nothing is copied (and the model keeps its layer mask).
    assert all(o is i for o, i in zip(everyone, (hidden, mask, rows), strict=True))
    nobody = BACKENDS[backend].compact(hidden, mask, rows, torch.zeros(6, dtype=torch.bool), True)
    assert nobody[0].shape[0] == 0 and nobody[2].numel() == 0


def test_public_ops_check_inputs():
    hidden, mask, weights, heads = _inputs(3, 5, 2)
    with pytest.raises(ValueError, match="hidden must be"):
        ops.exit_head(hidden[0], mask, weights, heads, 0.5)
    with pytest.raises(TypeError, match="mask must be int64"):
        ops.exit_head(hidden, mask.bool(), weights, heads, 0.5)
    with pytest.raises(ValueError, match="mask must be"):
        ops.exit_head(hidden, mask[:, :2], weights, heads, 0.5)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.exit_head(hidden.double(), mask, weights, heads, 0.5)
    with pytest.raises(ValueError, match="not divisible"):
        ops.exit_head(hidden, mask, weights, 5, 0.5)
    with pytest.raises(ValueError, match="w_in"):
        ops.exit_head(hidden[..., :7].contiguous(), mask, weights, heads, 0.5)
    with pytest.raises(ValueError, match="keep must be bool"):
        ops.compact(hidden, mask, torch.arange(3), torch.ones(3), True)
    with pytest.raises(ValueError, match="rows must be int64"):
        ops.compact(hidden, mask, torch.arange(2), torch.ones(3, dtype=torch.bool), True)


@pytest.mark.skipif(not BACKENDS["cpu"].available()[0], reason="C++ extension not built")
def test_cpp_checks_name_the_problem():
    hidden, mask, weights, heads = _inputs(3, 5, 2)
    folded = weights.fold(heads)
    with pytest.raises(RuntimeError, match="w_qk must have shape"):
        torch.ops.fastbert_C.exit_head_folded(hidden, mask, *folded._replace(w_qk=folded.w_qk[:5]), heads, 0.5)
    with pytest.raises(RuntimeError, match="mask must be Long"):
        torch.ops.fastbert_C.exit_head_folded(hidden, mask.int(), *folded, heads, 0.5)
    with pytest.raises(RuntimeError, match="keep must be Bool"):
        torch.ops.fastbert_C.compact(hidden, mask, torch.arange(3), torch.ones(3), True)


def test_forced_backend_fails_loudly(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "nonsense")
    with pytest.raises(ops.BackendUnavailableError, match="not a backend"):
        ops.select_backend(torch.device("cpu"))
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.select_backend(torch.device("cpu"))


def test_automatic_choice_on_cpu(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    expected = "cpu" if BACKENDS["cpu"].available()[0] else "reference"
    assert ops.select_backend(torch.device("cpu")).name == expected


def test_folded_weights_refold_after_update():
    hidden, mask, weights, heads = _inputs(4, 6, 3)
    before = ops.exit_head(hidden, mask, weights, heads, 0.5)[0]
    with torch.no_grad():
        weights.w_cls.mul_(2.0)  # in place: same storage, new version
    after = ops.exit_head(hidden, mask, weights, heads, 0.5)[0]
    torch.testing.assert_close(after, reference.exit_head(hidden, mask, weights, heads, 0.5)[0], atol=2e-4, rtol=2e-4)
    assert not torch.allclose(before, after)


def test_folded_weights_do_not_outlive_their_tensors():
    import gc

    from fastbert_kernels.ops import folding

    folding.clear()
    hidden, mask, weights, heads = _inputs(3, 5, 2)
    ops.exit_head(hidden, mask, weights, heads, 0.5)
    assert folding.cache_size() == 1
    # A cache hit needs the same tensor objects: equal values in new tensors are folded anew.
    copy = type(weights)(*(t.clone() for t in weights))
    ops.exit_head(hidden, mask, copy, heads, 0.5)
    assert folding.cache_size() == 2
    del weights, copy
    gc.collect()
    # Entries die with their tensors, so a new tensor at a reused address can never hit them.
    assert folding.cache_size() == 0


def test_opcheck_exit_head():
    hidden, mask, weights, heads = _inputs(5, 7, 3)
    torch.library.opcheck(torch.ops.fastbert.exit_head.default, (hidden, mask, *weights, heads, 0.5))


def test_opcheck_compact():
    hidden, mask, _, _ = _inputs(5, 7, 3)
    keep = torch.tensor([True, False, True, True, False])
    torch.library.opcheck(
        torch.ops.fastbert.compact.default,
        (hidden, mask, torch.arange(5), keep, True),
        test_utils=("test_schema", "test_faketensor"),
    )
