"""Fused differential attention in Triton: both softmax maps of a DIFF V1 head in one pass.

DIFF V1 (Ye et al., arXiv 2410.05258, Eq. 1; methods.md §1.2) computes per head

    out = softmax(Q1 K1ᵀ·s) V − λ · softmax(Q2 K2ᵀ·s) V          V is 2d wide, s = 1/√d

Stock kernels compute the attention core twice (transformers' DiffLlama, the authors'
``multihead_flashdiff_2``: twice the FLOPs of the parameter-matched baseline, issue #8). Here one
program loads every key/value tile once for both maps and keeps two running (max, sum) pairs and
two accumulators over the 2d-wide value (FlashAttention-2 style online softmax, Dao 2023); the λ
combination happens in the epilogue, so the T×T maps are never stored and only one (B, H, T, 2d)
output is written.

* Forward: grid (⌈T/BLOCK_M⌉, B·H). Saves, for backward, the combined output (which autograd keeps
  anyway as the input of the per-head norm), O2 = softmax(Q2K2ᵀ)V and the two row log-sum-exps.
  O1 is recovered as out + λ·O2, so the extra memory over a standard layer is one O2 tensor.
* Backward recomputes both maps tile by tile (never T×T): one kernel for dK1, dK2, dV (grid over
  key blocks and K/V heads; it loops over the n_rep query heads of its GQA group, so no atomics)
  and one for dQ1, dQ2. dP = dO·Vᵀ is computed once and shared by both maps (dO2 = −λ·dO).
  With r_c = rowsum(dO ⊙ O_c):  δ1 = r1,  δ2 = −λ·r2,  dλ = −Σ r2.
* Decode (one new query row against the KV cache, no autograd): the n_rep query heads that share a
  K/V head are packed as the rows of one tile, the keys are split across programs (flash-decoding)
  and a second kernel merges the splits' (max, sum, accumulator) triples and applies λ.
* Causal masking is top-left aligned and needs T == S (the kernel contract of kernels.py); a
  non-causal call attends to every key (decode). Explicit boolean masks (left padding) are not
  handled here: :func:`differential` returns ``None`` and the variant takes its generic path.
* GQA: component c of query head h meets key component c of K/V head ⌊h/n_rep⌋; both components read
  that head's 2d-wide value (the flash semantics, methods.md §1.5).
* dtypes: bf16, fp16 (fp32 accumulation, softmax statistics in fp32) and fp32 (dots in IEEE fp32,
  not TF32, so fp32 results match the eager reference). Any even head_dim ≥ 2 (tiles are padded to a
  power of two ≥ 16); 64 and 128 are the tuned sizes.

The per-head RMSNorm and the ×(1−λ_init) factor stay in the variant (attention.py): they are O(T·d)
elementwise work that fusion would not measurably speed up, and keeping them there keeps the
algebra written once.

CPU: under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module is imported) the
same kernels run on CPU tensors; that is how the tests check them against ``eager``. The
interpreter's bf16 ``tl.dot`` multiplies the raw bit patterns (triton 3.9), so under the
interpreter bf16 tiles are widened to fp32 right before each dot (a no-op for the rounding: the
operands are already bf16 values). GPU tile sizes and warps are fixed per head_dim in
``_fwd_blocks``/``_bwd_blocks``; they are educated guesses, not yet tuned on hardware (no GPU was
available when this was written; ``benchmarks/run_gpu.sh`` measures them).
"""

from __future__ import annotations

import os

import torch

try:  # the fused kernel is optional: everything else in diffattn works without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


def _interpret_mode() -> bool:
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _library_interpreted() -> bool:
    """Whether triton's own jit functions (tl.zeros, tl.max, ...) are interpreted: they are decorated
    when triton is first imported, so TRITON_INTERPRET=1 set any later does not reach them."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(tl.zeros, InterpretedFunction)


# Decided once, when the kernels below are decorated: triton.jit returns an interpreted function
# exactly when TRITON_INTERPRET=1 at that moment; the interpreter works only if triton's library
# was imported in that mode too.
INTERPRET = _interpret_mode() and _library_interpreted()
_INTERPRET_TOO_LATE = _interpret_mode() and not INTERPRET
AVAILABLE = triton is not None
LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the fused kernel cannot run on ``device`` (None when it can)."""
    if triton is None:
        return "kernel 'triton' needs the triton package (pip install 'diffattn[triton]')"
    if device.type == "cuda":
        return None if not INTERPRET else "TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only"
    if device.type == "cpu":
        if INTERPRET:
            return None
        if _INTERPRET_TOO_LATE:
            return ("TRITON_INTERPRET=1 was set after triton had been imported, so triton's own functions "
                    "are not interpreted; set it before anything imports triton (torch._dynamo does)")
        return ("kernel 'triton' runs on CUDA tensors; on CPU only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing diffattn) — use kernel='sdpa' on CPU")
    return f"kernel 'triton' does not run on device {device.type!r}"


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b (fp32 accumulation). UPCAST widens bf16 tiles for the interpreter (see module doc)."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PREC)

    @triton.jit
    def _value_channels(D: tl.constexpr, BLOCK_D: tl.constexpr):
        """Offsets and validity of the 2·BLOCK_D value columns: [0, d) then [d, 2d), each half padded
        to BLOCK_D. When d is a power of two (64, 128) the offsets are a plain range, which keeps the
        compiler's contiguity analysis (vectorised loads) intact."""
        offs_e = tl.arange(0, 2 * BLOCK_D)
        if D == BLOCK_D:
            ch_e = offs_e
        else:
            ch_e = tl.where(offs_e < BLOCK_D, offs_e, offs_e - BLOCK_D + D)
        ok_e = (offs_e % BLOCK_D) < D
        return offs_e, ch_e, ok_e

    @triton.jit
    def _fwd_tile(acc1, acc2, m1, l1, m2, l2, q1, q2, K1, K2, V, k_base, v_base, stride_kt, stride_vt,
                  start_n, offs_m, offs_d, ch_e, ok_e, S, qk_scale,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr,
                  PREC: tl.constexpr, UPCAST: tl.constexpr):
        """Fold one key/value tile into both running softmaxes (online softmax in base 2)."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kmask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k_off = k_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        k1 = tl.load(K1 + k_off, mask=kmask, other=0.0)
        k2 = tl.load(K2 + k_off, mask=kmask, other=0.0)
        v = tl.load(V + v_base + offs_n[:, None] * stride_vt + ch_e[None, :],
                    mask=(offs_n[:, None] < S) & ok_e[None, :], other=0.0)  # (BLOCK_N, 2·BLOCK_D)
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s1 = _dot(q1, tl.trans(k1), zero, PREC, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        s2 = _dot(q2, tl.trans(k2), zero, PREC, UPCAST) * qk_scale
        if CAUSAL_MASK or BOUND_MASK:
            keep = offs_n[None, :] < S
            if CAUSAL_MASK:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s1 = tl.where(keep, s1, float("-inf"))
            s2 = tl.where(keep, s2, float("-inf"))
        m1_new = tl.maximum(m1, tl.max(s1, 1))
        m2_new = tl.maximum(m2, tl.max(s2, 1))
        p1 = tl.exp2(s1 - m1_new[:, None])
        p2 = tl.exp2(s2 - m2_new[:, None])
        a1 = tl.exp2(m1 - m1_new)
        a2 = tl.exp2(m2 - m2_new)
        l1 = l1 * a1 + tl.sum(p1, 1)
        l2 = l2 * a2 + tl.sum(p2, 1)
        acc1 = _dot(p1.to(v.dtype), v, acc1 * a1[:, None], PREC, UPCAST)  # shared V tile, both maps
        acc2 = _dot(p2.to(v.dtype), v, acc2 * a2[:, None], PREC, UPCAST)
        return acc1, acc2, m1_new, l1, m2_new, l2

    @triton.jit
    def _fwd_kernel(Q1, Q2, K1, K2, V, LAM, OUT, O2, LSE1, LSE2,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                    H, N_REP, T, S, qk_scale,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // N_REP  # GQA: the K/V head of this query head
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e, ch_e, ok_e = _value_channels(D, BLOCK_D)  # the 2d value channels

        q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        qmask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
        q1 = tl.load(Q1 + q_off, mask=qmask, other=0.0)
        q2 = tl.load(Q2 + q_off, mask=qmask, other=0.0)
        k_base = b * stride_kb + hk * stride_kh
        v_base = b * stride_vb + hk * stride_vh

        m1 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        m2 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        l2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, 2 * BLOCK_D], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, 2 * BLOCK_D], dtype=tl.float32)

        # Stage 1: key tiles entirely visible to every row of this query tile (no masking).
        if CAUSAL:
            full_end = start_m  # keys < start_m are visible to all rows; requires BLOCK_M % BLOCK_N == 0
            end = tl.minimum(start_m + BLOCK_M, S)
        else:
            full_end = (S // BLOCK_N) * BLOCK_N
            end = S
        for start_n in range(0, full_end, BLOCK_N):
            acc1, acc2, m1, l1, m2, l2 = _fwd_tile(acc1, acc2, m1, l1, m2, l2, q1, q2, K1, K2, V, k_base, v_base,
                                                   stride_kt, stride_vt, start_n, offs_m, offs_d, ch_e, ok_e,
                                                   S, qk_scale, D, BLOCK_M, BLOCK_N, False, False, PREC, UPCAST)
        # Stage 2: the diagonal (causal) or the ragged last tile (non-causal), masked.
        for start_n in range(full_end, end, BLOCK_N):
            acc1, acc2, m1, l1, m2, l2 = _fwd_tile(acc1, acc2, m1, l1, m2, l2, q1, q2, K1, K2, V, k_base, v_base,
                                                   stride_kt, stride_vt, start_n, offs_m, offs_d, ch_e, ok_e,
                                                   S, qk_scale, D, BLOCK_M, BLOCK_N, CAUSAL, True, PREC, UPCAST)

        # Epilogue: normalise both maps and apply λ (Eq. 1).
        lam = tl.load(LAM)
        o1 = acc1 / l1[:, None]
        o2 = acc2 / l2[:, None]
        out = o1 - lam * o2
        o_off = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + ch_e[None, :]
        omask = (offs_m[:, None] < T) & ok_e[None, :]
        tl.store(OUT + o_off, out.to(OUT.dtype.element_ty), mask=omask)
        if SAVE:
            tl.store(O2 + o_off, o2.to(O2.dtype.element_ty), mask=omask)
            row = pid_bh * T + offs_m
            tl.store(LSE1 + row, m1 + tl.log2(l1), mask=offs_m < T)
            tl.store(LSE2 + row, m2 + tl.log2(l2), mask=offs_m < T)

    @triton.jit
    def _bwd_dkdv_kernel(Q1, Q2, K1, K2, V, LAM, DO, LSE1, LSE2, DELTA1, DELTA2, DK1, DK2, DV,
                         stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                         stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                         stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                         H, HKV, N_REP, T, S, qk_scale, sm_scale,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_bk = tl.program_id(1)
        b = pid_bk // HKV
        hk = pid_bk % HKV
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e, ch_e, ok_e = _value_channels(D, BLOCK_D)

        kmask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k_off = b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
        k1 = tl.load(K1 + k_off, mask=kmask, other=0.0)
        k2 = tl.load(K2 + k_off, mask=kmask, other=0.0)
        vmask = (offs_n[:, None] < S) & ok_e[None, :]
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + ch_e[None, :],
                    mask=vmask, other=0.0)
        lam = tl.load(LAM)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, 2 * BLOCK_D], dtype=tl.float32)
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

        # Query tiles that can see this key tile: all (non-causal) or rows >= start_n (causal).
        if CAUSAL:
            lo = (start_n // BLOCK_M) * BLOCK_M
        else:
            lo = 0
        for r in range(0, N_REP):  # the query heads of this GQA group, accumulated here: no atomics
            h = hk * N_REP + r
            for start_m in range(lo, T, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
                qmask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
                q1 = tl.load(Q1 + q_off, mask=qmask, other=0.0)
                q2 = tl.load(Q2 + q_off, mask=qmask, other=0.0)
                do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + ch_e[None, :],
                             mask=(offs_m[:, None] < T) & ok_e[None, :], other=0.0)
                row = (b * H + h) * T + offs_m
                # padding rows get lse = +inf, so p = 0 there; padded keys have k = v = 0 and their
                # dk/dv rows are never stored, so they need no mask
                lse1 = tl.load(LSE1 + row, mask=offs_m < T, other=float("inf"))
                lse2 = tl.load(LSE2 + row, mask=offs_m < T, other=float("inf"))
                dl1 = tl.load(DELTA1 + row, mask=offs_m < T, other=0.0)
                dl2 = tl.load(DELTA2 + row, mask=offs_m < T, other=0.0)
                p1 = tl.exp2(_dot(q1, tl.trans(k1), zero, PREC, UPCAST) * qk_scale - lse1[:, None])
                p2 = tl.exp2(_dot(q2, tl.trans(k2), zero, PREC, UPCAST) * qk_scale - lse2[:, None])
                if CAUSAL:
                    if start_m < start_n + BLOCK_N:  # tile crosses the diagonal
                        vis = offs_m[:, None] >= offs_n[None, :]
                        p1 = tl.where(vis, p1, 0.0)
                        p2 = tl.where(vis, p2, 0.0)
                dpv = _dot(do, tl.trans(v), zero, PREC, UPCAST)  # dO·Vᵀ, shared: dP1 = dpv, dP2 = −λ·dpv
                dv = _dot(tl.trans((p1 - lam * p2).to(do.dtype)), do, dv, PREC, UPCAST)
                ds1 = p1 * (dpv - dl1[:, None])
                ds2 = p2 * (-lam * dpv - dl2[:, None])
                dk1 = _dot(tl.trans(ds1.to(q1.dtype)), q1, dk1, PREC, UPCAST)
                dk2 = _dot(tl.trans(ds2.to(q2.dtype)), q2, dk2, PREC, UPCAST)

        dk_off = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
        tl.store(DK1 + dk_off, (dk1 * sm_scale).to(DK1.dtype.element_ty), mask=kmask)
        tl.store(DK2 + dk_off, (dk2 * sm_scale).to(DK2.dtype.element_ty), mask=kmask)
        tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + ch_e[None, :],
                 dv.to(DV.dtype.element_ty), mask=vmask)

    @triton.jit
    def _bwd_dq_kernel(Q1, Q2, K1, K2, V, LAM, DO, LSE1, LSE2, DELTA1, DELTA2, DQ1, DQ2,
                       stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                       stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                       stride_dqb, stride_dqh, stride_dqt,
                       H, N_REP, T, S, qk_scale, sm_scale,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        hk = h // N_REP
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e, ch_e, ok_e = _value_channels(D, BLOCK_D)

        q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        qmask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
        q1 = tl.load(Q1 + q_off, mask=qmask, other=0.0)
        q2 = tl.load(Q2 + q_off, mask=qmask, other=0.0)
        do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + ch_e[None, :],
                     mask=(offs_m[:, None] < T) & ok_e[None, :], other=0.0)
        row = pid_bh * T + offs_m
        lse1 = tl.load(LSE1 + row, mask=offs_m < T, other=float("inf"))
        lse2 = tl.load(LSE2 + row, mask=offs_m < T, other=float("inf"))
        dl1 = tl.load(DELTA1 + row, mask=offs_m < T, other=0.0)
        dl2 = tl.load(DELTA2 + row, mask=offs_m < T, other=0.0)
        lam = tl.load(LAM)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

        if CAUSAL:
            end = tl.minimum(start_m + BLOCK_M, S)
        else:
            end = S
        for start_n in range(0, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kmask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
            k_off = b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
            k1 = tl.load(K1 + k_off, mask=kmask, other=0.0)
            k2 = tl.load(K2 + k_off, mask=kmask, other=0.0)
            v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + ch_e[None, :],
                        mask=(offs_n[:, None] < S) & ok_e[None, :], other=0.0)
            p1 = tl.exp2(_dot(q1, tl.trans(k1), zero, PREC, UPCAST) * qk_scale - lse1[:, None])
            p2 = tl.exp2(_dot(q2, tl.trans(k2), zero, PREC, UPCAST) * qk_scale - lse2[:, None])
            if CAUSAL:
                if start_n + BLOCK_N > start_m:  # tile crosses the diagonal
                    vis = offs_m[:, None] >= offs_n[None, :]
                    p1 = tl.where(vis, p1, 0.0)
                    p2 = tl.where(vis, p2, 0.0)
            dpv = _dot(do, tl.trans(v), zero, PREC, UPCAST)
            ds1 = p1 * (dpv - dl1[:, None])
            ds2 = p2 * (-lam * dpv - dl2[:, None])
            dq1 = _dot(ds1.to(k1.dtype), k1, dq1, PREC, UPCAST)  # padded keys have k = 0: no mask needed
            dq2 = _dot(ds2.to(k2.dtype), k2, dq2, PREC, UPCAST)

        dq_off = b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
        tl.store(DQ1 + dq_off, (dq1 * sm_scale).to(DQ1.dtype.element_ty), mask=qmask)
        tl.store(DQ2 + dq_off, (dq2 * sm_scale).to(DQ2.dtype.element_ty), mask=qmask)

    @triton.jit
    def _decode_kernel(Q1, Q2, K1, K2, V, PACC, PML,
                       stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                       HKV, N_REP, S, CHUNK, N_SPLIT, qk_scale,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                       PREC: tl.constexpr, UPCAST: tl.constexpr):
        """One query row per head: rows of the tile are the n_rep query heads of one K/V head; this
        program folds keys [split·CHUNK, (split+1)·CHUNK) into unnormalised partial results."""
        split = tl.program_id(0)
        pid_bk = tl.program_id(1)
        b = pid_bk // HKV
        hk = pid_bk % HKV
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e, ch_e, ok_e = _value_channels(D, BLOCK_D)
        q_off = b * stride_qb + (hk * N_REP + offs_r[:, None]) * stride_qh + offs_d[None, :]
        qmask = (offs_r[:, None] < N_REP) & (offs_d[None, :] < D)
        q1 = tl.load(Q1 + q_off, mask=qmask, other=0.0)
        q2 = tl.load(Q2 + q_off, mask=qmask, other=0.0)
        k_base = b * stride_kb + hk * stride_kh
        v_base = b * stride_vb + hk * stride_vh
        m1 = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        m2 = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l1 = tl.zeros([BLOCK_R], dtype=tl.float32)
        l2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_R, 2 * BLOCK_D], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_R, 2 * BLOCK_D], dtype=tl.float32)
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, S)  # non-empty: the host makes every split hold >= 1 key
        for start_n in range(lo, hi, BLOCK_N):
            acc1, acc2, m1, l1, m2, l2 = _fwd_tile(acc1, acc2, m1, l1, m2, l2, q1, q2, K1, K2, V, k_base, v_base,
                                                   stride_kt, stride_vt, start_n, offs_r, offs_d, ch_e, ok_e,
                                                   hi, qk_scale, D, BLOCK_R, BLOCK_N, False, True, PREC, UPCAST)
        # partial results: PACC (B·HKV, N_SPLIT, 2, BLOCK_R, 2·BLOCK_D), PML (B·HKV, N_SPLIT, 4, BLOCK_R)
        base = pid_bk * N_SPLIT + split
        acc_off = offs_r[:, None] * (2 * BLOCK_D) + offs_e[None, :]
        tl.store(PACC + (base * 2) * BLOCK_R * 2 * BLOCK_D + acc_off, acc1)
        tl.store(PACC + (base * 2 + 1) * BLOCK_R * 2 * BLOCK_D + acc_off, acc2)
        tl.store(PML + (base * 4 + 0) * BLOCK_R + offs_r, m1)
        tl.store(PML + (base * 4 + 1) * BLOCK_R + offs_r, l1)
        tl.store(PML + (base * 4 + 2) * BLOCK_R + offs_r, m2)
        tl.store(PML + (base * 4 + 3) * BLOCK_R + offs_r, l2)

    @triton.jit
    def _decode_merge_kernel(PACC, PML, LAM, OUT, stride_oh, N_REP, N_SPLIT,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
        """Merge the splits of one (batch, K/V head) for both maps, then out = O1 − λ·O2."""
        pid_bk = tl.program_id(0)  # = b·HKV + hk; OUT is contiguous (B, H, 1, 2d)
        offs_r = tl.arange(0, BLOCK_R)
        offs_e, ch_e, ok_e = _value_channels(D, BLOCK_D)
        acc_off = offs_r[:, None] * (2 * BLOCK_D) + offs_e[None, :]
        gm1 = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        gm2 = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        for s in range(0, N_SPLIT):
            base = pid_bk * N_SPLIT + s
            gm1 = tl.maximum(gm1, tl.load(PML + (base * 4 + 0) * BLOCK_R + offs_r))
            gm2 = tl.maximum(gm2, tl.load(PML + (base * 4 + 2) * BLOCK_R + offs_r))
        gl1 = tl.zeros([BLOCK_R], dtype=tl.float32)
        gl2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        o1 = tl.zeros([BLOCK_R, 2 * BLOCK_D], dtype=tl.float32)
        o2 = tl.zeros([BLOCK_R, 2 * BLOCK_D], dtype=tl.float32)
        for s in range(0, N_SPLIT):
            base = pid_bk * N_SPLIT + s
            w1 = tl.exp2(tl.load(PML + (base * 4 + 0) * BLOCK_R + offs_r) - gm1)
            w2 = tl.exp2(tl.load(PML + (base * 4 + 2) * BLOCK_R + offs_r) - gm2)
            gl1 += w1 * tl.load(PML + (base * 4 + 1) * BLOCK_R + offs_r)
            gl2 += w2 * tl.load(PML + (base * 4 + 3) * BLOCK_R + offs_r)
            o1 += w1[:, None] * tl.load(PACC + (base * 2) * BLOCK_R * 2 * BLOCK_D + acc_off)
            o2 += w2[:, None] * tl.load(PACC + (base * 2 + 1) * BLOCK_R * 2 * BLOCK_D + acc_off)
        lam = tl.load(LAM)
        out = o1 / gl1[:, None] - lam * (o2 / gl2[:, None])
        # row r is query head hk·N_REP + r, whose flat (b, h) index is pid_bk·N_REP + r
        o_off = (pid_bk * N_REP + offs_r[:, None]) * stride_oh + ch_e[None, :]
        tl.store(OUT + o_off, out.to(OUT.dtype.element_ty), mask=(offs_r[:, None] < N_REP) & ok_e[None, :])


# ---------------------------------------------------------------------------------------------- host side
def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _dot_args(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for tl.dot: IEEE fp32 for fp32 inputs; bf16 widened in the interpreter."""
    return ("ieee" if dtype == torch.float32 else "tf32"), (INTERPRET and dtype == torch.bfloat16)


def _fwd_blocks(block_d: int) -> tuple[int, int, dict]:
    """(BLOCK_M, BLOCK_N, launch options). Two fp32 accumulators of BLOCK_M × 2d each must fit in
    registers, so the query tile is smaller than a standard flash kernel's. Untuned on hardware yet
    (no GPU in issue #8's session); `benchmarks/` has the command that measures them."""
    if INTERPRET:
        return 16, 16, {}
    if block_d <= 64:
        return 64, 64, dict(num_warps=4, num_stages=3)
    return 64, 32, dict(num_warps=8, num_stages=2)


def _bwd_blocks(block_d: int) -> tuple[int, int, dict]:
    if INTERPRET:
        return 16, 16, {}
    if block_d <= 64:
        return 32, 64, dict(num_warps=4, num_stages=2)
    return 32, 32, dict(num_warps=8, num_stages=2)


def _last_dim_contiguous(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels take one set of strides for each (Q1, Q2) and (K1, K2) pair."""
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def _forward(q1, q2, k1, k2, v, lam, causal: bool, scale: float, save: bool):
    bsz, h, t, d = q1.shape
    hkv, s = k1.shape[1], k1.shape[2]
    out = torch.empty(bsz, h, t, 2 * d, device=q1.device, dtype=q1.dtype)
    o2 = torch.empty_like(out) if save else out
    lse1 = torch.empty(bsz, h, t, device=q1.device, dtype=torch.float32) if save else out
    lse2 = torch.empty_like(lse1) if save else out
    bd = _block_d(d)
    bm, bn, opts = _fwd_blocks(bd)
    prec, upcast = _dot_args(q1.dtype)
    grid = (triton.cdiv(t, bm), bsz * h)
    _fwd_kernel[grid](q1, q2, k1, k2, v, lam, out, o2, lse1, lse2,
                      q1.stride(0), q1.stride(1), q1.stride(2), k1.stride(0), k1.stride(1), k1.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                      h, h // hkv, t, s, scale * LOG2E,
                      D=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, SAVE=save,
                      PREC=prec, UPCAST=upcast, **opts)
    return out, o2, lse1, lse2


def _backward(dout, q1, q2, k1, k2, v, lam, out, o2, lse1, lse2, causal: bool, scale: float):
    bsz, h, t, d = q1.shape
    hkv, s = k1.shape[1], k1.shape[2]
    dout = dout.contiguous()  # same layout as out (contiguous)
    # r_c = rowsum(dO ⊙ O_c), with O1 = out + λ·O2 (see the module docstring); fp32
    r2 = (dout.float() * o2.float()).sum(-1)
    r1 = (dout.float() * out.float()).sum(-1) + lam * r2
    delta1, delta2 = r1.contiguous(), (-lam * r2).contiguous()
    dlam = -r2.sum()
    dq1, dq2 = torch.empty_like(q1, memory_format=torch.contiguous_format), torch.empty_like(q2, memory_format=torch.contiguous_format)
    dk1 = torch.empty(k1.shape, device=k1.device, dtype=k1.dtype)
    dk2 = torch.empty_like(dk1)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    bd = _block_d(d)
    bm, bn, opts = _bwd_blocks(bd)
    prec, upcast = _dot_args(q1.dtype)
    common = (q1.stride(0), q1.stride(1), q1.stride(2), k1.stride(0), k1.stride(1), k1.stride(2),
              v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    _bwd_dkdv_kernel[(triton.cdiv(s, bn), bsz * hkv)](
        q1, q2, k1, k2, v, lam, dout, lse1, lse2, delta1, delta2, dk1, dk2, dv, *common,
        dk1.stride(0), dk1.stride(1), dk1.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        h, hkv, h // hkv, t, s, scale * LOG2E, scale,
        D=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, PREC=prec, UPCAST=upcast, **opts)
    # dq: its own tiling (query tile BLOCK_N-sized rows over key tiles of BLOCK_M), causal needs M % N == 0
    _bwd_dq_kernel[(triton.cdiv(t, bn), bsz * h)](
        q1, q2, k1, k2, v, lam, dout, lse1, lse2, delta1, delta2, dq1, dq2, *common,
        dq1.stride(0), dq1.stride(1), dq1.stride(2),
        h, h // hkv, t, s, scale * LOG2E, scale,
        D=d, BLOCK_D=bd, BLOCK_M=bn, BLOCK_N=bm, CAUSAL=causal, PREC=prec, UPCAST=upcast, **opts)
    return dq1, dq2, dk1, dk2, dv, dlam


class _DifferentialAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q1, q2, k1, k2, v, lam, causal, scale):
        out, o2, lse1, lse2 = _forward(q1, q2, k1, k2, v, lam, causal, scale, save=True)
        ctx.save_for_backward(q1, q2, k1, k2, v, lam, out, o2, lse1, lse2)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q1, q2, k1, k2, v, lam, out, o2, lse1, lse2 = ctx.saved_tensors
        grads = _backward(dout, q1, q2, k1, k2, v, lam, out, o2, lse1, lse2, ctx.causal, ctx.scale)
        return (*grads, None, None)


def decode(q1, q2, k1, k2, v, lam, *, scale: float, n_split: int | None = None) -> torch.Tensor:
    """One query row per head against S cached keys (no autograd). q: (B, H, 1, d), k: (B, Hkv, S, d),
    v: (B, Hkv, S, 2d) → (B, H, 1, 2d). ``n_split`` key splits (default: enough programs to fill the GPU)."""
    bsz, h, t, d = q1.shape
    hkv, s = k1.shape[1], k1.shape[2]
    if t != 1:
        raise ValueError(f"decode takes one query row, got {t}")
    n_rep = h // hkv
    bd = _block_d(d)
    bn = 16 if INTERPRET else (64 if bd <= 64 else 32)
    if n_split is None:
        sms = 1 if INTERPRET else torch.cuda.get_device_properties(q1.device).multi_processor_count
        n_split = max(1, min(triton.cdiv(2 * sms, bsz * hkv), triton.cdiv(s, 4 * bn)))
    chunk = triton.cdiv(triton.cdiv(s, max(1, n_split)), bn) * bn
    n_split = triton.cdiv(s, chunk)  # every split holds at least one key
    block_r = max(16, triton.next_power_of_2(n_rep))
    pacc = torch.empty(bsz * hkv, n_split, 2, block_r, 2 * bd, device=q1.device, dtype=torch.float32)
    pml = torch.empty(bsz * hkv, n_split, 4, block_r, device=q1.device, dtype=torch.float32)
    prec, upcast = _dot_args(q1.dtype)
    opts = {} if INTERPRET else dict(num_warps=4, num_stages=2)
    _decode_kernel[(n_split, bsz * hkv)](
        q1, q2, k1, k2, v, pacc, pml, q1.stride(0), q1.stride(1), k1.stride(0), k1.stride(1), k1.stride(2),
        v.stride(0), v.stride(1), v.stride(2), hkv, n_rep, s, chunk, n_split, scale * LOG2E,
        D=d, BLOCK_D=bd, BLOCK_R=block_r, BLOCK_N=bn, PREC=prec, UPCAST=upcast, **opts)
    out = torch.empty(bsz, h, 1, 2 * d, device=q1.device, dtype=q1.dtype)
    _decode_merge_kernel[(bsz * hkv,)](pacc, pml, lam, out, out.stride(1), n_rep, n_split,
                                       D=d, BLOCK_D=bd, BLOCK_R=block_r, **({} if INTERPRET else dict(num_warps=4)))
    return out


def _check(q1, q2, k1, k2, v, lam):
    if not (q1.shape == q2.shape and k1.shape == k2.shape):
        raise ValueError(f"q1/q2 and k1/k2 must match: {tuple(q1.shape)}, {tuple(q2.shape)}, "
                         f"{tuple(k1.shape)}, {tuple(k2.shape)}")
    bsz, h, _, d = q1.shape
    if k1.shape[0] != bsz or k1.shape[3] != d or h % k1.shape[1]:
        raise ValueError(f"keys {tuple(k1.shape)} do not fit queries {tuple(q1.shape)} (batch, GQA heads, width)")
    if v.shape[:3] != k1.shape[:3] or v.shape[3] != 2 * d:
        raise ValueError(f"values {tuple(v.shape)} must be (B, Hkv, S, 2·{d}) for keys {tuple(k1.shape)}")
    if q1.dtype not in SUPPORTED_DTYPES or len({x.dtype for x in (q1, q2, k1, k2, v)}) != 1:
        raise ValueError(f"kernel 'triton' takes one of {', '.join(map(str, SUPPORTED_DTYPES))} for q/k/v, "
                         f"got {q1.dtype}, {k1.dtype}, {v.dtype}")
    if lam.numel() != 1:
        raise ValueError("λ must be a scalar")
    reason = unavailable_reason(q1.device)
    if reason:
        raise ValueError(reason)


def differential(q1, q2, k1, k2, v, lam, *, mask=None, is_causal=True, scale: float):
    """(softmax(Q1K1ᵀ·scale) − λ·softmax(Q2K2ᵀ·scale))·V in one fused pass, or ``None`` when this call
    needs the generic path (an explicit boolean ``mask``, i.e. left padding).

    q1, q2: (B, H, T, d)   k1, k2: (B, Hkv, S, d)   v: (B, Hkv, S, 2d)   lam: 0-d tensor   → (B, H, T, 2d)
    Differentiable in q1, q2, k1, k2, v and λ. A single query row without autograd (a decode step)
    uses the split-key decode kernels.
    """
    if mask is not None:
        return None
    _check(q1, q2, k1, k2, v, lam)
    if is_causal and q1.shape[2] != k1.shape[2]:
        raise ValueError("is_causal without a mask needs as many queries as keys; pass an explicit mask")
    q1, q2, k1, k2, v = _last_dim_contiguous(q1, q2, k1, k2, v)
    q1, q2 = _same_strides(q1, q2)
    k1, k2 = _same_strides(k1, k2)
    lam32 = lam.reshape(()).to(torch.float32)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q1, q2, k1, k2, v, lam32))
    t = q1.shape[2]
    if not needs_grad and t == 1:
        return decode(q1, q2, k1, k2, v, lam32.detach().contiguous(), scale=scale)
    causal = bool(is_causal) and t > 1
    if not needs_grad:
        return _forward(q1, q2, k1, k2, v, lam32.detach().contiguous(), causal, scale, save=False)[0]
    return _DifferentialAttention.apply(q1, q2, k1, k2, v, lam32, causal, float(scale))


__all__ = ["AVAILABLE", "INTERPRET", "decode", "differential", "unavailable_reason"]
