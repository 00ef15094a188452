"""Section 2 of the GPU check (benchmarks/gpu_check.sh): the fused DIFF V1 kernel on real hardware.

    python -m diffattn.bench.gpu_correctness OUT.json [--dry-run]

Checks, each recorded with its measured error and its tolerance (a failing check is recorded, never
raised, so the rest still runs):

* ``triton_diff.differential`` against the two-map reference (A1 − λ·A2)·V computed in fp32 from the
  same inputs, forward and backward (every input's gradient, λ included), in fp32 and bf16, causal and
  non-causal, MHA and GQA, T up to 8K, head_dim 64 and 128;
* the decode kernel (one query row against the cache) against the last row of the full forward;
* tiny DIFF V1 and Shared DIFF models with ``kernel="triton"`` against the same weights with
  ``kernel="eager"``: logits, every parameter's gradient (judged on the model's largest gradient), and 16
  greedy tokens;
* the resources of every kernel the checks loaded on the device (``kernels``: registers and spills as the
  driver reports them, shared memory, tensor-core instructions): the same table as ``diffattn bench
  compile``, from the real device.

bf16 runs first (the GPU path); fp32 calls go through the ``triton`` kernel object, whose dispatcher routes fp32
to ``sdpa`` on a GPU (``path`` says which ran).

Errors are relative: max |x − ref| / max |ref|. ``--dry-run`` runs the identical plan on CPU at tiny
shapes; it needs TRITON_INTERPRET=1 set before triton is imported (gpu_check sets it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

from ..utils.runtime import DTYPES as RUNTIME_DTYPES

TOL = {"fp32": 2e-3, "bf16": 3e-2}  # fp32: TF32-free kernels agree to ~1e-6; bf16 inputs round at ~4e-3
DTYPES = {name: RUNTIME_DTYPES[name] for name in ("fp32", "bf16")}  # utils.runtime's names


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().float(), ref.detach().float()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _reference(q1, q2, k1, k2, v, lam, scale, causal):
    """fp32 two-map differential attention with explicit GQA repetition (methods.md §1.5)."""
    n_rep = q1.shape[1] // k1.shape[1]
    k1, k2, v = (x.float().repeat_interleave(n_rep, dim=1) for x in (k1, k2, v))
    q1, q2 = q1.float(), q2.float()

    def probs(q, k):
        s = (q @ k.transpose(-1, -2)) * scale
        if causal:
            t, sk = s.shape[-2:]
            s = s.masked_fill(torch.ones(t, sk, dtype=torch.bool, device=s.device).triu(sk - t + 1), float("-inf"))
        return s.softmax(-1)

    return (probs(q1, k1) - lam.float() * probs(q2, k2)) @ v


def kernel_cases(dry: bool) -> list[dict]:
    if dry:
        return [dict(b=1, h=2, hkv=2, t=48, d=16), dict(b=2, h=4, hkv=2, t=40, d=32)]
    return [dict(b=2, h=8, hkv=8, t=2048, d=64), dict(b=1, h=16, hkv=4, t=4096, d=128),
            dict(b=1, h=8, hkv=2, t=8192, d=64), dict(b=1, h=4, hkv=4, t=8192, d=128)]


def check_kernel(case: dict, dtype: str, causal: bool, device: str) -> dict:
    from ..model import triton_diff

    g = torch.Generator().manual_seed(case["t"] + case["d"] + case["h"])
    dt = DTYPES[dtype]
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dt).requires_grad_()  # noqa: E731
    b, h, hkv, t, d = (case[k] for k in ("b", "h", "hkv", "t", "d"))
    inputs = [mk(b, h, t, d), mk(b, h, t, d), mk(b, hkv, t, d), mk(b, hkv, t, d), mk(b, hkv, t, 2 * d)]
    lam = torch.tensor(0.37, device=device, requires_grad=True)
    scale = d ** -0.5
    out, path = _differential(*inputs, lam, is_causal=causal, scale=scale)
    ref = _reference(*inputs, lam, scale, causal)
    grad_out = torch.randn(out.shape, generator=g).to(device, dt)
    got = torch.autograd.grad(out, inputs + [lam], grad_out)
    want = torch.autograd.grad(ref, inputs + [lam], grad_out.float())
    names = ["q1", "q2", "k1", "k2", "v", "lambda"]
    errs = {"fwd": _rel(out, ref), **{f"grad_{n}": _rel(a, w) for n, a, w in zip(names, got, want)}}
    tol = TOL[dtype]
    return {"check": "kernel", **case, "dtype": dtype, "causal": causal, "path": path, "errors": errs, "tol": tol,
            "passed": all(e <= tol for e in errs.values())}


def _differential(q1, q2, k1, k2, v, lam, *, is_causal, scale):
    """(output, which path served it): the fused kernel, or the dispatcher's sdpa route/fallback."""
    from ..model import kernels, triton_diff

    out = triton_diff.differential(q1, q2, k1, k2, v, lam, is_causal=is_causal, scale=scale)
    if out is not None:
        return out, "triton"
    out, _ = kernels.get_kernel("triton").attend_differential(q1, q2, k1, k2, v, lam, is_causal=is_causal, scale=scale)
    return out, "sdpa (" + (triton_diff.route_reason(q1.dtype, q1.device) or "fallback after a kernel failure") + ")"


def check_decode(case: dict, dtype: str, device: str) -> dict:
    from ..model import triton_diff

    g = torch.Generator().manual_seed(7)
    dt = DTYPES[dtype]
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dt)  # noqa: E731
    b, h, hkv, t, d = (case[k] for k in ("b", "h", "hkv", "t", "d"))
    q1, q2, k1, k2, v = mk(b, h, t, d), mk(b, h, t, d), mk(b, hkv, t, d), mk(b, hkv, t, d), mk(b, hkv, t, 2 * d)
    lam = torch.tensor(0.37, device=device)
    with torch.no_grad():
        full, _ = _differential(q1, q2, k1, k2, v, lam, is_causal=True, scale=d ** -0.5)
        step, path = _differential(q1[:, :, -1:], q2[:, :, -1:], k1, k2, v, lam, is_causal=False, scale=d ** -0.5)
        ref = _reference(q1[:, :, -1:], q2[:, :, -1:], k1, k2, v, lam, d ** -0.5, False)
    errs = {"vs_full_forward_last_row": _rel(step, full[:, :, -1:]), "vs_reference": _rel(step, ref)}
    tol = TOL[dtype]
    return {"check": "decode", **case, "dtype": dtype, "path": path, "errors": errs, "tol": tol,
            "passed": all(e <= tol for e in errs.values())}


def check_model(variant: str, device: str, dry: bool) -> dict:
    from .. import presets
    from ..model import build_model

    base = presets.get("tiny", variant, vocab_size=512, max_seq_len=256, kernel="eager")
    torch.manual_seed(0)
    eager = build_model(base).to(device)
    fused = build_model(base.replace(kernel="triton")).to(device)
    fused.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 512, (2, 32 if dry else 128), generator=torch.Generator().manual_seed(1)).to(device)
    errs = {}
    logits = {}
    for name, m in (("eager", eager), ("triton", fused)):
        m.zero_grad(set_to_none=True)
        out = m(ids)
        torch.nn.functional.cross_entropy(out.flatten(0, 1).float(), ids.roll(-1, 1).flatten()).backward()
        logits[name] = out.detach()
    errs["logits"] = _rel(logits["triton"], logits["eager"])
    # gradients on the model's gradient scale: a tensor whose gradient is tiny (Shared DIFF's zero-initialised B,
    # λ) would otherwise turn fp32 summation-order noise into a large relative error
    grads = {n: p.grad for n, p in eager.named_parameters()}
    scale = max(float(g.abs().max()) for g in grads.values())
    errs["grad_worst"] = max(float((p.grad - grads[n]).abs().max()) for n, p in fused.named_parameters()) / scale
    with torch.no_grad():
        prompt = ids[:, :8]
        g_e = eager.generate(prompt, 16 if not dry else 6, temperature=0.0)
        g_t = fused.generate(prompt, 16 if not dry else 6, temperature=0.0)
    same = bool(torch.equal(g_e, g_t))
    tol = TOL["fp32"]
    return {"check": "model", "variant": variant, "errors": errs, "tol": tol, "greedy_tokens_equal": same,
            "passed": same and all(e <= tol for e in errs.values())}


def run(dry: bool) -> dict:
    device = "cpu" if dry else "cuda"
    results, t0 = [], time.time()

    def attempt(fn, *args, **what):
        try:
            results.append(fn(*args))
        except Exception as e:  # recorded, not raised: the next check still runs
            results.append({"check": fn.__name__.removeprefix("check_"), **what, "passed": False,
                            "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                            "traceback": traceback.format_exc(limit=3)})

    # bf16 (the GPU path) first, so that a cap cuts the fp32 checks, not these
    for dtype in ("bf16", "fp32"):
        for case in kernel_cases(dry):
            for causal in (True, False):
                attempt(check_kernel, case, dtype, causal, device, **case, dtype=dtype, causal=causal)
        case = kernel_cases(dry)[1]
        attempt(check_decode, case, dtype, device, **case, dtype=dtype)
        if dtype == "bf16":
            for variant in ("diff_v1", "shared_diff"):
                attempt(check_model, variant, device, dry, variant=variant)
    return {"device": device, "dry_run": dry, "seconds": time.time() - t0, "checks": results,
            "passed": sum(r["passed"] for r in results), "total": len(results), "kernels": loaded_kernels(device)}


def loaded_kernels(device: str) -> list[dict]:
    """Registers, spills and shared memory of every fused-kernel variant loaded on ``device`` so far (the JIT's
    cache): what `diffattn bench compile` predicts on a CPU, read from the real device. Empty under the
    interpreter."""
    from ..model import triton_diff
    from .compile import tensor_core_family

    if device != "cuda" or triton_diff.INTERPRET:
        return []
    rows = []
    for name, fn in triton_diff.jit_kernels().items():
        for caches in getattr(fn, "device_caches", {}).values():
            for k in (caches[0] if isinstance(caches, tuple) else caches).values():
                try:
                    k._init_handles()
                    meta = k.metadata
                    cst = getattr(getattr(k, "src", None), "constants", {}) or {}
                    rows.append({"kernel": name, "arch": f"sm_{meta.target.arch}", "regs": k.n_regs,
                                 "spills": k.n_spills, "smem_bytes": int(meta.shared), "num_warps": meta.num_warps,
                                 "num_stages": meta.num_stages,
                                 "tensor_cores": tensor_core_family(k.asm.get("ptx", "")),
                                 "constants": {str(key): str(v) for key, v in dict(cst).items()}})
                except Exception as e:  # noqa: BLE001 - a kernel we cannot inspect is recorded, not fatal
                    rows.append({"kernel": name, "error": f"{type(e).__name__}: {e}"[:200]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffattn.bench.gpu_correctness")
    p.add_argument("out")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_correctness: no CUDA GPU (use --dry-run on CPU)", file=sys.stderr)
        return 2
    res = run(args.dry_run)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"gpu_correctness: {res['passed']}/{res['total']} checks passed in {res['seconds']:.0f}s", file=sys.stderr)
    return 0 if res["passed"] == res["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
