"""Compile candidate launch configurations of the Triton kernels for GPU targets on this CPU (issue #26).

    .venv/bin/python benchmarks/compile_candidates.py --kernel bwd_dkdv --arch sm_80 sm_90 --head-dim 64 128 \
        --launch 32,64,8,2 64,64,8,2 [--dtype bf16] [--json OUT]

Each --launch is BLOCK_M,BLOCK_N,num_warps,num_stages. Prints one row per candidate (registers, spill bytes,
shared memory, MMA family, pass/fail); the shipped table is triton_diff._LAUNCH, chosen from these runs.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffattn.bench import compile as cc  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", nargs="+", required=True, choices=cc.KERNELS)
    p.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"])
    p.add_argument("--dtype", nargs="+", default=["bf16"])
    p.add_argument("--head-dim", nargs="+", type=int, default=[64, 128])
    p.add_argument("--launch", nargs="+", required=True, help="BLOCK_M,BLOCK_N,num_warps,num_stages")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--json")
    args = p.parse_args()
    launches = [tuple(int(x) for x in s.split(",")) for s in args.launch]
    jobs = [{"kernel": k, "arch": a, "dtype": t, "head_dim": d, "launch": lc, "cache": str(cc.cache_dir())}
            for k in args.kernel for a in args.arch for t in args.dtype for d in args.head_dim for lc in launches]
    rows = cc.run_jobs(jobs, args.jobs)
    print(cc.table({"rows": rows}))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
