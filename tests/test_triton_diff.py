"""The fused Triton differential kernel equals the reference, forward and backward (issue #8).

Without a GPU the kernels run under the Triton interpreter. TRITON_INTERPRET=1 must be set before
*triton itself* is first imported (its own library functions, e.g. ``tl.zeros``, are decorated at
import); this module sets it at collection time, and when another test module of the same session
imported triton earlier (torch._dynamo does), this module skips and
``tests/test_triton_isolated.py`` runs it in a fresh process. With a GPU the same tests run the
compiled kernels on CUDA tensors. A couple of tiny shapes run by default;
the larger ones are marked slow. Run: .venv/bin/python -m pytest tests/test_triton_diff.py -q [-m slow]
"""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is an optional package (pip install 'diffattn[triton]')")

from diffattn import ModelConfig, build_model  # noqa: E402
from diffattn.model import kernels, triton_diff  # noqa: E402
from helpers import assert_same_outputs_and_grads  # noqa: E402 (tests/helpers.py)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY = triton_diff.unavailable_reason(torch.device(DEVICE))
if _WHY:  # an environment reason, never unfinished work
    if DEVICE == "cpu" and triton_diff._INTERPRET_TOO_LATE:  # triton came in before TRITON_INTERPRET could be set
        _WHY += "; tests/test_triton_isolated.py runs these tests in a fresh process instead"
    pytest.skip(_WHY, allow_module_level=True)


@pytest.fixture(autouse=True)
def _no_silent_fallback():
    """Every test here must run the fused kernels: a call that fell back to sdpa fails the test (the fallback tests
    below clear what they provoked)."""
    triton_diff._FAILED.clear()
    yield
    failed = dict(triton_diff._FAILED)
    triton_diff._FAILED.clear()
    assert not failed, f"the fused kernel fell back to sdpa: {failed}"


def reference(q1, q2, k1, k2, v, lam, scale, causal):
    """(softmax(Q1K1ᵀs) − λ softmax(Q2K2ᵀs))V in float64 with explicit GQA repetition (methods.md §1.5)."""
    n_rep = q1.shape[1] // k1.shape[1]
    k1, k2, v = (x.double().repeat_interleave(n_rep, dim=1) for x in (k1, k2, v))

    def softmax(q, k):
        s = q.double() @ k.transpose(-1, -2) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return s.softmax(-1)

    return (softmax(q1, k1) - lam.double() * softmax(q2, k2)) @ v


def make_inputs(b, h, hkv, t, d, dtype, s=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = t if s is None else s
    mk = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()  # noqa: E731
    q1, q2 = mk(b, h, t, d), mk(b, h, t, d)
    k1, k2 = mk(b, hkv, s, d), mk(b, hkv, s, d)
    v = mk(b, hkv, s, 2 * d)
    lam = torch.tensor(0.37, device=DEVICE, requires_grad=True)
    return q1, q2, k1, k2, v, lam


def check_fwd_bwd(b, h, hkv, t, d, causal, dtype=torch.float32, tol=2e-5):
    inputs = make_inputs(b, h, hkv, t, d, dtype, seed=t * d + h)
    scale = d ** -0.5
    out = triton_diff.differential(*inputs, is_causal=causal, scale=scale)
    ref = reference(*inputs, scale, causal)
    assert out.shape == (b, h, t, 2 * d) and out.dtype == dtype
    # relative error; a gradient that is exactly 0 in theory (T = 1: dQ) is judged on an absolute scale
    rel = lambda a, r: ((a.double() - r).norm() / r.norm().clamp_min(1.0)).item()  # noqa: E731
    assert rel(out, ref) < tol
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    got = torch.autograd.grad(out, inputs, g.to(dtype))
    want = torch.autograd.grad(ref, inputs, g)
    for name, a, r in zip(("q1", "q2", "k1", "k2", "v", "λ"), got, want):
        assert a.shape == r.shape
        assert rel(a, r) < tol, (name, rel(a, r))


# ---------------------------------------------------------------------------------------------- default (fast)
@pytest.mark.parametrize("b,h,hkv,t,d,causal", [
    (2, 4, 2, 37, 16, True),  # GQA (n_rep 2), odd length, several query/key tiles
    (1, 3, 1, 21, 64, True),  # MQA-style group of 3, head_dim 64
    (1, 2, 2, 19, 128, True),  # head_dim 128
    (1, 2, 1, 13, 24, False),  # non-causal, head_dim not a power of two (padded tile)
])
def test_fused_equals_reference_fp32(b, h, hkv, t, d, causal):
    check_fwd_bwd(b, h, hkv, t, d, causal)


@pytest.mark.parametrize("n_split", [1, 3, None])
def test_decode_equals_full_forward(n_split):
    """The split-key decode path for the last query row equals the full causal forward's last row."""
    q1, q2, k1, k2, v, lam = (x.detach() for x in make_inputs(2, 4, 2, 45, 16, torch.float32, seed=5))
    full = triton_diff.differential(q1, q2, k1, k2, v, lam, is_causal=True, scale=0.25)
    last = triton_diff.decode(q1[:, :, -1:], q2[:, :, -1:], k1, k2, v, lam, scale=0.25, n_split=n_split)
    torch.testing.assert_close(last, full[:, :, -1:], rtol=1e-5, atol=1e-6)
    # and the entry point routes a single row without autograd to the decode kernels
    via_entry = triton_diff.differential(q1[:, :, -1:], q2[:, :, -1:], k1, k2, v, lam, is_causal=False, scale=0.25)
    torch.testing.assert_close(via_entry, last, rtol=1e-6, atol=1e-7)


def tiny_config(attention="diff_v1", **kw):
    base = dict(attention=attention, vocab_size=31, d_model=64, n_layer=2, n_head=2, n_kv_head=1, head_dim=16,
                max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def twins(cfg, seed):
    """(the model with kernel='eager', the same weights with kernel='triton')."""
    torch.manual_seed(seed)
    eager = build_model(cfg).to(DEVICE)
    fused = build_model(cfg.replace(kernel="triton")).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


@pytest.mark.parametrize("attention", ["diff_v1", "shared_diff"])
def test_model_triton_equals_eager_forward_and_grads(attention):
    extra = dict(shared_init="random") if attention == "shared_diff" else {}
    cfg = tiny_config(attention, kernel="eager", **extra)
    eager, fused = twins(cfg, 0)
    ids = torch.randint(0, cfg.vocab_size, (2, 23), device=DEVICE)
    assert_same_outputs_and_grads(fused, eager, ids, out_tol=(1e-4, 1e-5), grad_tol=(1e-3, 1e-5))


def test_model_generate_with_cache_equals_eager():
    """Prefill (fused causal) then decode steps (split-key decode kernels) equal the eager model."""
    cfg = tiny_config(kernel="eager")
    eager, fused = twins(cfg, 1)
    eager, fused = eager.eval(), fused.eval()
    prompt = torch.randint(0, cfg.vocab_size, (2, 9), device=DEVICE)
    with torch.no_grad():
        cached = fused.generate(prompt, max_new_tokens=6)
        assert torch.equal(cached, eager.generate(prompt, max_new_tokens=6))
        # logits of the cached decode equal a full forward over the whole sequence
        torch.testing.assert_close(fused(cached)[:, -1], eager(cached)[:, -1], rtol=1e-4, atol=1e-5)


def test_explicit_mask_falls_back_to_generic_path(monkeypatch):
    """Left-padded batches carry an explicit mask: the fused entry declines and the variant's two SDPA
    calls serve it, equal to eager."""
    calls = []
    real = kernels.triton_differential

    def spy(*a, **kw):
        out = real(*a, **kw)
        calls.append(out is None)
        return out

    monkeypatch.setattr(kernels, "triton_differential", spy)
    cfg = tiny_config(kernel="eager")
    eager, fused = twins(cfg, 2)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    torch.testing.assert_close(fused(ids, attention_mask=mask), eager(ids, attention_mask=mask), rtol=1e-4, atol=1e-5)
    assert calls and all(calls)  # every layer asked, every layer declined


def test_diff_v2_uses_the_standard_gqa_path(monkeypatch):
    """kernel='triton' gives DIFF V2 (and standard) the ordinary grouped-query SDPA call: the fused
    differential kernel is never called, and the result is bit-identical to kernel='sdpa'."""
    def boom(*a, **kw):
        raise AssertionError("diff_v2 must not call the differential kernel")

    monkeypatch.setattr(kernels, "triton_differential", boom)
    assert kernels.get_kernel("triton").attend_fn is kernels.sdpa_attention
    for attention in ("diff_v2", "standard"):
        torch.manual_seed(3)
        cfg = tiny_config(attention, kernel="sdpa", head_dim=None, n_head=4, n_kv_head=2)
        ref = build_model(cfg).to(DEVICE)
        tri = build_model(cfg.replace(kernel="triton")).to(DEVICE)
        tri.load_state_dict(ref.state_dict())
        ids = torch.randint(0, cfg.vocab_size, (2, 11), device=DEVICE)
        assert torch.equal(tri(ids), ref(ids))


def test_errors():
    q1, q2, k1, k2, v, lam = (x.detach() for x in make_inputs(1, 2, 1, 5, 16, torch.float32))
    with pytest.raises(ValueError, match="values"):
        triton_diff.differential(q1, q2, k1, k2, v[..., :16], lam, scale=1.0)
    with pytest.raises(ValueError, match="kernel 'triton' takes one of"):
        triton_diff.differential(*(x.double() for x in (q1, q2, k1, k2, v)), lam, scale=1.0)
    with pytest.raises(ValueError, match="as many queries as keys"):
        triton_diff.differential(q1[:, :, :2], q2[:, :, :2], k1, k2, v, lam, is_causal=True, scale=1.0)
    assert triton_diff.differential(q1, q2, k1, k2, v, lam, mask=torch.ones(5, 5, dtype=torch.bool), scale=1.0) is None


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_diff, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in triton_diff.unavailable_reason(torch.device("cpu"))
    assert "kernel='sdpa'" in triton_diff.unavailable_reason(torch.device("cpu"))
    if DEVICE == "cpu":
        q = torch.randn(1, 1, 4, 16)
        with pytest.raises(ValueError, match="runs on CUDA tensors"):
            triton_diff.differential(q, q, q, q, torch.randn(1, 1, 4, 32), torch.tensor(0.5), scale=1.0)


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("b,h,hkv,t,causal", [(2, 4, 2, 67, True), (1, 6, 2, 50, False), (1, 2, 2, 1, True)])
def test_fused_equals_reference_fp32_more_shapes(b, h, hkv, t, d, causal):
    check_fwd_bwd(b, h, hkv, t, d, causal)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_fused_half_precision(dtype, d):
    """bf16/fp16: relative error within the half-precision range (fp32 accumulation inside)."""
    check_fwd_bwd(1, 4, 2, 33, d, True, dtype=dtype, tol=2e-2 if dtype == torch.bfloat16 else 4e-3)


@pytest.mark.slow
def test_decode_long_context_many_splits():
    q1, q2, k1, k2, v, lam = (x.detach() for x in make_inputs(1, 8, 2, 300, 64, torch.float32, seed=9))
    full = triton_diff.differential(q1, q2, k1, k2, v, lam, is_causal=True, scale=0.125)
    last = triton_diff.decode(q1[:, :, -1:], q2[:, :, -1:], k1, k2, v, lam, scale=0.125, n_split=7)
    torch.testing.assert_close(last, full[:, :, -1:], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_real_shapes_bf16(d):
    """On a GPU: the issue's shape class (T=1024 here to keep it short), bf16, fwd+bwd."""
    check_fwd_bwd(2, 8, 4, 1024, d, True, dtype=torch.bfloat16, tol=2e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_nn_layer_with_the_triton_kernel_equals_eager(causal):
    """diffattn.nn.DiffAttention(kernel="triton") runs the fused kernel (GPU, or the interpreter on CPU) and equals
    the eager layer, bidirectional and causal, self- and cross-attention (issue #17)."""
    from diffattn import nn as dnn

    torch.manual_seed(9)
    eager = dnn.DiffAttention(64, 2, num_kv_heads=1, causal=causal, rope=10000.0, kernel="eager").to(DEVICE)
    fused = dnn.DiffAttention(64, 2, num_kv_heads=1, causal=causal, rope=10000.0, kernel="triton").to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 12, 64, device=DEVICE)
    torch.testing.assert_close(fused(x)[0], eager(x)[0], rtol=1e-4, atol=1e-5)
    if not causal:
        mem = torch.randn(2, 9, 64, device=DEVICE)
        torch.testing.assert_close(fused(x, mem)[0], eager(x, mem)[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- never kills a run
class _Unlaunchable:
    """Stands in for a jit kernel whose compilation fails on this target (issue #26, item 3)."""

    def __init__(self, err):
        self.err = err

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise self.err
        return launch


def _out_of_resources():
    from triton.runtime.errors import OutOfResources

    return OutOfResources(2 * 232448, 232448, "shared memory")


def test_forward_that_cannot_compile_falls_back_to_sdpa_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(triton_diff, "_fwd_kernel", _Unlaunchable(_out_of_resources()))
    inputs = make_inputs(2, 4, 2, 11, 16, torch.float32, seed=4)
    with caplog.at_level(logging.WARNING, logger="diffattn.triton"):
        assert triton_diff.differential(*inputs, is_causal=True, scale=0.25) is None
        assert triton_diff.differential(*inputs, is_causal=True, scale=0.25) is None  # remembered: not retried
        out, _ = kernels.get_kernel("triton").attend_differential(*inputs, is_causal=True, scale=0.25)
    lines = [r.getMessage() for r in caplog.records if r.name == "diffattn.triton"]
    assert len(lines) == 1 and "OutOfResources" in lines[0] and "using sdpa" in lines[0], lines
    ref = reference(*inputs, 0.25, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out.sum(), inputs)
    want = torch.autograd.grad(ref.sum(), inputs)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w.double(), rtol=1e-4, atol=1e-5)
    triton_diff._FAILED.clear()


def test_backward_that_cannot_compile_recomputes_its_gradients_through_sdpa(monkeypatch, caplog):
    monkeypatch.setattr(triton_diff, "_bwd_dk_kernel", _Unlaunchable(RuntimeError("unsupported target sm_75")))
    inputs = make_inputs(1, 2, 1, 13, 16, torch.float32, seed=6)
    with caplog.at_level(logging.WARNING, logger="diffattn.triton"):
        out = triton_diff.differential(*inputs, is_causal=True, scale=0.25)  # the forward kernel works
        got = torch.autograd.grad(out.sum(), inputs)
    assert any("backward" in r.getMessage() and "unsupported target" in r.getMessage() for r in caplog.records)
    ref = reference(*inputs, 0.25, True)
    for a, w in zip(got, torch.autograd.grad(ref.sum(), inputs)):
        torch.testing.assert_close(a.double(), w.double(), rtol=1e-4, atol=1e-5)


def test_model_with_an_unlaunchable_kernel_still_trains_and_equals_eager(monkeypatch):
    monkeypatch.setattr(triton_diff, "_fwd_kernel", _Unlaunchable(_out_of_resources()))
    cfg = tiny_config(kernel="eager")
    eager, fused = twins(cfg, 0)
    ids = torch.randint(0, cfg.vocab_size, (2, 10), device=DEVICE)
    out = fused(ids)
    torch.testing.assert_close(out, eager(ids), rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in fused.parameters() if p.requires_grad)
    assert triton_diff._FAILED  # the fallback served it
    triton_diff._FAILED.clear()


def test_fp32_on_a_gpu_is_routed_to_sdpa(monkeypatch, caplog):
    monkeypatch.setattr(triton_diff, "INTERPRET", False)
    assert "sdpa" in triton_diff.route_reason(torch.float32, torch.device("cuda"))
    assert triton_diff.route_reason(torch.bfloat16, torch.device("cuda")) is None
    assert triton_diff.route_reason(torch.float16, torch.device("cuda")) is None
    monkeypatch.setattr(triton_diff, "INTERPRET", True)
    assert triton_diff.route_reason(torch.float32, torch.device("cpu")) is None  # the interpreter runs fp32
    monkeypatch.setattr(triton_diff, "route_reason", lambda dtype, device: "fp32 on a GPU is routed to sdpa")
    inputs = [x.detach() for x in make_inputs(1, 2, 1, 5, 16, torch.float32)]
    with caplog.at_level(logging.WARNING, logger="diffattn.triton"):
        for _ in range(3):
            assert triton_diff.differential(*inputs, is_causal=True, scale=0.25) is None
    assert len([r for r in caplog.records if "routed to sdpa" in r.getMessage()]) <= 1


def test_launch_table_covers_every_kernel_and_target():
    for kernel in ("fwd", "bwd_dk", "bwd_dv", "bwd_dq", "decode", "decode_merge"):
        for cc in (80, 86, 89, 90, 100):
            for d in (16, 64, 96, 128):
                cfg = triton_diff._table_config(kernel, cc, triton_diff._block_d(d))
                if kernel == "fwd":
                    assert cfg.block_m % cfg.block_n == 0  # the causal stages need it


def test_torch_compile_runs_the_kernel_launches_as_they_are():
    """torch.compile around a model with kernel='triton': dynamo does not trace into the fused entry (a graph break),
    so inductor never re-compiles the kernels with its own scalar types and the fallback stays in force; the
    compiled model equals eager, forward and backward."""
    cfg = tiny_config(kernel="eager")
    eager, fused = twins(cfg, 0)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), device=DEVICE)
    out = torch.compile(fused, backend="eager")(ids)
    ref = eager(ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    for (name, pe), pf in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-3, atol=1e-5, msg=name)
