"""diffattn.hf: the transformers wrapper — save/load round trips, generate() == DecoderLM.generate,
strict loading of mismatched directories, lazy Auto registration.

Run: .venv/bin/python -m pytest tests/test_hf_model.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffattn
from diffattn import ModelConfig, build_model
from diffattn.checkpoint import load_model, read_config, save_model

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from diffattn.hf import DiffAttnCache, DiffAttnConfig, DiffAttnForCausalLM  # noqa: E402

transformers.utils.logging.disable_progress_bar()
VARIANTS = ("standard", "diff_v1", "diff_v2", "shared_diff")


def tiny(attention: str, **kw) -> ModelConfig:
    extra = {"shared_init": "random"} if attention == "shared_diff" else {}
    base = dict(vocab_size=61, d_model=32, n_layer=2, n_head=2, max_seq_len=96)
    base.update(extra)
    base.update(kw)
    return ModelConfig(attention=attention, **base)


def randomized(cfg: ModelConfig, seed: int = 0):
    """A tiny model whose norm gains and λ vectors are not at their init values either."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif "lambda_" in name and p.dim() == 1:
                p.normal_(0.0, 0.3)
    return model


def ids(b=2, t=12, vocab=61, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ config
def test_config_json_is_the_checkpoint_format(tmp_path):
    cfg = tiny("diff_v1", n_kv_head=1, lambda_init=0.5)
    hf_cfg = DiffAttnConfig.from_model_config(cfg)
    hf_cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "diffattn"
    assert {k: data[k] for k in cfg.to_dict()} == cfg.to_dict()  # every ModelConfig field, derived ones too
    assert read_config(tmp_path) == cfg  # diffattn.checkpoint reads it
    assert DiffAttnConfig.from_pretrained(tmp_path).to_model_config() == cfg
    # transformers names are aliases of the ModelConfig fields
    assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.max_position_embeddings) == (32, 2, 96)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="ModelConfig.attention: unknown attention 'bogus'"):
        DiffAttnConfig(attention="bogus", vocab_size=8, d_model=8, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="n_kv_head"):
        DiffAttnConfig(attention="standard", vocab_size=8, d_model=8, n_layer=1, n_head=2, n_kv_head=3)
    with pytest.raises(ValueError, match="contradicts"):
        DiffAttnConfig(attention="standard", vocab_size=8, d_model=8, hidden_size=16, n_layer=1, n_head=2)


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("attention", VARIANTS)
def test_wrapper_save_load_same_logits(attention, tmp_path):
    core = randomized(tiny(attention, n_kv_head=1, tie_embeddings=attention == "diff_v2"))
    x = ids()
    ref = core(x)
    hf = DiffAttnForCausalLM.from_decoder(core)
    assert hf.model is core  # no second copy of the model
    # bitwise: the wrapper calls the very same module on the same tensors
    torch.testing.assert_close(hf(x).logits, ref, rtol=0, atol=0)
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert set(load_file(str(tmp_path / "hf" / "model.safetensors"))) == {"model." + k for k in core.state_dict()}
    # bitwise below: every loader copies the saved bytes into fresh aligned memory (checkpoint.own_memory), so
    # the loaded model runs the same kernels on the same values as ``core`` in this process, on any CPU
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded) is DiffAttnForCausalLM
    torch.testing.assert_close(loaded(x).logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(load_model(tmp_path / "hf")(x), ref, rtol=0, atol=0)  # checkpoint module reads it
    # and the other way: a checkpoint.save_model directory loads through AutoModelForCausalLM
    save_model(core, tmp_path / "native")
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
    torch.testing.assert_close(native(x).logits, ref, rtol=0, atol=0)


def test_fresh_wrapper_initialises_like_decoderlm():
    cfg = tiny("diff_v1")
    torch.manual_seed(3)
    a = build_model(cfg)
    torch.manual_seed(3)
    b = DiffAttnForCausalLM(DiffAttnConfig.from_model_config(cfg)).model
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_loss_and_logits_to_keep():
    core = randomized(tiny("diff_v1"))
    hf = DiffAttnForCausalLM.from_decoder(core)
    x = ids()
    out = hf(x, labels=x, logits_to_keep=1)
    logits = core(x)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 61), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.logits, logits[:, -1:])


def test_output_attentions_are_the_differential_maps():
    core = randomized(tiny("diff_v1", kernel="eager"))
    hf = DiffAttnForCausalLM.from_decoder(core)
    x = ids(t=6)
    out = hf(x, output_attentions=True)
    _, maps = core(x, return_maps=True)
    assert len(out.attentions) == 2
    torch.testing.assert_close(out.attentions[1], maps[1].effective)


def test_forward_rejects_what_it_cannot_honour():
    hf = DiffAttnForCausalLM.from_decoder(randomized(tiny("standard")))
    x = ids()
    with pytest.raises(ValueError, match="position_ids"):
        hf(x, position_ids=torch.arange(12)[None])
    with pytest.raises(ValueError, match="inputs_embeds"):
        hf(inputs_embeds=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        hf(x, attention_mask=torch.ones(2, 5))
    with pytest.raises(TypeError, match="unsupported argument"):
        hf(x, frobnicate=3)


# ------------------------------------------------------------------------------------------ generate
@pytest.mark.parametrize("attention", VARIANTS)
def test_generate_equals_diffattn_greedy(attention, tmp_path):
    core = randomized(tiny(attention, n_kv_head=1))
    DiffAttnForCausalLM.from_decoder(core).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = ids(b=1, t=7)
    want = core.generate(prompt, 16)
    got = hf.generate(prompt, max_new_tokens=16, do_sample=False)
    # token ids, not logits: greedy choices agree unless two logits of a random model tie within rounding
    assert torch.equal(got, want)
    # a left-padded batch: every row decodes as it would alone
    x = ids(b=3, t=9, seed=5)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    mask[2, :6] = 0
    x = x.masked_fill(mask == 0, 0)
    want = core.generate(x, 8, attention_mask=mask)
    got = hf.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    alone = core.generate(x[2:, 6:], 8)
    assert torch.equal(got[2, 9:], alone[0, 3:])


def test_generate_uses_the_diffattn_cache_and_grows_it():
    core = randomized(tiny("diff_v1"))
    hf = DiffAttnForCausalLM.from_decoder(core)
    prompt = ids(b=2, t=5)
    cache = DiffAttnCache(reserve=2)  # forces several re-allocations while decoding
    out = hf.generate(prompt, max_new_tokens=20, do_sample=False, past_key_values=cache, return_dict_in_generate=True)
    assert out.past_key_values is cache
    assert cache.kv.max_len >= 24 and cache.get_seq_length() == 24  # the last token is not fed back
    assert torch.equal(out.sequences, core.generate(prompt, 20))


def test_beam_search_reorders_the_cache():
    core = randomized(tiny("diff_v1"))
    hf = DiffAttnForCausalLM.from_decoder(core)
    prompt = ids(b=2, t=6)
    with_cache = hf.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=True)
    without = hf.generate(prompt, max_new_tokens=8, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_foreign_cache_is_refused():
    from transformers import DynamicCache

    hf = DiffAttnForCausalLM.from_decoder(randomized(tiny("standard")))
    full = DynamicCache()
    full.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="DiffAttnCache"):
        hf(ids(b=1), past_key_values=full)


# ------------------------------------------------------------------------------------------ strict loading
def _saved(tmp_path, attention="diff_v1"):
    core = randomized(tiny(attention))
    d = tmp_path / "ckpt"
    save_model(core, d)
    return d


def _edit_weights(d, fn):
    w = load_file(str(d / "model.safetensors"))
    fn(w)
    save_file(w, str(d / "model.safetensors"))


def _edit_config(d, **changes):
    data = json.loads((d / "config.json").read_text())
    data.update(changes)
    (d / "config.json").write_text(json.dumps(data))


def test_missing_tensor_is_named(tmp_path):
    d = _saved(tmp_path)
    _edit_weights(d, lambda w: w.pop("model.layers.1.attn.lambda_k2"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.attn\.lambda_k2'"):
        AutoModelForCausalLM.from_pretrained(d)


def test_wrong_shape_is_named(tmp_path):
    d = _saved(tmp_path)
    _edit_config(d, vocab_size=60)
    with pytest.raises(ValueError, match=r"tensor 'model\.embed\.weight' has shape \[61, 32\] but config.json implies "
                                         r"\[60, 32\]"):
        AutoModelForCausalLM.from_pretrained(d)


def test_unexpected_tensor_is_named(tmp_path):
    d = _saved(tmp_path)
    _edit_weights(d, lambda w: w.update({"model.layers.0.attn.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.attn\.extra'"):
        AutoModelForCausalLM.from_pretrained(d)


def test_variant_mismatch_names_the_tensor(tmp_path):
    d = _saved(tmp_path, "diff_v1")
    _edit_config(d, attention="diff_v2", lambda_init=None, lambda_std=None, diff_norm=None, diff_norm_affine=None,
                 diff_norm_gain_init=None, head_dim=16)
    with pytest.raises(ValueError, match=r"(missing|unexpected) tensor 'model\.layers\.0\.attn\.lambda_"):
        AutoModelForCausalLM.from_pretrained(d)


def test_unknown_attention_names_the_field(tmp_path):
    d = _saved(tmp_path)
    _edit_config(d, attention="flash_diff")
    with pytest.raises(ValueError, match="ModelConfig.attention: unknown attention 'flash_diff'"):
        AutoModelForCausalLM.from_pretrained(d)
    with pytest.raises(ValueError, match="attention"):
        AutoConfig.from_pretrained(d)


def test_from_pretrained_verifies_checksums_like_the_command_line(tmp_path):
    """A training checkpoint carries checksums.json: flipped bytes in its weights are refused by the Python API
    too (transformers alone would load them silently)."""
    from diffattn.utils.errors import CorruptFileError
    from diffattn.utils.integrity import write_checksums

    d = _saved(tmp_path)
    write_checksums(d)
    AutoModelForCausalLM.from_pretrained(d)  # intact: loads
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-5] ^= 0x10  # a bit in the last tensor's data: the header still parses
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: sha256 does not match checksums\.json"):
        AutoModelForCausalLM.from_pretrained(d)


def test_pickle_weights_are_not_loaded(tmp_path):
    d = _saved(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        AutoModelForCausalLM.from_pretrained(d)


# ------------------------------------------------------------------------------------------ registration
def test_import_diffattn_registers_lazily_and_cheaply(tmp_path):
    save_model(randomized(tiny("diff_v1")), tmp_path / "m")
    code = (
        "import sys, diffattn\n"
        "assert 'transformers' not in sys.modules, 'import diffattn must not import transformers'\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
        "print(type(m).__name__, type(m.config).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["DiffAttnForCausalLM", "DiffAttnConfig"]


def test_register_is_idempotent():
    diffattn.hf.register()
    diffattn.hf.register()
    cfg = AutoConfig.for_model("diffattn", vocab_size=10, d_model=8, n_layer=1, n_head=2)
    assert type(AutoModelForCausalLM.from_config(cfg)) is DiffAttnForCausalLM


def test_decoderlm_save_pretrained_and_from_pretrained(tmp_path):
    """build_model() models save and load themselves: the same directory and checks as the command line."""
    from diffattn.model import DecoderLM

    core = randomized(tiny("diff_v1"))
    core.save_pretrained(tmp_path / "m")
    back = DecoderLM.from_pretrained(tmp_path / "m")
    x = torch.randint(0, core.config.vocab_size, (2, 9))
    # bitwise: the loaders copy into fresh memory (checkpoint.own_memory), same values, same kernels, same process
    assert back.config == core.config and torch.equal(back(x), core.eval()(x))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # the same directory for transformers
    assert torch.equal(hf(x).logits, core(x))
    _edit_config(tmp_path / "m", d_model=core.config.d_model * 2, head_dim=None, ffn_hidden=None)
    with pytest.raises(ValueError, match="weights do not match config.json"):
        DecoderLM.from_pretrained(tmp_path / "m")
