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


def _inputs(n: int, s: int, c: int, dtype=torch.float32, r: int = 32, heads: int = 2, device="cpu"):
    hidden = torch.randn(n, s, HIDDEN).to(dtype)
    lengths = torch.randint(1, s + 1, (n,))
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    # Left-padded rows too: the CLS token is then masked as a key, which the math must handle.
    left = torch.rand(n) < 0.25
    mask[left] = mask[left].flip(1)
    weights = random_branch_weights(HIDDEN, r, c, dtype)
    return hidden.to(device), mask.to(device), type(weights)(*(t.to(device) for t in weights)), heads


def _compare_exit_head(name: str, n: int, s: int, c: int, dtype: torch.dtype, device, r: int = 32) -> None:
    hidden, mask, weights, heads = _inputs(n, s, c, dtype, r=r, device=device)
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
def test_exit_head_matches_reference(backend, device, n, s, c):
    _compare_exit_head(backend, n, s, c, torch.float32, device)


@pytest.mark.parametrize("r,c", [(384, 3), (128, 1000), (768, 257)])
def test_exit_head_wide_branches_and_many_classes(backend, device, r, c):
    # Widths and class counts whose untiled Triton tail overflowed shared memory on an A100/H100.
    _compare_exit_head(backend, 5, 4, c, torch.float32, device, r=r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,s,c", [(7, 33, 3), (1, 1, 77)])
def test_exit_head_low_precision(backend, device, dtype, n, s, c):
    _compare_exit_head(backend, n, s, c, dtype, device)


@pytest.mark.parametrize("r,heads", [(32, 1), (48, 3), (128, 2)])
def test_exit_head_branch_shapes(backend, device, r, heads):
    hidden, mask, _, _ = _inputs(5, 19, 4, device=device)
    weights = type(w := random_branch_weights(HIDDEN, r, 4))(*(t.to(device) for t in w))
    expected = reference.exit_head(hidden, mask, weights, heads, 0.5)
    got = BACKENDS[backend].exit_head(hidden, mask, weights, heads, 0.5)
    torch.testing.assert_close(got[0], expected[0], atol=2e-4, rtol=2e-4)


def test_exit_head_speed_bounds(backend, device):
    hidden, mask, weights, heads = _inputs(9, 11, 3, device=device)
    assert not BACKENDS[backend].exit_head(hidden, mask, weights, heads, 0.0)[2].any()  # u >= 0: nobody
    _, u, exits = BACKENDS[backend].exit_head(hidden, mask, weights, heads, 1.0)
    assert torch.equal(exits, u < 1.0)


@pytest.mark.parametrize("n,s", [(0, 4), (1, 1), (7, 128), (129, 9)])
@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_bit_exact(backend, device, n, s, trim, dtype):
    hidden = torch.randn(n, s, HIDDEN).to(dtype)
    lengths = torch.randint(1, s + 1, (n,))
    mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    # Some left-padded rows: padding is then not only at the end of a row.
    left = torch.rand(n) < 0.25
    mask[left] = mask[left].flip(1)
    rows = torch.randperm(max(n, 1) * 3)[:n]
    keep = torch.rand(n) < 0.5
    hidden, mask, rows, keep = (t.to(device) for t in (hidden, mask, rows, keep))
    expected = reference.compact(hidden, mask, rows, keep, trim)
    *got, padded = BACKENDS[backend].compact(hidden, mask, rows, keep, trim)
    for g, e in zip(got, expected[:3], strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype and g.device == hidden.device
        assert torch.equal(g, e)
    kept = keep.nonzero().flatten()
    if n:
        assert torch.equal(got[2], rows[kept])  # order kept, nothing lost or duplicated
        if trim and kept.numel():
            assert got[0].shape[1] == max(int(mask[i].nonzero().max()) + 1 for i in kept.tolist())
    # padded: some kept row has a masked column within the kept length, computed independently.
    assert padded == expected[3] == bool((got[1] == 0).any())


def test_compact_all_and_none(backend, device):
    hidden, mask, _, _ = _inputs(6, 10, 2, device=device)
    rows = torch.arange(6, device=device)
    everyone = ops.compact(hidden, mask, rows, torch.ones(6, dtype=torch.bool, device=device), False)
    assert torch.equal(everyone.hidden, hidden) and torch.equal(everyone.rows, rows)
    # Nothing changes, so nothing is copied (and the model keeps its layer mask).
    assert not everyone.changed
    assert all(o is i for o, i in zip(everyone[:3], (hidden, mask, rows), strict=True))
    nobody = ops.compact(hidden, mask, rows, torch.zeros(6, dtype=torch.bool, device=device), True)
    assert nobody.changed and nobody.hidden.shape[0] == 0 and nobody.rows.numel() == 0
    assert nobody.padded is False


@pytest.mark.parametrize("trim", [True, False])
def test_compact_single_token_sequences(backend, device, trim):
    # S = 1: Triton specialises an integer argument equal to 1 into a constant (a compile error
    # in the plan kernel once); the interpreter runs it, the AOT test compiles it.
    hidden, mask, _, _ = _inputs(5, 1, 2, device=device)
    keep = torch.tensor([True, False, True, True, False], device=device)
    out = ops.compact(hidden, mask, torch.arange(5, device=device), keep, trim)
    assert out.hidden.shape == (3, 1, HIDDEN) and out.padded is False
    assert torch.equal(out.hidden, hidden[keep])


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


def test_cuda_build_runs_only_where_it_has_code():
    """Machine code for sm_XY runs on the same major version with minor >= Y; the newest
    architecture's PTX runs on anything newer; older GPUs get a clear "unavailable"."""
    from fastbert_kernels.ops.compiled import runs_on_capability

    archs = [80, 90]
    assert runs_on_capability((8, 0), archs) and runs_on_capability((8, 6), archs) and runs_on_capability((8, 9), archs)
    assert runs_on_capability((9, 0), archs)
    assert runs_on_capability((10, 0), archs) and runs_on_capability((12, 0), archs)  # PTX of sm_90
    assert not runs_on_capability((7, 5), archs)
    assert not runs_on_capability((8, 0), [90])
    assert not runs_on_capability((9, 0), [])
