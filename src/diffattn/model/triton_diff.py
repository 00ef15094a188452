"""Fused differential attention in Triton: both softmax maps of a DIFF V1 head, K/V read once per tile pair.

DIFF V1 (Ye et al., arXiv 2410.05258, Eq. 1; methods.md §1.2) computes per head

    out = softmax(Q1 K1ᵀ·s) V − λ · softmax(Q2 K2ᵀ·s) V          V is 2d wide, s = 1/√d

Stock kernels compute the attention core twice over split halves of V (transformers' DiffLlama, the
authors' ``multihead_flashdiff_2``: four flash calls over d-wide values, issue #8). Here each map is one
flash-style pass over the full 2d-wide value (FlashAttention-2 online softmax, Dao 2023), so QKᵀ is
computed once per map and the T×T maps are never stored.

* Forward: grid (2·⌈T/BLOCK_M⌉, B·H). The fastest grid index is the map c: the two programs of a query
  tile run side by side and read the same K/V tiles (the second read comes from L2). One accumulator
  of BLOCK_M × 2d per program — issue #26: the earlier single program with both accumulators spilled
  hundreds of bytes per thread on sm_80/sm_90 and could not launch in fp32 on sm_80/86/89. A small
  elementwise kernel then forms out = O1 − λ·O2 in place (fp32 arithmetic). Saved for backward: out,
  O2 and both row log-sum-exps; O1 is recovered as out + λ·O2.
* Backward recomputes the maps tile by tile (never T×T), in three kernels with one accumulator each: dK
  (one program per map and key tile), dV (per key tile: Σ (P1 − λ·P2)ᵀ·dO, both maps recomputed side by
  side) and dQ (one program per map and query tile). The dK and dV kernels loop over the n_rep query heads
  of their GQA group, so no atomics. With r_c = rowsum(dO ⊙ O_c):  δ1 = r1,  δ2 = −λ·r2,  dλ = −Σ r2,
  and dS_c = P_c ⊙ (coef_c·dO·Vᵀ − δ_c) with coef = 1, −λ. (One program holding dK1, dK2 and dV spilled on
  every target; this costs a recomputation of dO·Vᵀ per map and kernel instead.)
* Decode (one new query row against the KV cache, no autograd): the n_rep query heads that share a
  K/V head are packed as the rows of one tile, the keys are split across programs (flash-decoding, one
  program per map and split) and a second kernel merges the splits' (max, sum, accumulator) triples and
  applies λ. The cache length and the split sizes are not specialised on (``do_not_specialize``), so a
  growing cache compiles once.
* Causal masking is top-left aligned and needs T == S (the kernel contract of kernels.py); a
  non-causal call attends to every key (decode). Explicit boolean masks (left padding) are not
  handled here: :func:`differential` returns ``None`` and the variant takes its generic path.
* GQA: component c of query head h meets key component c of K/V head ⌊h/n_rep⌋; both components read
  that head's 2d-wide value (the flash semantics, methods.md §1.5).
* dtypes: bf16 and fp16 on a GPU (fp32 accumulation, softmax statistics in fp32); fp32 on a GPU is
  routed to ``sdpa`` (:func:`route_reason`, one log line). Under the interpreter fp32 runs the kernels
  with IEEE fp32 dots, which is how the tests check the arithmetic against a float64 reference. Any
  even head_dim ≥ 2 (tiles padded to a power of two ≥ 16); the launch table covers tile widths 64 and 128.
* A launch that cannot compile or run (OutOfResources, a compilation error, an unsupported target)
  never ends a run: the call falls back to ``sdpa`` for that shape with one log line, and a failing
  backward recomputes its gradients through ``sdpa``. torch.compile does not trace into
  :func:`differential` (inductor would recompile the kernels itself, with fp64 scalars; the kernels
  also cast their float scalars to fp32, so that path compiles too).

The per-head RMSNorm and the ×(1−λ_init) factor stay in the variant (attention.py): they are O(T·d)
elementwise work that fusion would not measurably speed up, and keeping them there keeps the
algebra written once.

Launch configurations (tile sizes, warps, pipeline stages) come from ``_LAUNCH``, one per (kernel, target
class, tile width), chosen from candidates compiled for sm_80/86/89/90 on a CPU (``diffattn bench compile``:
registers, spills, shared memory, tensor-core instructions; docs/benchmarks.md). Compiling proves resources
and instruction selection, not speed.

CPU: under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module is imported) the
same kernels run on CPU tensors; that is how the tests check them against ``eager``. The
interpreter's bf16 ``tl.dot`` multiplies the raw bit patterns (triton 3.9), so under the
interpreter bf16 tiles are widened to fp32 right before each dot (a no-op for the rounding: the
operands are already bf16 values).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import torch

from .attend import save_differential, sdpa_attention

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




def _compiler_disable(fn):
    """torch.compile runs ``fn`` as it is (a graph break) instead of tracing the triton launches into inductor."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


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
    def _map_program(N_HEADS):
        """(map c, tile index, batch, head) of a program on a grid of (2·tiles, B·N_HEADS): the map is the fastest
        index, so both maps of a tile run side by side."""
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        return pid % 2, pid // 2, pid_bh // N_HEADS, pid_bh % N_HEADS

    @triton.jit
    def _pick(c, first, second):
        """``first`` for map 0, ``second`` for map 1 (a pointer or a value chosen by the program's map index)."""
        if c == 0:
            chosen = first
        else:
            chosen = second
        return chosen

    @triton.jit
    def _fwd_tile(acc, m, l, q, Kc, V, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_d, ch_e, ok_e,
                  S, qk_scale, D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                  BOUND_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """Fold one key/value tile into the running softmax of one map (online softmax in base 2)."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(Kc + k_base + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(V + v_base + offs_n[:, None] * stride_vt + ch_e[None, :],
                    mask=(offs_n[:, None] < S) & ok_e[None, :], other=0.0)  # (BLOCK_N, 2·BLOCK_D)
        s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), PREC, UPCAST) * qk_scale
        if CAUSAL_MASK or BOUND_MASK:
            keep = offs_n[None, :] < S
            if CAUSAL_MASK:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], PREC, UPCAST)
        return acc, m_new, l

    @triton.jit(do_not_specialize=["T", "S"])
    def _fwd_kernel(Q1, Q2, K1, K2, V, O1, O2, LSE,
                    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                    H, N_REP, T, S, qk_scale,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """O_c = softmax(Q_c K_cᵀ·s)·V for one map c and one query tile; c is the fastest grid index, so the two
        maps of a tile run side by side and share the K/V tiles through L2."""
        qk_scale = tl.cast(qk_scale, tl.float32)  # a caller may pass fp64 (torch.compile's inductor does)
        c, tile, b, h = _map_program(H)
        pid_m = tl.cdiv(T, BLOCK_M) - 1 - tile  # the longest (causal) query tiles first
        pid_bh = tl.program_id(1)
        hk = h // N_REP  # GQA: the K/V head of this query head
        Qc, Kc, Oc = _pick(c, Q1, Q2), _pick(c, K1, K2), _pick(c, O1, O2)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e, ch_e, ok_e = _value_channels(D, BLOCK_D)
        q = tl.load(Qc + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0)
        k_base = b * stride_kb + hk * stride_kh
        v_base = b * stride_vb + hk * stride_vh
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, 2 * BLOCK_D], dtype=tl.float32)
        # Stage 1: key tiles entirely visible to every row of this query tile (no masking).
        if CAUSAL:
            full_end = start_m  # keys < start_m are visible to all rows; requires BLOCK_M % BLOCK_N == 0
            end = tl.minimum(start_m + BLOCK_M, S)
        else:
            full_end = (S // BLOCK_N) * BLOCK_N
            end = S
        for start_n in range(0, full_end, BLOCK_N):
            acc, m, l = _fwd_tile(acc, m, l, q, Kc, V, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_d,
                                  ch_e, ok_e, S, qk_scale, D, BLOCK_N, False, False, PREC, UPCAST)
        # Stage 2: the diagonal (causal) or the ragged last tile (non-causal), masked.
        for start_n in range(full_end, end, BLOCK_N):
            acc, m, l = _fwd_tile(acc, m, l, q, Kc, V, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_d,
                                  ch_e, ok_e, S, qk_scale, D, BLOCK_N, CAUSAL, True, PREC, UPCAST)
        o = acc / l[:, None]
        tl.store(Oc + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + ch_e[None, :],
                 o.to(Oc.dtype.element_ty), mask=(offs_m[:, None] < T) & ok_e[None, :])
        if SAVE:  # LSE: (2, B·H, T), log2 units
            tl.store(LSE + (c * tl.num_programs(1) + pid_bh) * T + offs_m, m + tl.log2(l), mask=offs_m < T)

    @triton.jit(do_not_specialize=["N"])
    def _combine_kernel(O1, O2, LAM, N, BLOCK: tl.constexpr):
        """out = O1 − λ·O2 in place of O1 (Eq. 1), in fp32."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        lam = tl.load(LAM)
        o1 = tl.load(O1 + offs, mask=ok, other=0.0).to(tl.float32)
        o2 = tl.load(O2 + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(O1 + offs, (o1 - lam * o2).to(O1.dtype.element_ty), mask=ok)

    @triton.jit(do_not_specialize=["T", "S"])
    def _bwd_dk_kernel(Q1, Q2, K1, K2, V, LAM, DO, LSE, DELTA, DK1, DK2,
                       stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                       stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                       stride_dkb, stride_dkh, stride_dkt,
                       H, HKV, N_REP, T, S, qk_scale, sm_scale,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """dK_c of one key tile for one map c (the fastest grid index): dS_c = P_c ⊙ (coef_c·dO·Vᵀ − δ_c) with
        coef = 1, −λ. Works on transposed tiles (key rows × query columns) so that every dot has the key tile
        as its M side; loops over the n_rep query heads of its GQA group (no atomics)."""
        qk_scale = tl.cast(qk_scale, tl.float32)
        sm_scale = tl.cast(sm_scale, tl.float32)
        c, pid_n, b, hk = _map_program(HKV)
        Qc, Kc, DKc = _pick(c, Q1, Q2), _pick(c, K1, K2), _pick(c, DK1, DK2)
        lam = tl.load(LAM)
        coef = 1.0 - (c * 1.0) * (1.0 + lam)  # 1 for map 1, −λ for map 2
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e, ch_e, ok_e = _value_channels(D, BLOCK_D)
        kmask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k = tl.load(Kc + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=kmask, other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + ch_e[None, :],
                    mask=(offs_n[:, None] < S) & ok_e[None, :], other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        zero = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0  # query tiles that can see this key tile
        bht = tl.num_programs(1) * N_REP * T  # B·H·T: where map 2 starts in LSE and DELTA
        for r in range(0, N_REP):
            h = hk * N_REP + r
            for start_m in range(lo, T, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                q = tl.load(Qc + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                            mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0)
                do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + ch_e[None, :],
                             mask=(offs_m[:, None] < T) & ok_e[None, :], other=0.0)
                row = c * bht + (b * H + h) * T + offs_m
                # padding rows get lse = +inf, so p = 0 there; padded keys have k = v = 0 and their dk rows
                # are never stored, so they need no mask
                lse = tl.load(LSE + row, mask=offs_m < T, other=float("inf"))
                delta = tl.load(DELTA + row, mask=offs_m < T, other=0.0)
                pt = tl.exp2(_dot(k, tl.trans(q), zero, PREC, UPCAST) * qk_scale - lse[None, :])
                if CAUSAL:
                    if start_m < start_n + BLOCK_N:  # tile crosses the diagonal
                        pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
                dpt = _dot(v, tl.trans(do), zero, PREC, UPCAST)  # (dO·Vᵀ)ᵀ
                dst = pt * (coef * dpt - delta[None, :])
                dk = _dot(dst.to(q.dtype), q, dk, PREC, UPCAST)
        tl.store(DKc + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
                 (dk * sm_scale).to(DKc.dtype.element_ty), mask=kmask)

    @triton.jit(do_not_specialize=["T", "S"])
    def _bwd_dv_kernel(Q1, Q2, K1, K2, LAM, DO, LSE, DV,
                       stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                       stride_ob, stride_oh, stride_ot, stride_vb, stride_vh, stride_vt,
                       H, HKV, N_REP, T, S, qk_scale,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """dV of one key tile: Σ over the query tiles of (P1 − λ·P2)ᵀ·dO, both maps recomputed side by side (one
        dV accumulator of BLOCK_N × 2d; no dK accumulators here)."""
        qk_scale = tl.cast(qk_scale, tl.float32)
        pid_n = tl.program_id(0)
        pid_bk = tl.program_id(1)
        b = pid_bk // HKV
        hk = pid_bk % HKV
        lam = tl.load(LAM)
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e, ch_e, ok_e = _value_channels(D, BLOCK_D)
        kmask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k_off = b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
        k1 = tl.load(K1 + k_off, mask=kmask, other=0.0)
        k2 = tl.load(K2 + k_off, mask=kmask, other=0.0)
        dv = tl.zeros([BLOCK_N, 2 * BLOCK_D], dtype=tl.float32)
        zero = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0
        bht = tl.num_programs(1) * N_REP * T
        for r in range(0, N_REP):
            h = hk * N_REP + r
            for start_m in range(lo, T, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
                qmask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
                row = (b * H + h) * T + offs_m
                lse1 = tl.load(LSE + row, mask=offs_m < T, other=float("inf"))
                lse2 = tl.load(LSE + bht + row, mask=offs_m < T, other=float("inf"))
                q1 = tl.load(Q1 + q_off, mask=qmask, other=0.0)
                pt = tl.exp2(_dot(k1, tl.trans(q1), zero, PREC, UPCAST) * qk_scale - lse1[None, :])
                q2 = tl.load(Q2 + q_off, mask=qmask, other=0.0)
                pt -= lam * tl.exp2(_dot(k2, tl.trans(q2), zero, PREC, UPCAST) * qk_scale - lse2[None, :])
                if CAUSAL:
                    if start_m < start_n + BLOCK_N:
                        pt = tl.where(offs_m[None, :] >= offs_n[:, None], pt, 0.0)
                do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + ch_e[None, :],
                             mask=(offs_m[:, None] < T) & ok_e[None, :], other=0.0)
                dv = _dot(pt.to(do.dtype), do, dv, PREC, UPCAST)
        tl.store(DV + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + ch_e[None, :],
                 dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < S) & ok_e[None, :])

    @triton.jit(do_not_specialize=["T", "S"])
    def _bwd_dq_kernel(Q1, Q2, K1, K2, V, LAM, DO, LSE, DELTA, DQ1, DQ2,
                       stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                       stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                       stride_dqb, stride_dqh, stride_dqt,
                       H, N_REP, T, S, qk_scale, sm_scale,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
        """dQ_c of one query tile for one map c (the fastest grid index)."""
        qk_scale = tl.cast(qk_scale, tl.float32)
        sm_scale = tl.cast(sm_scale, tl.float32)
        c, tile, b, h = _map_program(H)
        pid_m = tl.cdiv(T, BLOCK_M) - 1 - tile
        pid_bh = tl.program_id(1)
        hk = h // N_REP
        Qc, Kc, DQc = _pick(c, Q1, Q2), _pick(c, K1, K2), _pick(c, DQ1, DQ2)
        lam = tl.load(LAM)
        coef = 1.0 - (c * 1.0) * (1.0 + lam)
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e, ch_e, ok_e = _value_channels(D, BLOCK_D)
        q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        qmask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
        q = tl.load(Qc + q_off, mask=qmask, other=0.0)
        do = tl.load(DO + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + ch_e[None, :],
                     mask=(offs_m[:, None] < T) & ok_e[None, :], other=0.0)
        row = (c * tl.num_programs(1) + pid_bh) * T + offs_m
        lse = tl.load(LSE + row, mask=offs_m < T, other=float("inf"))
        delta = tl.load(DELTA + row, mask=offs_m < T, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_base = b * stride_kb + hk * stride_kh
        v_base = b * stride_vb + hk * stride_vh
        if CAUSAL:
            end = tl.minimum(start_m + BLOCK_M, S)
        else:
            end = S
        for start_n in range(0, end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = tl.load(Kc + k_base + offs_n[:, None] * stride_kt + offs_d[None, :],
                        mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
            v = tl.load(V + v_base + offs_n[:, None] * stride_vt + ch_e[None, :],
                        mask=(offs_n[:, None] < S) & ok_e[None, :], other=0.0)
            p = tl.exp2(_dot(q, tl.trans(k), zero, PREC, UPCAST) * qk_scale - lse[:, None])
            if CAUSAL:
                if start_n + BLOCK_N > start_m:  # tile crosses the diagonal
                    p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
            dp = _dot(do, tl.trans(v), zero, PREC, UPCAST)
            ds = p * (coef * dp - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, dq, PREC, UPCAST)  # padded keys have k = 0: no mask needed
        tl.store(DQc + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
                 (dq * sm_scale).to(DQc.dtype.element_ty), mask=qmask)

    @triton.jit(do_not_specialize=["S", "CHUNK", "N_SPLIT"])
    def _decode_kernel(Q1, Q2, K1, K2, V, PACC, PML,
                       stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                       HKV, N_REP, S, CHUNK, N_SPLIT, qk_scale,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                       PREC: tl.constexpr, UPCAST: tl.constexpr):
        """One query row per head: rows of the tile are the n_rep query heads of one K/V head; this program
        folds keys [split·CHUNK, (split+1)·CHUNK) of map c into unnormalised partial results. The cache
        length S and the split sizes are not specialised on, so a growing cache never recompiles."""
        qk_scale = tl.cast(qk_scale, tl.float32)
        c, split, b, hk = _map_program(HKV)
        pid_bk = tl.program_id(1)
        Qc, Kc = _pick(c, Q1, Q2), _pick(c, K1, K2)
        offs_r = tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        offs_e, ch_e, ok_e = _value_channels(D, BLOCK_D)
        q = tl.load(Qc + b * stride_qb + (hk * N_REP + offs_r[:, None]) * stride_qh + offs_d[None, :],
                    mask=(offs_r[:, None] < N_REP) & (offs_d[None, :] < D), other=0.0)
        k_base = b * stride_kb + hk * stride_kh
        v_base = b * stride_vb + hk * stride_vh
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, 2 * BLOCK_D], dtype=tl.float32)
        lo = split * CHUNK
        hi = tl.minimum(lo + CHUNK, S)  # non-empty: the host makes every split hold >= 1 key
        for start_n in range(lo, hi, BLOCK_N):
            acc, m, l = _fwd_tile(acc, m, l, q, Kc, V, k_base, v_base, stride_kt, stride_vt, start_n, offs_r, offs_d,
                                  ch_e, ok_e, hi, qk_scale, D, BLOCK_N, False, True, PREC, UPCAST)
        # partials: PACC (B·HKV, N_SPLIT, 2 maps, BLOCK_R, 2·BLOCK_D), PML (B·HKV, N_SPLIT, 2 maps, (m, l), BLOCK_R)
        idx = (pid_bk * N_SPLIT + split) * 2 + c
        tl.store(PACC + idx * (BLOCK_R * 2 * BLOCK_D) + offs_r[:, None] * (2 * BLOCK_D) + offs_e[None, :], acc)
        tl.store(PML + (idx * 2) * BLOCK_R + offs_r, m)
        tl.store(PML + (idx * 2 + 1) * BLOCK_R + offs_r, l)

    @triton.jit(do_not_specialize=["N_SPLIT"])
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
            idx = (pid_bk * N_SPLIT + s) * 2
            gm1 = tl.maximum(gm1, tl.load(PML + (idx * 2) * BLOCK_R + offs_r))
            gm2 = tl.maximum(gm2, tl.load(PML + (idx * 2 + 2) * BLOCK_R + offs_r))
        gl1 = tl.zeros([BLOCK_R], dtype=tl.float32)
        gl2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        o1 = tl.zeros([BLOCK_R, 2 * BLOCK_D], dtype=tl.float32)
        o2 = tl.zeros([BLOCK_R, 2 * BLOCK_D], dtype=tl.float32)
        for s in range(0, N_SPLIT):
            idx = (pid_bk * N_SPLIT + s) * 2
            w1 = tl.exp2(tl.load(PML + (idx * 2) * BLOCK_R + offs_r) - gm1)
            w2 = tl.exp2(tl.load(PML + (idx * 2 + 2) * BLOCK_R + offs_r) - gm2)
            gl1 += w1 * tl.load(PML + (idx * 2 + 1) * BLOCK_R + offs_r)
            gl2 += w2 * tl.load(PML + (idx * 2 + 3) * BLOCK_R + offs_r)
            o1 += w1[:, None] * tl.load(PACC + idx * (BLOCK_R * 2 * BLOCK_D) + acc_off)
            o2 += w2[:, None] * tl.load(PACC + (idx + 1) * (BLOCK_R * 2 * BLOCK_D) + acc_off)
        lam = tl.load(LAM)
        out = o1 / gl1[:, None] - lam * (o2 / gl2[:, None])
        # row r is query head hk·N_REP + r, whose flat (b, h) index is pid_bk·N_REP + r
        o_off = (pid_bk * N_REP + offs_r[:, None]) * stride_oh + ch_e[None, :]
        tl.store(OUT + o_off, out.to(OUT.dtype.element_ty), mask=(offs_r[:, None] < N_REP) & ok_e[None, :])


# ---------------------------------------------------------------------------------------------- launch table
# Per-SM shared memory a block may opt into (bytes), by compute capability: what `fits` is judged against.
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
TARGETS = (80, 86, 89, 90, 100)  # what `diffattn bench compile` compiles for (sm_100 where triton has it)
KERNEL_NAMES = ("fwd", "bwd_dk", "bwd_dv", "bwd_dq", "decode", "decode_merge", "combine")


class Launch(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _arch_group(cc: int) -> str:
    """The configuration class of a target: sm100 (Blackwell datacenter: tcgen05), sm90 (Hopper: wgmma, 227 KB
    shared memory), sm86 (consumer Ampere/Ada and sm_120: 99 KB) and sm80 (A100 class: 163 KB)."""
    if cc >= 100 and cc != 120:
        return "sm100"
    if cc == 90:
        return "sm90"
    return "sm86" if SMEM_LIMIT.get(cc, 101376) <= 101376 else "sm80"


_FALLBACK_GROUP = {"sm100": "sm90", "sm86": "sm80"}  # a class without its own row uses this class's

# (kernel, target class, BLOCK_D) -> Launch, for bf16/fp16. Chosen from compiled candidates
# (benchmarks/compile_candidates.py, `diffattn bench compile`): every row compiles with 0 bytes spilled, within
# the target's shared memory and with tensor-core MMA (wgmma on sm_90) under triton 3.6 and 3.9; docs/benchmarks.md
# has the table. Head dims up to 64 use the 64 rows, larger ones the 128 rows.
_LAUNCH = {
    ("fwd", "sm90", 64): Launch(128, 64, 8, 3), ("fwd", "sm90", 128): Launch(128, 64, 8, 2),
    ("fwd", "sm80", 64): Launch(64, 64, 8, 2), ("fwd", "sm80", 128): Launch(64, 64, 8, 2),
    ("fwd", "sm100", 128): Launch(128, 32, 8, 2),
    ("bwd_dk", "sm90", 64): Launch(32, 64, 8, 2), ("bwd_dk", "sm90", 128): Launch(32, 64, 8, 2),
    ("bwd_dk", "sm80", 64): Launch(32, 32, 4, 2), ("bwd_dk", "sm80", 128): Launch(32, 64, 8, 2),
    ("bwd_dk", "sm100", 64): Launch(32, 64, 4, 2), ("bwd_dk", "sm100", 128): Launch(32, 32, 4, 2),
    ("bwd_dv", "sm90", 64): Launch(32, 64, 8, 2), ("bwd_dv", "sm90", 128): Launch(32, 64, 8, 2),
    ("bwd_dv", "sm80", 64): Launch(32, 64, 8, 2), ("bwd_dv", "sm80", 128): Launch(32, 64, 8, 2),
    ("bwd_dv", "sm100", 64): Launch(32, 64, 4, 2), ("bwd_dv", "sm100", 128): Launch(32, 32, 4, 2),
    ("bwd_dq", "sm90", 64): Launch(64, 64, 4, 2), ("bwd_dq", "sm90", 128): Launch(64, 32, 4, 2),
    ("bwd_dq", "sm80", 64): Launch(64, 32, 4, 2), ("bwd_dq", "sm80", 128): Launch(64, 64, 8, 2),
    ("bwd_dq", "sm86", 128): Launch(64, 64, 8, 1),
    ("decode", "sm90", 64): Launch(16, 64, 4, 2), ("decode", "sm90", 128): Launch(16, 32, 4, 2),
    ("decode", "sm80", 64): Launch(16, 64, 4, 2), ("decode", "sm80", 128): Launch(16, 32, 4, 2),
    ("decode_merge", "sm90", 64): Launch(16, 64, 4, 1), ("decode_merge", "sm90", 128): Launch(16, 32, 4, 1),
    ("decode_merge", "sm80", 64): Launch(16, 64, 4, 1), ("decode_merge", "sm80", 128): Launch(16, 32, 4, 1),
    ("decode_merge", "sm100", 128): Launch(16, 32, 8, 1),
}
_INTERPRETER_LAUNCH = Launch(16, 16, 4, 1)


def _table_config(kernel: str, cc: int, block_d: int) -> Launch:
    group, width = _arch_group(cc), 64 if block_d <= 64 else 128
    while (kernel, group, width) not in _LAUNCH:
        group = _FALLBACK_GROUP[group]
    return _LAUNCH[(kernel, group, width)]


def launch_config(kernel: str, cc: int, block_d: int) -> Launch:
    """The shipped launch configuration of ``kernel`` on compute capability ``cc`` at tile width ``block_d``
    (head dims up to 64 use the 64 row, larger ones the 128 row)."""
    return _INTERPRETER_LAUNCH if INTERPRET else _table_config(kernel, cc, block_d)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _dot_args(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for tl.dot: IEEE fp32 for fp32 inputs; bf16 widened in the interpreter."""
    return ("ieee" if dtype == torch.float32 else "tf32"), (INTERPRET and dtype == torch.bfloat16)


def _opts(cfg: Launch) -> dict:
    # enable_fp_fusion given explicitly: triton 3.9 warns when it is left to its default
    return {} if INTERPRET else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[int, int]:
    """(compute capability as 90 for sm_90, SM count) of a CUDA device, read once."""
    if INTERPRET:
        return 90, 1
    props = torch.cuda.get_device_properties(index)
    return props.major * 10 + props.minor, props.multi_processor_count


def _cc(x: torch.Tensor) -> int:
    return _device_info(x.device.index or 0)[0] if x.device.type == "cuda" else 90


# ---------------------------------------------------------------------------------------------- host side
def _last_dim_contiguous(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels take one set of strides for each (Q1, Q2) and (K1, K2) pair."""
    if a.stride() != b.stride():
        a, b = a.contiguous(), b.contiguous()
    return a, b


def _forward(q1, q2, k1, k2, v, lam, causal: bool, scale: float, save: bool):
    """(out, O2, LSE) with LSE (2, B, H, T) in log2 units (only when ``save``)."""
    bsz, h, t, d = q1.shape
    hkv, s = k1.shape[1], k1.shape[2]
    out = torch.empty(bsz, h, t, 2 * d, device=q1.device, dtype=q1.dtype)  # O1 first, then out = O1 − λ·O2
    o2 = torch.empty_like(out)
    lse = torch.empty(2, bsz, h, t, device=q1.device, dtype=torch.float32) if save else out
    bd = _block_d(d)
    cfg = launch_config("fwd", _cc(q1), bd)
    prec, upcast = _dot_args(q1.dtype)
    _fwd_kernel[(2 * triton.cdiv(t, cfg.block_m), bsz * h)](
        q1, q2, k1, k2, v, out, o2, lse,
        q1.stride(0), q1.stride(1), q1.stride(2), k1.stride(0), k1.stride(1), k1.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        h, h // hkv, t, s, scale * LOG2E,
        D=d, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, SAVE=save,
        PREC=prec, UPCAST=upcast, **_opts(cfg))
    n = out.numel()
    _combine_kernel[(triton.cdiv(n, 1024),)](out, o2, lam, n, BLOCK=1024, **({} if INTERPRET else dict(num_warps=4)))
    return out, o2, lse


def _backward(dout, q1, q2, k1, k2, v, lam, out, o2, lse, causal: bool, scale: float):
    bsz, h, t, d = q1.shape
    hkv, s = k1.shape[1], k1.shape[2]
    dout = dout.contiguous()  # same layout as out (contiguous)
    # r_c = rowsum(dO ⊙ O_c), with O1 = out + λ·O2 (see the module docstring); fp32
    r2 = (dout.float() * o2.float()).sum(-1)
    r1 = (dout.float() * out.float()).sum(-1) + lam * r2
    delta = torch.stack((r1, -lam * r2)).contiguous()  # (2, B, H, T): δ1 = r1, δ2 = −λ·r2
    dlam = -r2.sum()
    dq1, dq2 = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q1, q2))
    dk1 = torch.empty(k1.shape, device=k1.device, dtype=k1.dtype)
    dk2 = torch.empty_like(dk1)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    bd = _block_d(d)
    cc = _cc(q1)
    prec, upcast = _dot_args(q1.dtype)
    common = (q1.stride(0), q1.stride(1), q1.stride(2), k1.stride(0), k1.stride(1), k1.stride(2),
              v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    cfg = launch_config("bwd_dk", cc, bd)
    _bwd_dk_kernel[(2 * triton.cdiv(s, cfg.block_n), bsz * hkv)](
        q1, q2, k1, k2, v, lam, dout, lse, delta, dk1, dk2, *common, dk1.stride(0), dk1.stride(1), dk1.stride(2),
        h, hkv, h // hkv, t, s, scale * LOG2E, scale,
        D=d, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, PREC=prec, UPCAST=upcast,
        **_opts(cfg))
    cfg = launch_config("bwd_dv", cc, bd)
    _bwd_dv_kernel[(triton.cdiv(s, cfg.block_n), bsz * hkv)](
        q1, q2, k1, k2, lam, dout, lse, dv, *common[:6], *common[9:], dv.stride(0), dv.stride(1), dv.stride(2),
        h, hkv, h // hkv, t, s, scale * LOG2E,
        D=d, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, PREC=prec, UPCAST=upcast,
        **_opts(cfg))
    cfg = launch_config("bwd_dq", cc, bd)  # causal needs BLOCK_M % BLOCK_N == 0
    _bwd_dq_kernel[(2 * triton.cdiv(t, cfg.block_m), bsz * h)](
        q1, q2, k1, k2, v, lam, dout, lse, delta, dq1, dq2, *common,
        dq1.stride(0), dq1.stride(1), dq1.stride(2),
        h, h // hkv, t, s, scale * LOG2E, scale,
        D=d, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, PREC=prec, UPCAST=upcast,
        **_opts(cfg))
    return dq1, dq2, dk1, dk2, dv, dlam


def _generic(q1, q2, k1, k2, v, lam, causal: bool, scale: float) -> torch.Tensor:
    """The same function through PyTorch's SDPA (the fallback): two calls over the 2d-wide value."""
    kw = dict(mask=None, is_causal=causal, scale=scale)
    a1, _ = sdpa_attention(q1, k1, v, **kw)
    a2, _ = sdpa_attention(q2, k2, v, **kw)
    return a1 - lam.to(a1.dtype) * a2


class _DifferentialAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q1, q2, k1, k2, v, lam, causal, scale):
        out, o2, lse = _forward(q1, q2, k1, k2, v, lam, causal, scale, save=True)
        save_differential(ctx, (q1, q2, k1, k2, v, lam), out, o2, lse, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q1, q2, k1, k2, v, lam, out, o2, lse = ctx.saved_tensors
        try:
            grads = _backward(dout, q1, q2, k1, k2, v, lam, out, o2, lse, ctx.causal, ctx.scale)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot compile or launch must not end the run
            _note_failure("backward", q1, e)
            inputs = [x.detach().requires_grad_() for x in (q1, q2, k1, k2, v, lam)]
            with torch.enable_grad():
                ref = _generic(*inputs, ctx.causal, ctx.scale)
            grads = torch.autograd.grad(ref, inputs, dout)
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
    cfg = launch_config("decode", _cc(q1), bd)
    bn = cfg.block_n
    if n_split is None:
        sms = _device_info(q1.device.index or 0)[1] if q1.device.type == "cuda" else 1
        n_split = max(1, min(triton.cdiv(sms, bsz * hkv), triton.cdiv(s, 4 * bn)))
    chunk = triton.cdiv(triton.cdiv(s, max(1, n_split)), bn) * bn
    n_split = triton.cdiv(s, chunk)  # every split holds at least one key
    block_r = max(16, triton.next_power_of_2(n_rep))
    pacc = torch.empty(bsz * hkv, n_split, 2, block_r, 2 * bd, device=q1.device, dtype=torch.float32)
    pml = torch.empty(bsz * hkv, n_split, 2, 2, block_r, device=q1.device, dtype=torch.float32)
    prec, upcast = _dot_args(q1.dtype)
    _decode_kernel[(2 * n_split, bsz * hkv)](
        q1, q2, k1, k2, v, pacc, pml, q1.stride(0), q1.stride(1), k1.stride(0), k1.stride(1), k1.stride(2),
        v.stride(0), v.stride(1), v.stride(2), hkv, n_rep, s, chunk, n_split, scale * LOG2E,
        D=d, BLOCK_D=bd, BLOCK_R=block_r, BLOCK_N=bn, PREC=prec, UPCAST=upcast, **_opts(cfg))
    out = torch.empty(bsz, h, 1, 2 * d, device=q1.device, dtype=q1.dtype)
    _decode_merge_kernel[(bsz * hkv,)](pacc, pml, lam, out, out.stride(1), n_rep, n_split,
                                       D=d, BLOCK_D=bd, BLOCK_R=block_r,
                                       **_opts(launch_config("decode_merge", _cc(q1), bd)))
    return out


# ---------------------------------------------------------------------------------------------- routing, fallback
log = logging.getLogger("diffattn.triton")
_NOTED: set = set()  # (what, reason) pairs already logged: one line each per process
_FAILED: dict = {}  # (cc, dtype, d, causal, kind) -> why: shapes whose kernel failed to compile or launch


def _say_once(key, message: str) -> None:
    if key not in _NOTED:
        _NOTED.add(key)
        log.warning(message)


def _note_failure(kind: str, x: torch.Tensor, err: BaseException, key=None) -> None:
    why = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    if key is not None:
        _FAILED[key] = why
    _say_once(("failed", kind, x.dtype, x.shape[-1], why),
              f"diffattn: the fused triton kernel ({kind}, {str(x.dtype).removeprefix('torch.')}, head_dim "
              f"{x.shape[-1]}) failed to compile or launch ({why}); using sdpa for this shape")


def route_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why a call of this dtype on this device goes to ``sdpa`` instead of the fused kernel (None: it doesn't).
    fp32 on a GPU: the fp32 kernels (IEEE dots, no tensor cores) need roughly twice the registers and shared
    memory of bf16 and spill kilobytes per thread, or exceed the shared memory of sm_80/86/89 (issue #26), so the
    dispatcher sends fp32 to PyTorch's SDPA. Under the interpreter (CPU tests) fp32 runs the kernels."""
    if dtype == torch.float32 and device.type == "cuda" and not INTERPRET:
        return "fp32 on a GPU is routed to sdpa (the fused kernel is compiled for bf16/fp16)"
    return None


@_compiler_disable
def differential(q1, q2, k1, k2, v, lam, *, mask=None, is_causal=True, scale: float):
    """(softmax(Q1K1ᵀ·scale) − λ·softmax(Q2K2ᵀ·scale))·V in one fused pass, or ``None`` when this call
    needs the generic path: an explicit boolean ``mask`` (left padding), fp32 on a GPU (:func:`route_reason`), or
    a shape whose kernel failed to compile or launch (logged once, then ``sdpa`` serves it).

    q1, q2: (B, H, T, d)   k1, k2: (B, Hkv, S, d)   v: (B, Hkv, S, 2d)   lam: 0-d tensor   → (B, H, T, 2d)
    Differentiable in q1, q2, k1, k2, v and λ. A single query row without autograd (a decode step)
    uses the split-key decode kernels. torch.compile does not trace into this function (a graph break):
    the launches and their fallback run as they do eagerly.
    """
    if mask is not None:
        return None
    _check(q1, q2, k1, k2, v, lam)
    if is_causal and q1.shape[2] != k1.shape[2]:
        raise ValueError("is_causal without a mask needs as many queries as keys; pass an explicit mask")
    routed = route_reason(q1.dtype, q1.device)
    if routed:
        _say_once(("routed", q1.dtype), f"diffattn: {routed}")
        return None
    q1, q2, k1, k2, v = _last_dim_contiguous(q1, q2, k1, k2, v)
    q1, q2 = _same_strides(q1, q2)
    k1, k2 = _same_strides(k1, k2)
    lam32 = lam.reshape(()).to(torch.float32)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q1, q2, k1, k2, v, lam32))
    t = q1.shape[2]
    causal = bool(is_causal) and t > 1
    kind = "decode" if (not needs_grad and t == 1) else "forward"
    key = (_cc(q1), q1.dtype, q1.shape[-1], causal, kind)
    if key in _FAILED:
        return None
    try:
        if kind == "decode":
            return decode(q1, q2, k1, k2, v, lam32.detach().contiguous(), scale=scale)
        if not needs_grad:
            return _forward(q1, q2, k1, k2, v, lam32.detach().contiguous(), causal, scale, save=False)[0]
        return _DifferentialAttention.apply(q1, q2, k1, k2, v, lam32, causal, float(scale))
    except Exception as e:  # noqa: BLE001 - OutOfResources, CompilationError, PTXASError, an unsupported target...
        _note_failure(kind, q1, e, key)
        return None


# ---------------------------------------------------------------------------------------------- compile plans
def jit_kernels() -> dict:
    """The Triton kernels by the names ``diffattn bench compile`` uses."""
    return {"fwd": _fwd_kernel, "bwd_dk": _bwd_dk_kernel, "bwd_dv": _bwd_dv_kernel, "bwd_dq": _bwd_dq_kernel,
            "decode": _decode_kernel, "decode_merge": _decode_merge_kernel, "combine": _combine_kernel}


_SCALARS_FP = ("qk_scale", "sm_scale")
_FP32_POINTERS = {"LAM", "LSE", "DELTA", "PACC", "PML"}


def _kernel_args(name: str, cc: int, d: int, dtype: str, causal: bool, launch: Launch | None):
    """(jit function, constexprs, Launch) of one kernel as the host launches it for a bf16/fp16/fp32 call."""
    bd = _block_d(d)
    if name == "combine":
        return _combine_kernel, dict(BLOCK=1024), Launch(0, 0, 4, 1)
    cfg = launch or _table_config(name, cc, bd)
    prec = "ieee" if dtype == "fp32" else "tf32"
    common = dict(D=d, BLOCK_D=bd, PREC=prec, UPCAST=False)
    if name == "fwd":
        return _fwd_kernel, dict(common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, SAVE=True), cfg
    if name in ("bwd_dk", "bwd_dv", "bwd_dq"):
        return jit_kernels()[name], dict(common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal), cfg
    if name == "decode":
        return _decode_kernel, dict(common, BLOCK_R=16, BLOCK_N=cfg.block_n), cfg
    if name == "decode_merge":
        return _decode_merge_kernel, dict(D=d, BLOCK_D=bd, BLOCK_R=16), cfg
    raise ValueError(f"unknown kernel {name!r}; valid: {', '.join(KERNEL_NAMES)}")


def compile_plan(name: str, cc: int, d: int, dtype: str, *, causal: bool = True, launch: Launch | None = None,
                 scalar_fp: str = "fp32", scalar_int: str = "i32") -> dict:
    """What ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target, options)`` needs to build
    ``name`` for sm_<cc> exactly as :func:`differential` launches it on such a GPU: the shipped launch
    configuration (or ``launch``), pointers of ``dtype`` (fp32 for statistics), every pointer 16-byte aligned and
    every stride a multiple of 16 (contiguous tensors with d % 16 == 0), causal, the training forward
    (``SAVE``). ``scalar_fp``/``scalar_int`` type the scalar arguments (torch.compile's inductor passes fp64
    floats)."""
    fn, constexprs, cfg = _kernel_args(name, cc, d, dtype, causal, launch)
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in _SCALARS_FP:
            signature[arg] = scalar_fp
        elif arg.isupper() and arg not in ("H", "HKV", "N_REP", "T", "S", "N", "CHUNK", "N_SPLIT"):
            signature[arg] = "*fp32" if arg in _FP32_POINTERS else "*" + dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = scalar_int
            if arg.startswith("stride_") and (2 * d) % 16 == 0 and d % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)
    return dict(kernel=name, fn=fn, signature=signature, constexprs=constexprs, attrs=attrs, options=options,
                launch=cfg)


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


__all__ = ["AVAILABLE", "INTERPRET", "KERNEL_NAMES", "Launch", "SMEM_LIMIT", "TARGETS", "compile_plan", "decode",
           "differential", "jit_kernels", "launch_config", "route_reason", "unavailable_reason"]
