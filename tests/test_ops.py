"""Every backend's exit head and compaction against the plain-torch reference, on fresh random
inputs and odd sizes; every exit criterion, temperature and patience state; decisions compared
away from the threshold; compaction bit-exact."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_branch_weights

from fastbert_kernels import ops
from fastbert_kernels.ops import EXIT_CRITERIA, FoldedWeights, compiled, reference

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


def _compare_exit_head(
    name: str,
    n: int,
    s: int,
    c: int,
    dtype: torch.dtype,
    device,
    r: int = 32,
    criterion: str = "entropy",
    temperature: float = 1.0,
    weights=None,
) -> None:
    hidden, mask, random_weights, heads = _inputs(n, s, c, dtype, r=r, device=device)
    weights = random_weights if weights is None else weights
    rule = dict(criterion=criterion, temperature=temperature)
    ref_logits, ref_u, _, ref_streak = reference.exit_head(hidden, mask, weights, heads, 0.5, **rule)
    speed = float(ref_u.median()) if n else 0.5  # a threshold that splits the batch
    logits, u, exits, streak = ops.exit_head(hidden, mask, weights.fold(heads, dtype), heads, speed, **rule)
    assert logits.shape == (n, c) and logits.dtype == torch.float32
    assert u.shape == (n,) and u.dtype == torch.float32
    assert exits.shape == (n,) and exits.dtype == torch.bool
    assert streak.shape == (n, 2) and streak.dtype == torch.int64
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)
    torch.testing.assert_close(u, ref_u, atol=tol, rtol=tol)
    assert ((u >= 0) & (u <= 1)).all()
    away = (ref_u - speed).abs() > 4 * tol  # decisions compared away from the threshold
    assert torch.equal(exits[away], (ref_u < speed)[away])
    assert torch.equal(exits, u < speed)  # patience 1: the decision is the kernel's own u < speed, exactly
    # The state: the argmax (where the top two are not a near tie) and 1 for a confident row, else 0.
    top2 = ref_logits.topk(min(2, c), dim=-1).values
    clear = (top2[:, 0] - top2[:, -1]) > 4 * tol if c > 1 else torch.ones(n, dtype=torch.bool)
    assert torch.equal(streak[clear, 0], ref_streak[clear, 0])
    assert torch.equal(streak[:, 1], exits.long())


@pytest.mark.parametrize("n,s,c", SIZES)
def test_exit_head_matches_reference(backend, device, n, s, c):
    _compare_exit_head(backend, n, s, c, torch.float32, device)


@pytest.mark.parametrize("criterion", EXIT_CRITERIA)
@pytest.mark.parametrize("temperature", [1.0, 0.3])
@pytest.mark.parametrize("n,s,c", [(1, 1, 2), (9, 17, 77), (33, 5, 150)])
def test_exit_criteria_match_reference(backend, device, criterion, temperature, n, s, c):
    # C = 150 spans two class tiles of the Triton tail: its online top-2 merges across tiles.
    _compare_exit_head(backend, n, s, c, torch.float32, device, criterion=criterion, temperature=temperature)


@pytest.mark.parametrize("criterion", EXIT_CRITERIA)
@pytest.mark.parametrize("c,tied", [(5, (1, 3)), (150, (20, 140)), (77, None)])
def test_exit_criteria_on_tied_logits(backend, device, criterion, c, tied):
    """Two classes with the same dominant logit (in different Triton tiles for C = 150): the argmax
    is the first of them, as torch.argmax's, and the margin is 0 (u = 1). ``tied=None``: every
    logit equal, the uniform distribution (u = 1 for entropy and margin, 1 - 1/C for max_prob)."""
    hidden, mask, weights, heads = _inputs(6, 7, c, device=device)
    w_cls, b_cls = weights.w_cls.clone(), weights.b_cls.clone()
    if tied is None:
        w_cls[:] = 0.0
        b_cls[:] = 0.25
        first = 0
    else:
        first, second = tied
        w_cls[second] = w_cls[first]
        b_cls[first] = b_cls[second] = 80.0  # far above every other class's logit
    weights = weights._replace(w_cls=w_cls, b_cls=b_cls)
    out = ops.exit_head(hidden, mask, weights.fold(heads), heads, 1.0, criterion)
    assert (out.streak[:, 0] == first).all()
    # Two tied classes hold all the mass: p = (1/2, 1/2); uniform: p = 1/C everywhere.
    expected = {
        "entropy": 1.0 if tied is None else math.log(2) / math.log(c),
        "max_prob": 1 - 1 / c if tied is None else 0.5,
        "margin": 1.0,
    }[criterion]
    torch.testing.assert_close(out.uncertainty, torch.full_like(out.uncertainty, expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("criterion", EXIT_CRITERIA)
@pytest.mark.parametrize("patience", [1, 2, 3])
def test_patience_state_matches_reference(backend, device, criterion, patience):
    """A random state from the previous student (some rows agreeing with this one's argmax):
    the new streak and the exits equal the reference's, exactly, away from the threshold."""
    n, c = 40, 7
    hidden, mask, weights, heads = _inputs(n, 9, c, device=device)
    ref = reference.exit_head(hidden, mask, weights, heads, 0.5, criterion)
    speed = float(ref.uncertainty.median())
    agree = torch.rand(n, device=device) < 0.6
    previous_argmax = torch.where(agree, ref.logits.argmax(-1), torch.randint(0, c, (n,), device=device))
    previous = torch.stack([previous_argmax, torch.randint(0, 4, (n,), device=device)], dim=1)
    expected = reference.exit_head(hidden, mask, weights, heads, speed, criterion, 1.0, patience, previous)
    got = ops.exit_head(hidden, mask, weights.fold(heads), heads, speed, criterion, 1.0, patience, previous)
    top2 = expected.logits.topk(2, dim=-1).values
    away = ((expected.uncertainty - speed).abs() > 1e-3) & ((top2[:, 0] - top2[:, 1]) > 1e-3)
    assert away.sum() > n // 2
    assert torch.equal(got.streak[away], expected.streak[away])
    assert torch.equal(got.exits[away], expected.exits[away])
    if patience > 1:  # the state matters: some rows that are confident now still stay
        confident = got.uncertainty < speed  # about half the rows: speed is the median
        assert confident.sum() >= n // 4
        assert (got.exits != confident).any()


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
    got = ops.exit_head(hidden, mask, weights.fold(heads), heads, 0.5)
    torch.testing.assert_close(got[0], expected[0], atol=2e-4, rtol=2e-4)


def test_exit_head_speed_bounds(backend, device):
    hidden, mask, weights, heads = _inputs(9, 11, 3, device=device)
    folded = weights.fold(heads)
    assert not ops.exit_head(hidden, mask, folded, heads, 0.0).exits.any()  # u >= 0: nobody
    _, u, exits, _ = ops.exit_head(hidden, mask, folded, heads, 1.0)
    assert torch.equal(exits, u < 1.0)


@pytest.mark.parametrize("criterion", EXIT_CRITERIA)
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf", "fp16 overflow"])
@pytest.mark.parametrize("c", [3, 150])
def test_non_finite_rows_never_exit(backend, device, criterion, poison, c):
    """Rows whose hidden states hold NaN or inf (or overflow float16) get NaN logits. On every
    backend, as in the reference, such a row is not confident: u is NaN, it does not exit, and its
    patience state is reset to [0, 0] (a row with a streak of 2 would otherwise leave at patience
    2). Its neighbours are untouched. C = 150 spans two class tiles of the Triton tail."""
    n, s = 9, 6
    dtype = torch.float16 if poison == "fp16 overflow" else torch.float32
    hidden, mask, weights, heads = _inputs(n, s, c, dtype, device=device)
    bad = torch.zeros(n, dtype=torch.bool, device=device)
    bad[torch.randperm(n)[:3]] = True
    if poison == "fp16 overflow":  # a layer output past float16's range: inf, then inf - inf = NaN
        hidden[bad] = (torch.randn(int(bad.sum()), s, HIDDEN, device=device) * 1e5).to(dtype)
    elif poison == "nan":  # one element of the CLS token, which every row's query reads whatever its mask
        hidden[bad, 0, 3] = float("nan")
    else:  # the whole CLS token: W_in x then sums infinities of both signs (one alone tanh would absorb)
        hidden[bad, 0, :] = float(poison)
    # Every row confident and agreeing with this student at the previous one: a finite row leaves here.
    prediction = reference.exit_head(hidden, mask, weights, heads, 1.0, criterion).logits.argmax(-1)
    previous = torch.stack([prediction, torch.full_like(prediction, 5)], dim=1)
    rule = dict(criterion=criterion, temperature=1.0, patience=2, streak=previous)
    expected = reference.exit_head(hidden, mask, weights, heads, 1.0, **rule)
    got = ops.exit_head(hidden, mask, weights.fold(heads, dtype), heads, 1.0, **rule)
    assert torch.equal(expected.uncertainty.isnan(), bad)  # the poison reached the reference's logits
    assert torch.equal(got.uncertainty.isnan(), bad)
    assert not got.exits[bad].any()
    assert torch.equal(got.streak[bad], torch.zeros(int(bad.sum()), 2, dtype=torch.int64, device=device))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.logits[~bad], expected.logits[~bad], atol=tol, rtol=tol)
    torch.testing.assert_close(got.uncertainty[~bad], expected.uncertainty[~bad], atol=tol, rtol=tol)
    assert torch.equal(got.exits[~bad], got.uncertainty[~bad] < 1.0)


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
    out = ops.compact(hidden, mask, rows, keep, trim)
    got, padded, changed = out[:3], out.padded, out.changed
    assert changed == (not (bool(keep.all()) and got[0].shape[1] == s))
    # carry: any other per-row tensor follows the same rows (the patience state does).
    assert torch.equal(
        out.carry(torch.arange(n, device=device)),
        keep.nonzero().flatten() if changed else torch.arange(n, device=device),
    )
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
    with pytest.raises(TypeError, match="FoldedWeights"):
        ops.exit_head(hidden, mask, weights, heads, 0.5)
    weights = weights.fold(heads)
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
    with pytest.raises(TypeError, match="w_in must have hidden's dtype"):
        ops.exit_head(hidden.half(), mask, weights, heads, 0.5)
    with pytest.raises(ValueError, match="unknown exit criterion 'top1'; known: entropy, max_prob, margin"):
        ops.exit_head(hidden, mask, weights, heads, 0.5, "top1")
    with pytest.raises(ValueError, match="temperature must be positive"):
        ops.exit_head(hidden, mask, weights, heads, 0.5, "entropy", 0.0)
    with pytest.raises(ValueError, match="patience must be at least 1"):
        ops.exit_head(hidden, mask, weights, heads, 0.5, "entropy", 1.0, 0)
    with pytest.raises(TypeError, match="patience must be an int"):
        ops.exit_head(hidden, mask, weights, heads, 0.5, "entropy", 1.0, 2.0)
    with pytest.raises(ValueError, match="streak must be int64"):
        ops.exit_head(hidden, mask, weights, heads, 0.5, "entropy", 1.0, 2, torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="inference-only"):
        ops.exit_head(hidden.requires_grad_(), mask, weights, heads, 0.5)
    with pytest.raises(ValueError, match="keep must be bool"):
        ops.compact(hidden, mask, torch.arange(3), torch.ones(3), True)
    with pytest.raises(ValueError, match="rows must be int64"):
        ops.compact(hidden, mask, torch.arange(2), torch.ones(3, dtype=torch.bool), True)


@pytest.mark.skipif(compiled.LOAD_ERROR is not None, reason="C++ extension not built")
def test_cpp_checks_name_the_problem(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "extension")
    ops.backends.ensure_registered(torch.device("cpu"))
    hidden, mask, weights, heads = _inputs(3, 5, 2)
    folded = weights.fold(heads)
    exit_head = torch.ops.fastbert.exit_head
    with pytest.raises(RuntimeError, match="w_qk must have shape"):
        exit_head(hidden, mask, list(folded._replace(w_qk=folded.w_qk[:5])), heads, 0.5)
    with pytest.raises(RuntimeError, match="weights must hold the 10 folded tensors"):
        exit_head(hidden, mask, list(folded)[:9], heads, 0.5)
    with pytest.raises(RuntimeError, match="mask must be Long"):
        exit_head(hidden, mask.int(), list(folded), heads, 0.5)
    with pytest.raises(RuntimeError, match="unknown exit criterion 'top1'; known: entropy,max_prob,margin"):
        exit_head(hidden, mask, list(folded), heads, 0.5, "top1")
    with pytest.raises(RuntimeError, match="temperature must be positive"):
        exit_head(hidden, mask, list(folded), heads, 0.5, "margin", -1.0)
    with pytest.raises(RuntimeError, match="patience must be at least 1"):
        exit_head(hidden, mask, list(folded), heads, 0.5, "margin", 1.0, 0)
    with pytest.raises(RuntimeError, match="streak must have shape"):
        exit_head(hidden, mask, list(folded), heads, 0.5, "margin", 1.0, 2, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="keep must be Bool"):
        torch.ops.fastbert.compact_plan(torch.ones(3), mask, True)
    index, _ = torch.ops.fastbert.compact_plan(torch.ones(3, dtype=torch.bool), mask, True)
    with pytest.raises(RuntimeError, match="count must be in"):
        torch.ops.fastbert.compact_gather(hidden, mask, torch.arange(3), index, 4, 5)


@pytest.mark.skipif(not ops.BACKENDS["triton"].available()[0], reason="triton not available here")
def test_triton_launcher_checks_name_the_problem(monkeypatch):
    """The registered op on the Triton backend, past the Python wrapper: the launcher checks what the
    C++ binding checks, so that a float64 or strided weight is refused instead of misread."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    ops.backends.ensure_registered(device)
    hidden, mask, weights, heads = _inputs(3, 5, 2, device=device)
    folded = weights.fold(heads)
    exit_head = torch.ops.fastbert.exit_head
    with pytest.raises(TypeError, match=r"w_pool must be torch\.float32, got torch\.float64"):
        exit_head(hidden, mask, list(folded._replace(w_pool=folded.w_pool.double())), heads, 0.5)
    with pytest.raises(ValueError, match="w_ov must be contiguous"):
        exit_head(hidden, mask, list(folded._replace(w_ov=folded.w_ov.t().contiguous().t())), heads, 0.5)
    with pytest.raises(ValueError, match=r"w_qk must have shape \[64, 32\]"):
        exit_head(hidden, mask, list(folded._replace(w_qk=folded.w_qk[:5])), heads, 0.5)
    with pytest.raises(TypeError, match=r"w_in must be torch\.float16"):
        exit_head(hidden.half(), mask, list(folded), heads, 0.5)
    with pytest.raises(ValueError, match="speed must be in"):
        exit_head(hidden, mask, list(folded), heads, 1.5)
    with pytest.raises(ValueError, match=r"empty sequence axis \(S = 0\)"):
        exit_head(hidden[:, :0].contiguous(), mask[:, :0].contiguous(), list(folded), heads, 0.5)


def test_forced_backend_fails_loudly(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "nonsense")
    with pytest.raises(ops.BackendUnavailableError, match="not a backend"):
        ops.select_backend(torch.device("cpu"))
    monkeypatch.setenv(ops.ENV_VAR, "reference")  # an earlier name: the error says the new one
    with pytest.raises(ops.BackendUnavailableError, match="now 'torch'"):
        ops.select_backend(torch.device("cpu"))
    # An op call reports it too (importing never does).
    monkeypatch.setenv(ops.ENV_VAR, "nonsense")
    hidden, mask, weights, heads = _inputs(2, 3, 2)
    with pytest.raises(ops.BackendUnavailableError, match="not a backend"):
        ops.exit_head(hidden, mask, weights.fold(heads), heads, 0.5)


def test_automatic_choice_on_cpu(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    expected = "extension" if compiled.LOAD_ERROR is None else "torch"
    assert ops.select_backend(torch.device("cpu")).name == expected


def test_forced_backend_is_the_one_that_runs(monkeypatch):
    """The environment variable changes the dispatcher's kernel at the next call, and back."""
    hidden, mask, weights, heads = _inputs(3, 5, 2)
    folded = weights.fold(heads)
    names = ["torch", *(["extension"] if compiled.LOAD_ERROR is None else [])]
    for name in [*names, *reversed(names)]:
        monkeypatch.setenv(ops.ENV_VAR, name)
        ops.exit_head(hidden, mask, folded, heads, 0.5)
        assert ops.backends.active_backend("cpu") == name


def test_op_contract_is_written_once_per_language():
    """The folded weights' order: Python's FoldedWeights fields, the C++ X-macro (reported by the
    extension), the schema's single Tensor[] and the fake. The dispatcher checks each C++ kernel's
    signature against the schema when the extension loads (LOAD_ERROR otherwise)."""
    from fastbert_kernels.ops.library import SCHEMAS

    assert "Tensor[] weights" in SCHEMAS["exit_head"]
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.fastbert, name).default._schema) == f"fastbert::{schema}"


@pytest.mark.skipif(
    compiled.LOAD_ERROR is not None and "schema" not in compiled.LOAD_ERROR,
    reason="C++ extension not built (a schema mismatch at load would still fail this test)",
)
def test_extension_unpacks_weights_and_names_criteria_as_python_does():
    assert compiled.LOAD_ERROR is None, compiled.LOAD_ERROR
    names = [n for n in compiled.BUILD_INFO["folded_weights"].split(",") if n]
    assert names == list(FoldedWeights._fields)
    criteria = [n for n in compiled.BUILD_INFO["exit_criteria"].split(",") if n]
    assert criteria == list(EXIT_CRITERIA)


def test_opcheck_exit_head(backend, device):
    hidden, mask, weights, heads = _inputs(5, 7, 3, device=device)
    ops.backends.ensure_registered(hidden.device)
    folded = list(weights.fold(heads))
    torch.library.opcheck(torch.ops.fastbert.exit_head.default, (hidden, mask, folded, heads, 0.5))
    streak = torch.stack([torch.randint(0, 3, (5,)), torch.randint(0, 3, (5,))], dim=1).to(device)
    torch.library.opcheck(
        torch.ops.fastbert.exit_head.default, (hidden, mask, folded, heads, 0.7, "margin", 0.5, 2, streak)
    )


def test_opcheck_compact(backend, device):
    hidden, mask, _, _ = _inputs(5, 7, 3, device=device)
    keep = torch.tensor([True, False, True, True, False], device=device)
    ops.backends.ensure_registered(hidden.device)
    torch.library.opcheck(torch.ops.fastbert.compact_plan.default, (keep, mask, True))
    index, stats = torch.ops.fastbert.compact_plan(keep, mask, True)
    count, length, _ = stats.tolist()
    torch.library.opcheck(
        torch.ops.fastbert.compact_gather.default, (hidden, mask, torch.arange(5, device=device), index, count, length)
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
