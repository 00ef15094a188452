# .venv/bin/python -m pytest tests/test_load_roundtrip.py -q
"""Loading gives ordinary tensors, so a saved-and-loaded model computes what the saved one computed, bit for bit.

safetensors hands back tensors that view the file's bytes (24 bytes off a 64-byte boundary in a typical
file); a model that adopted them computed the same function through another CPU matmul path on some
machines (AMD EPYC, AVX2) and its logits differed in the last bits. Every loader now copies the tensors
into fresh, 64-byte-aligned memory (``checkpoint.own_memory``): the strict assertions below hold because
the loaded model holds the same bytes in the same kind of memory and runs the same kernels, on any CPU
and any thread count (the subprocess test checks 1 and 2 threads)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffattn import build_model
from diffattn.checkpoint import load_model, own_memory
from helpers import randomized, tiny  # tests/helpers.py

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
ALIGN = 64  # PyTorch's CPU allocator aligns every allocation to 64 bytes (c10 gAlignment)


def misaligned(module):
    return [n for n, p in module.named_parameters() if p.data_ptr() % ALIGN]


def test_own_memory_copies_values_and_keeps_ties():
    model = randomized(build_model(tiny(tie_embeddings=True)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    own_memory(model)
    assert all(p.data_ptr() != ptrs[n] for n, p in model.named_parameters())  # new storage
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bitwise: a copy, no arithmetic
    assert model.lm_head is None or model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize("attention", ["standard", "diff_v1", "diff_v2", "shared_diff"])
def test_loaders_give_aligned_tensors(attention, tmp_path):
    """load_model and AutoModelForCausalLM both leave every parameter in fresh (aligned) memory."""
    import diffattn.hf  # noqa: F401  (registers the model type with transformers)
    from transformers import AutoModelForCausalLM

    core = randomized(build_model(tiny(attention)))
    core.save_pretrained(tmp_path / "m")
    assert misaligned(load_model(tmp_path / "m")) == []
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert misaligned(hf) == []
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert misaligned(hf) == [] and not info["missing_keys"]


def test_hf_import_builds_its_model_in_fresh_memory(tmp_path):
    """`diffattn import` verifies (and writes) a model built from the source's safetensors: not in their buffers."""
    from safetensors.torch import load_file, save_file

    from diffattn.hf import convert

    cfg = tiny("diff_v1")
    save_file(randomized(build_model(cfg)).state_dict(), str(tmp_path / "w.safetensors"))
    state = load_file(str(tmp_path / "w.safetensors"))
    assert any(t.data_ptr() % ALIGN for t in state.values())  # what safetensors hands back
    assert misaligned(convert._decoder(cfg, state)) == []


def test_resumed_trainer_holds_aligned_tensors(tiny_corpus, tmp_path):
    """--resume copies the checkpoint into the model's own parameters and the optimizer's own state."""
    from diffattn.train import Trainer, load_run_file, plan_run
    from helpers import write_config  # tests/ is on sys.path

    cfg = write_config(tmp_path / "r.toml", tiny_corpus, tmp_path / "out", max_steps=4, checkpoint_every=2,
                       eval_every=0, log_every=2)
    first = Trainer(plan_run(load_run_file(cfg)))
    first.fit(stop_at_step=2)
    first.close()
    again = Trainer(plan_run(load_run_file(cfg), resume=True))
    try:
        assert again.step == 2 and misaligned(again.raw) == []
        state = [t for entry in again.optimizer.state.values() for t in entry.values()
                 if torch.is_tensor(t) and t.dim() > 0]
        assert state and all(t.data_ptr() % ALIGN == 0 for t in state)
    finally:
        again.close()


ROUND_TRIP = textwrap.dedent("""
    import sys, tempfile, torch
    torch.set_num_threads(int(sys.argv[1]))
    import diffattn.hf
    from transformers import AutoModelForCausalLM
    from diffattn import ModelConfig, build_model
    from diffattn.checkpoint import load_model, save_model
    from diffattn.model import DecoderLM
    from helpers import randomized, tiny
    x = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    for attention in ("standard", "diff_v1", "diff_v2", "shared_diff"):
        core = randomized(build_model(tiny(attention, n_kv_head=1)))
        with torch.no_grad():
            ref = core(x)
            d = tempfile.mkdtemp()
            core.save_pretrained(d + "/m")
            save_model(core, d + "/n")
            for name, model in (("DecoderLM.from_pretrained", DecoderLM.from_pretrained(d + "/m")),
                                ("load_model", load_model(d + "/n")),
                                ("AutoModelForCausalLM", AutoModelForCausalLM.from_pretrained(d + "/m").eval())):
                out = model(x)
                out = out.logits if hasattr(out, "logits") else out
                # bitwise on any x86 CPU: ref and out come from one process at one thread count, on the same
                # values in freshly allocated (64-byte-aligned) memory, so the same kernels run in the same order
                if not torch.equal(out, ref):
                    sys.exit(f"{attention} {name}: max diff {(out - ref).abs().max().item():.3g}")
    print("threads", torch.get_num_threads(), "bit-identical")
""")


@pytest.mark.parametrize("threads", [1, 2])
def test_save_load_round_trips_are_bit_identical_at_each_thread_count(threads):
    """Same process, same bytes, same kind of memory: the reloaded model's logits equal the saved model's
    exactly, whatever the thread count (the matmul's blocking depends on it, identically for both models)."""
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(threads)], capture_output=True, text=True,
                          cwd=REPO / "tests", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"threads {threads} bit-identical" in proc.stdout
