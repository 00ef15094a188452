"""``diffattn bench train``: whole-model training steps — tokens/s, peak memory, MFU on GPU.

One step = forward of a ``DecoderLM`` on (B, T) random tokens, next-token cross-entropy, backward,
AdamW update (mixed precision via autocast for bf16/fp16, fp32 master weights). Rows: every
diffattn variant at the matched shape, DIFF V1 with the authors' split-value core, and transformers'
``DiffLlamaForCausalLM`` (SDPA) with the same widths, depth and vocabulary.

MFU (GPU only) = model FLOPs per step / step time / the device's dense peak (``--peak-tflops``, or a
table of known GPUs for bf16/fp16). Model FLOPs count what each variant's algebra needs: 6 FLOPs per
matmul weight per token, plus causal attention 3 × 2 × Σ_i (i+1) × (W_qk + W_v) per layer, where W_qk
and W_v are the summed query/key and value widths of all attention maps (standard 2H·d and 2H·d;
DIFF V1 2H·d and 2H·2d, both maps sharing V; DIFF V2 2H·d and 2H·d). DiffLlama is counted as DIFF V1.
Memory: see ``common`` (CUDA allocator peak; on CPU the peak RSS of a fresh child process per row).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from argparse import Namespace

import torch

from .. import variants
from ..model import build_model
from ..model.loss import next_token_loss
from ..model.attention import attention_class
from ..utils.environment import environment
from . import common
from .references import diffllama_config, use_authors_core

PEAK_TFLOPS_HALF = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.2, "RTX 3090": 71.0}


def row_specs(args) -> dict[str, dict]:
    rows = {}
    for variant in args.variant_list:
        kern = args.kernel if variants.fused_differential(variant) else "sdpa"  # fused kernels serve DIFF V1-like
        rows[f"{variant} [{kern}]"] = dict(variant=variant, impl=f"diffattn {kern}", kernel=args.kernel)
    if args.references:
        rows["diff_v1 [authors split-value]"] = dict(variant="diff_v1", impl="authors flashdiff_2 core", kernel="sdpa",
                                                     authors=True)
        rows["DiffLlamaForCausalLM [transformers sdpa]"] = dict(variant="diff_v1", impl="transformers DiffLlama", hf=True)
    return rows


def build_row(args, shape: common.Shape, spec: dict):
    """(model, step function, model FLOPs per step, config matching) for one row."""
    dev, dt = args.device, args.torch_dtype
    cfg, matched = common.bench_config(shape, spec["variant"], spec.get("kernel", "sdpa"))
    torch.manual_seed(0)
    if spec.get("hf"):
        from transformers import DiffLlamaForCausalLM

        model = DiffLlamaForCausalLM(diffllama_config(cfg)).to(dev)
        forward = lambda ids: model(input_ids=ids).logits  # noqa: E731
    else:
        model = build_model(cfg).to(dev)
        if spec.get("authors"):
            use_authors_core(model)
        forward = model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, shape.vocab_size, (shape.batch, shape.seq_len), device=dev,
                        generator=torch.Generator(device="cpu").manual_seed(1) if dev == "cpu" else None)
    autocast = (torch.autocast(device_type=dev, dtype=dt) if dt != torch.float32 else contextlib.nullcontext())
    if args.compile:
        forward = torch.compile(forward)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = forward(ids)
        loss = next_token_loss(logits, ids)
        loss.backward()
        opt.step()

    return model, step, model_flops(model, cfg, shape), matched


def model_flops(model: torch.nn.Module, cfg, shape: common.Shape) -> float:
    """Model FLOPs of one training step (see the module docstring)."""
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    w_qk, w_v = attention_class(cfg.attention).attention_widths(cfg)
    b, t = shape.batch, shape.seq_len
    return 6.0 * n_matmul * b * t + 3.0 * cfg.n_layer * b * t * (t + 1) * (w_qk + w_v)


def peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.device != "cuda" or args.torch_dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(0)
    for key, tf in PEAK_TFLOPS_HALF.items():
        if key in name:
            return tf * 1e12
    return None


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(spec_json: str) -> None:
    """Entry point of the CPU memory child (Linux): build one row, run one step (optimizer state,
    lazy library set-up), reset the RSS high-water mark, run a second step and report
    peak = high-water mark − RSS before the model was built, and the second step's own growth."""
    import transformers  # noqa: F401  (imported before the baseline by every row, not only DiffLlama's)

    spec = json.loads(spec_json)
    args = Namespace(**spec["args"])
    args.torch_dtype = common.DTYPES[args.dtype]
    shape = common.Shape(**spec["shape"])
    base = _status_kib("VmRSS")
    _, step, _, _ = build_row(args, shape, spec["row"])
    step()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    hwm = _status_kib("VmHWM")
    print(json.dumps(dict(peak_bytes=(hwm - base) * 1024, step_growth_bytes=(hwm - before) * 1024,
                          process_peak_rss_bytes=hwm * 1024)))


def measure_memory(args, shape: common.Shape, name: str, spec: dict, model, step) -> dict:
    """peak_bytes: model + optimizer state + the step's activations at their peak; step_growth_bytes:
    what one training step adds on top of what exists before it (activations, gradients, transients)."""
    if args.device == "cuda":
        step()  # optimizer state exists from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return dict(method="torch.cuda.max_memory_allocated", peak_bytes=peak, step_growth_bytes=peak - before)
    child_args = {k: getattr(args, k) for k in ("device", "dtype", "kernel", "compile")}
    payload = json.dumps(dict(args=child_args, shape=shape.__dict__, row=spec))
    code = "import sys; from diffattn.bench.train import memory_child; memory_child(sys.argv[1])"
    # glibc raises its mmap threshold (up to 32 MiB) after freeing large blocks, then keeps freed
    # tensors of up to that size on its heap, so RSS would also count memory freed earlier in the step
    # or in step 1. Pinning the threshold at 1 MiB returns every freed tensor to the OS: RSS ≈ live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(method="fresh child process (MALLOC_MMAP_THRESHOLD_=1MiB): VmHWM during a second step (reset "
                       "via /proc/self/clear_refs) minus VmRSS before building the model", **res)


def run(args) -> int:
    env = environment(args.device)
    peak = peak_flops(args)
    progress = None if args.quiet else common.log
    results = []
    for t in args.seq_len:
        shape = common.shape_for(args, t)
        specs = row_specs(args)
        built = {n: build_row(args, shape, s) for n, s in specs.items()}
        timed = {}
        if not args.memory_only:
            timed = common.round_robin({n: b[1] for n, b in built.items()}, warmup=args.warmup, repeats=args.repeats,
                                       device=args.device, progress=progress and (lambda m: progress(f"T={t}: {m}")))
        mem = {}
        if args.memory:
            for n, (model, step, _, _) in built.items():
                if progress:
                    progress(f"T={t}: memory {n}")
                mem[n] = measure_memory(args, shape, n, specs[n], model, step)
        base = next(iter(built))  # the standard row comes first
        table = []
        for n, (model, _, flops, matched) in built.items():
            r = dict(seq_len=t, batch=shape.batch, name=n, variant=specs[n]["variant"], impl=specs[n]["impl"],
                     matched=matched, params=sum(p.numel() for p in model.parameters()), model_flops_per_step=flops)
            cells = [n, f"{r['params'] / 1e6:.2f}M"]
            if timed:
                tok_s = shape.batch * t / timed[n]["median_s"]
                r.update(step=timed[n], tokens_per_s=tok_s,
                         ratio_tokens_per_s=timed[base]["median_s"] / timed[n]["median_s"],
                         mfu=(flops / timed[n]["median_s"] / peak) if peak else None)
                cells += [common.fmt_ms(timed[n]), f"{tok_s:,.0f}", f"{r['ratio_tokens_per_s']:.3f}",
                          f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"]
            if mem:
                r.update(memory=mem[n], ratio_peak_memory=mem[n]["peak_bytes"] / mem[base]["peak_bytes"],
                         ratio_step_growth=(mem[n]["step_growth_bytes"] / mem[base]["step_growth_bytes"]
                                            if mem[base]["step_growth_bytes"] > 0 else None))
                cells += [f"{mem[n]['peak_bytes'] / 2**20:,.0f}", f"{r['ratio_peak_memory']:.3f}",
                          f"{mem[n]['step_growth_bytes'] / 2**20:,.0f}",
                          f"{r['ratio_step_growth']:.3f}" if r["ratio_step_growth"] is not None else "-"]
            results.append(r)
            table.append(cells)
        header = ["row", "params"] + (["step ms", "tokens/s", "vs std", "MFU"] if timed else []) \
            + (["peak MiB", "vs std", "step MiB", "vs std"] if mem else [])
        common.print_table(
            f"train step, {args.device} {args.dtype}, B={shape.batch} T={t} d_model={shape.d_model} L={shape.n_layer} "
            f"vocab={shape.vocab_size}, baseline {shape.n_head} heads x {shape.head_dim}"
            + (f"; median [min-max] of {args.repeats}" if timed else ""), header, table)
    common.write_json(args.json, dict(bench="train", env=env, options=common.options(args), peak_flops=peak,
                                      results=results))
    return 0
