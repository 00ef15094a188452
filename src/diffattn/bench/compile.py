"""``diffattn bench compile``: every Triton kernel compiled for real GPU targets on a CPU (issue #26).

No GPU and no driver are needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs the
whole NVIDIA back end (TTIR -> TTGIR -> LLVM -> PTX -> ``ptxas`` -> cubin) on the CPU. Each kernel of
``model/triton_diff.py`` is built exactly as :func:`triton_diff.differential` launches it on such a GPU (its
shipped launch configuration, pointer dtypes, 16-byte alignment) and each row records

* ``regs`` / ``stack_bytes``: ``cuobjdump -res-usage`` on the cubin (REG, STACK);
* ``spill_bytes``: ptxas's "bytes spill stores" per thread (triton's own ``ptxas -v`` log, captured);
* ``smem_bytes``: ``kernel.metadata.shared``, against ``smem_limit``, the target's per-block opt-in maximum;
* ``fits``: compiled, and the shared memory within the limit;
* ``tensor_cores``: the MMA instruction family in the PTX (``wgmma``, ``tcgen05``, ``mma.sync``) or null;
* ``routed_to``: ``"sdpa"`` where the dispatcher never sends the case to the kernel (fp32 on a GPU); those
  rows are not compiled unless ``--include-routed``;
* ``ok``: 0 spill bytes, fits, and for the forward/backward kernels tensor-core MMA (wgmma on sm_90).

It proves resources and instruction selection, the preconditions of speed; it cannot prove speed. Results
are cached by a hash of the kernel source, signature, options, target and triton version, so a re-run only
compiles what changed. Compiles run in worker processes (``--jobs``, default: the CPU count).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..utils.errors import UsageError

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100")
DTYPES = ("bf16", "fp16", "fp32")
HEAD_DIMS = (64, 96, 128)
KERNELS = ("fwd", "bwd_dk", "bwd_dv", "bwd_dq", "decode", "decode_merge", "combine")
TENSOR_CORE_KERNELS = ("fwd", "bwd_dk", "bwd_dv", "bwd_dq")
ROUTED = {"fp32": "sdpa"}  # dtype -> where differential() sends it on a GPU (triton_diff.route_reason)


def preset_head_dims() -> list[int]:
    """The head dims of the presets' DIFF V1 configurations (16 ... 128)."""
    from .. import presets

    return sorted({presets.get(size, "diff_v1").head_dim for size in presets.SIZES})


def default_head_dims() -> list[int]:
    return sorted(set(HEAD_DIMS) | set(preset_head_dims()))


def _cc(arch: str) -> int:
    return int(arch.removeprefix("sm_"))


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diffattn" / "compile"


# ------------------------------------------------------------------------------------------ in a worker
def _worker_init(triton_cache: str) -> None:
    """A compile worker: compiled (not interpreted) kernels, a private triton cache (so ptxas always runs
    and its log is seen), no warning about triton's fp-fusion default."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = triton_cache
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _cuobjdump(cubin: bytes) -> dict:
    """REG and STACK of the cubin's kernel (``cuobjdump -res-usage``)."""
    from triton.backends.nvidia import compiler as nv

    path = Path(nv.__file__).parent / "bin" / "cuobjdump"
    if not path.is_file():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(path), "-res-usage", f.name], capture_output=True, text=True, timeout=120)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res.stdout)
    return {"regs": int(m[1]), "stack_bytes": int(m[2]), "local_bytes": int(m[4])} if m else {}


def _ptxas_log(log: str) -> dict:
    out = {}
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out.update(stack_bytes=int(m[1]), spill_bytes=int(m[2]), spill_loads=int(m[3]))
    if m := re.search(r"Used (\d+) registers", log):
        out["regs"] = int(m[1])
    return out


def tensor_core_family(ptx: str) -> str | None:
    for family, pattern in (("tcgen05", r"\btcgen05\.mma"), ("wgmma", r"\bwgmma\.mma_async"),
                            ("mma.sync", r"\bmma\.sync")):
        if re.search(pattern, ptx):
            return family
    return None


def _row_key(plan: dict, cc: int, triton_version: str) -> str:
    fn = plan["fn"]
    key = json.dumps({"src": fn.cache_key, "sig": plan["signature"], "const": {k: str(v) for k, v in
                      plan["constexprs"].items()}, "attrs": {str(k): v for k, v in plan["attrs"].items()},
                      "opts": plan["options"], "cc": cc, "triton": triton_version}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def compile_one(job: dict) -> dict:
    """Compile one kernel for one target (in a worker process); a failure is recorded in the row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..model import triton_diff

    arch, dtype, d, name = job["arch"], job["dtype"], job["head_dim"], job["kernel"]
    cc = _cc(arch)
    launch = triton_diff.Launch(*job["launch"]) if job.get("launch") else None
    plan = triton_diff.compile_plan(name, cc, d or 64, dtype, launch=launch, scalar_fp=job.get("scalar_fp", "fp32"),
                                    scalar_int=job.get("scalar_int", "i32"))
    cfg = plan["launch"]
    row = {"kernel": name, "arch": arch, "dtype": dtype, "head_dim": d, "block_m": cfg.block_m,
           "block_n": cfg.block_n, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
           "smem_limit": triton_diff.SMEM_LIMIT.get(cc), "routed_to": None}
    key = _row_key(plan, cc, triton.__version__)
    cached = Path(job["cache"]) / f"{key}.json" if job.get("cache") else None
    if cached is not None and cached.is_file():
        return {**row, **json.loads(cached.read_text()), "cached": True}
    t0 = time.time()
    log = io.StringIO()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(plan["fn"], plan["signature"], plan["constexprs"], plan["attrs"]),
                               target=GPUTarget("cuda", cc, 32), options=plan["options"])
        res = {**_ptxas_log(log.getvalue()), **_cuobjdump(k.asm["cubin"]), "smem_bytes": int(k.metadata.shared),
               "tensor_cores": tensor_core_family(k.asm["ptx"]), "error": None}
    except Exception as e:  # noqa: BLE001 - recorded: an out-of-resources or unsupported target is a result
        res = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
    res["compile_s"] = round(time.time() - t0, 2)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, cached)
    return {**row, **res, "cached": False}


# ------------------------------------------------------------------------------------------ the matrix
def judge(row: dict) -> dict:
    """fits / ok for one row (see the module docstring)."""
    if row.get("routed_to") or row.get("error"):
        return {**row, "fits": None if row.get("routed_to") else False, "ok": None if row.get("routed_to") else False}
    fits = row["smem_bytes"] <= (row["smem_limit"] or 0)
    tc_ok = True
    if row["kernel"] in TENSOR_CORE_KERNELS and row["dtype"] != "fp32":
        want = "wgmma" if row["arch"] == "sm_90" else None
        tc_ok = row.get("tensor_cores") is not None and (want is None or row["tensor_cores"] == want)
    return {**row, "fits": fits, "ok": bool(fits and row.get("spill_bytes", 0) == 0 and tc_ok)}


def jobs_for(archs, dtypes, head_dims, kernels, include_routed: bool, cache: str | None) -> tuple[list, list]:
    """(compile jobs, routed rows) of the matrix, in table order."""
    jobs, routed = [], []
    for arch in archs:
        for dtype in dtypes:
            for kernel in kernels:
                for d in ([None] if kernel == "combine" else head_dims):
                    base = {"kernel": kernel, "arch": arch, "dtype": dtype, "head_dim": d}
                    if dtype in ROUTED and not include_routed:
                        routed.append({**base, "routed_to": ROUTED[dtype]})
                    else:
                        jobs.append({**base, "cache": cache})
    return jobs, routed


def run_jobs(jobs: list[dict], n_jobs: int | None = None, progress=None) -> list[dict]:
    """Compile the jobs in worker processes (spawned: the parent may run the Triton interpreter)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    n_jobs = max(1, min(n_jobs or os.cpu_count() or 1, len(jobs) or 1))
    with tempfile.TemporaryDirectory(prefix="diffattn-triton-cache-") as tcache, \
            ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                initargs=(tcache,)) as pool:
        rows = []
        for i, row in enumerate(pool.map(compile_one, jobs)):
            rows.append(judge(row))
            if progress:
                progress(i + 1, len(jobs), row)
    return rows


def compile_matrix(archs=ARCHS, dtypes=DTYPES, head_dims=None, kernels=KERNELS, *, include_routed=False,
                   cache: str | Path | None = None, n_jobs: int | None = None, progress=None) -> dict:
    import triton

    head_dims = list(head_dims or default_head_dims())
    jobs, routed = jobs_for(archs, dtypes, head_dims, kernels, include_routed, str(cache) if cache else None)
    t0 = time.time()
    rows = run_jobs(jobs, n_jobs, progress) + [judge(r) for r in routed]
    order = {(a, t, k): i for i, (a, t, k) in enumerate((a, t, k) for a in archs for t in dtypes for k in kernels)}
    rows.sort(key=lambda r: (order[(r["arch"], r["dtype"], r["kernel"])], r["head_dim"] or 0))
    return {"triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "wall_s": round(time.time() - t0, 1), "rows": rows}


# ------------------------------------------------------------------------------------------ output
def _cell(v) -> str:
    return "–" if v is None else str(v)


def table(result: dict) -> str:
    head = ["kernel", "arch", "dtype", "d", "tiles", "warps", "regs", "spill", "smem", "limit", "fits", "MMA", "ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if r.get("routed_to"):
            cells = [r["kernel"], r["arch"], r["dtype"], _cell(r["head_dim"]), f"routed to {r['routed_to']}",
                     "", "", "", "", "", "", "", ""]
        elif r.get("error"):
            cells = [r["kernel"], r["arch"], r["dtype"], _cell(r["head_dim"]), f"{r['block_m']}×{r['block_n']}",
                     f"{r['num_warps']}/{r['num_stages']}", "", "", "", "", "no", r["error"][:60], "no"]
        else:
            cells = [r["kernel"], r["arch"], r["dtype"], _cell(r["head_dim"]), f"{r['block_m']}×{r['block_n']}",
                     f"{r['num_warps']}/{r['num_stages']}", _cell(r.get("regs")), _cell(r.get("spill_bytes")),
                     _cell(r.get("smem_bytes")), _cell(r.get("smem_limit")), "yes" if r["fits"] else "**no**",
                     _cell(r.get("tensor_cores")), "yes" if r["ok"] else "**no**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact_table(result: dict, dtype: str = "bf16") -> str:
    """One line per (kernel, target), one column per head dim: "regs / spill B / shared KB / MMA" (docs)."""
    rows = [r for r in result["rows"] if r["dtype"] == dtype and not r.get("routed_to")]
    heads = sorted({r["head_dim"] for r in rows if r["head_dim"] is not None})
    lines = ["| kernel | arch | " + " | ".join(f"d = {d}" for d in heads) + " |", "|---|---|" + "---|" * len(heads)]
    seen = []
    for r in rows:
        if (r["kernel"], r["arch"]) not in seen:
            seen.append((r["kernel"], r["arch"]))
    for kernel, arch in seen:
        cells = []
        for d in heads:
            r = next((x for x in rows if (x["kernel"], x["arch"], x["head_dim"]) == (kernel, arch, d)), None)
            if kernel == "combine":
                r = next((x for x in rows if (x["kernel"], x["arch"]) == (kernel, arch)), None)
            if r is None:
                cells.append("")
            elif r.get("error"):
                cells.append("error: " + r["error"][:40])
            else:
                spill = f"**{r['spill_bytes']} B spill**" if r.get("spill_bytes") else "0 spill"
                smem = f"{r['smem_bytes'] / 1024:.0f} KB" + ("" if r["fits"] else " **(over)**")
                cells.append(f"{r.get('regs')} regs, {spill}, {smem}, {r.get('tensor_cores') or '–'}")
        lines.append(f"| {kernel} | {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(result: dict) -> str:
    rows = [r for r in result["rows"] if not r.get("routed_to")]
    bad = [r for r in rows if not r["ok"]]
    cached = sum(1 for r in rows if r.get("cached"))
    return (f"triton {result['triton']}: {len(rows)} kernels compiled ({cached} from the cache) in "
            f"{result['wall_s']:.0f}s; {len(rows) - len(bad)} pass, {len(bad)} do not; "
            f"{len(result['rows']) - len(rows)} rows routed to sdpa")


# ------------------------------------------------------------------------------------------ the command
DESCRIPTION = __doc__.splitlines()[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", help='also write {"triton": ..., "rows": [...]} to this file')
    p.add_argument("--arch", nargs="+", default=list(ARCHS), metavar="SM", help=f"targets (default: {' '.join(ARCHS)})")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES, help="dtypes (default: all)")
    p.add_argument("--head-dim", nargs="+", type=int, default=None, metavar="D",
                   help="head dims (default: 64 96 128 and the presets' DIFF V1 head dims)")
    p.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=KERNELS, help="kernels (default: all)")
    p.add_argument("--include-routed", action="store_true", help="also compile the rows routed to sdpa (fp32)")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: the CPU count)")
    p.add_argument("--cache-dir", default=None, help=f"result cache (default: {cache_dir()})")
    p.add_argument("--no-cache", action="store_true", help="compile everything again")
    p.add_argument("--strict", action="store_true", help="exit 1 when a bf16/fp16 row at d <= 128 on sm_80/sm_90 "
                                                         "does not pass")
    p.add_argument("--compact", action="store_true", help="print one line per kernel and target (bf16) instead of "
                                                          "one per row")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=main)


def main(args) -> int:
    for a in args.arch:
        if not re.fullmatch(r"sm_\d{2,3}", a):
            raise UsageError(f"--arch {a!r}: expected a target like sm_90")
    if any(d < 2 or d % 2 or d > 256 for d in (args.head_dim or [])):
        raise UsageError(f"--head-dim {args.head_dim}: each must be even, 2..256")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: must be >= 1")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise UsageError("diffattn bench compile needs the triton package (pip install 'diffattn[triton]')") from None
    cache = None if args.no_cache else (args.cache_dir or cache_dir())

    def progress(i, n, row):
        if not args.quiet:
            what = "cached" if row.get("cached") else f"{row.get('compile_s', 0):.1f}s"
            print(f"[{i}/{n}] {row['kernel']} {row['arch']} {row['dtype']} d={row['head_dim']}: {what}",
                  file=sys.stderr, flush=True)

    result = compile_matrix(args.arch, args.dtype, args.head_dim, args.kernel, include_routed=args.include_routed,
                            cache=cache, n_jobs=args.jobs, progress=progress)
    result["command"] = "diffattn bench compile " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "compile"] \
        else "diffattn bench compile"
    print(compact_table(result) if args.compact else table(result))
    print(summary(result))
    if args.json:
        from ..fsutil import write_text_atomic

        write_text_atomic(Path(args.json), json.dumps(result, indent=1) + "\n")
    if args.strict:
        return 0 if all(r["ok"] for r in result["rows"] if required(r)) else 1
    return 0


def required(row: dict) -> bool:
    """The rows issue #26 requires to pass: bf16/fp16, d <= 128, sm_80 and sm_90 (every kernel)."""
    return (row["dtype"] in ("bf16", "fp16") and row["arch"] in ("sm_80", "sm_90") and not row.get("routed_to")
            and (row["head_dim"] is None or row["head_dim"] <= 128))
