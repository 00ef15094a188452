"""Exact conversions between diffattn checkpoints and stock transformers models.

* ``diff_v1``  <->  ``DiffLlamaForCausalLM`` (transformers' DIFF Transformer V1, arXiv 2410.05258)
* ``standard`` <->  ``LlamaForCausalLM``

Both sides compute the same function; only the weight layouts differ (methods.md §1.2-1.5):

=========================  ===============================================  ==========================================
                           diffattn (the authors' layout)                   transformers DiffLlama
=========================  ===============================================  ==========================================
query rows                 (head h, component c, dim i): sub-heads 2h, 2h+1  (c·H + h, i): component 1 = first H heads
key rows                   (kv head g, component c, dim i)                  (c·Hkv + g, i)
value rows                 (kv head g, 2d)                                  (c·Hkv + g, d): the two halves of g's value
rotary                     interleaved pairs (2j, 2j+1)                     rotate-half pairs (j, j + d/2)
per-head norm              RMSNorm(2d) with a learnable gain g              RMSNorm(2d) without gain
λ_init                     "depth" or a constant                            0.8 − 0.6·exp(−0.3·layer), always
=========================  ===============================================  ==========================================

With Hkv K/V heads DiffLlama has ``num_key_value_heads = 2·Hkv`` (even, as it requires) and query
head ``c·H + h`` reads K/V head ``(c·H + h) // n_rep = c·Hkv + h // n_rep``: exactly component c of
diffattn's K/V head ``h // n_rep``, and its two value calls read the two d-wide halves of that head's
2d-wide value. So every MHA/GQA layout of diff_v1 maps, by a permutation of projection rows:

* rotary: within each d-wide (sub-)head, row ``j`` of the rotate-half layout is row ``2j`` of the
  interleaved one and row ``j + d/2`` is ``2j + 1``. q·k is unchanged because q and k get the same
  permutation, and the two rotations agree pair by pair (same frequencies θ^(−2j/d)).
* sub-heads: the (h, c) → (c, h) transpose above, for q, k and v.
* norm gain: ``o_proj(norm(x)·g·(1 − λ_init)) = (o_proj·diag(g))(norm(x)·(1 − λ_init))``, so g folds
  into the o_proj columns (g repeated over heads) exactly.

What cannot be represented is refused with one line naming the field, never exported approximately:
``diff_norm=False`` (DiffLlama always normalises), a ``lambda_init`` other than the depth formula, any
attention other than diff_v1 (``standard`` goes to Llama), and, on import, rotary scaling, biases,
activations other than SiLU, or a DiffLlama whose head counts do not pair up. After writing, the
result is loaded back with the stock class and its logits are compared with the source model's on a
fixed batch (``verify``); a mismatch aborts and nothing is written (the output appears atomically).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..fsutil import atomic_directory, read_json
from ..utils.runtime import DTYPES as RUNTIME_DTYPES
from ..checkpoint import WEIGHT_PREFIX, own_memory, read_config
from ..config import ModelConfig, lambda_init_for_depth
from ..model import DecoderLM, build_model
from .tokenizer import copy_tokenizer, special_token_ids

EXPORT_TARGETS = ("diffllama", "llama")
DTYPES = {name: RUNTIME_DTYPES[name] for name in ("float32", "bfloat16", "float16")}  # utils.runtime's long names
VERIFY_RTOL = 1e-4  # max |Δlogit| allowed, relative to max(1, max |logit|), in float32


class ConversionError(ValueError):
    """A model that the target format cannot represent exactly (one line, names the field)."""


# ---------------------------------------------------------------------------------------------
# Row permutations
# ---------------------------------------------------------------------------------------------
def rotate_half_order(d: int) -> torch.Tensor:
    """Index ``p`` with ``rotate_half_rows = interleaved_rows[p]`` for one d-wide head."""
    return torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))


def interleaved_order(d: int) -> torch.Tensor:
    """Inverse of :func:`rotate_half_order`: ``interleaved_rows = rotate_half_rows[p]``."""
    return torch.argsort(rotate_half_order(d))


def _rows(w: torch.Tensor, *shape: int) -> torch.Tensor:
    return w.reshape(*shape, w.shape[-1])


def diff_qk_to_hf(w: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """(n, 2, d) interleaved-rotary rows -> (2, n, d) rotate-half rows (q: n=H, k: n=Hkv)."""
    return _rows(w, n, 2, d)[:, :, rotate_half_order(d)].transpose(0, 1).reshape(w.shape).contiguous()


def diff_qk_from_hf(w: torch.Tensor, n: int, d: int) -> torch.Tensor:
    return _rows(w, 2, n, d)[:, :, interleaved_order(d)].transpose(0, 1).reshape(w.shape).contiguous()


def diff_v_to_hf(w: torch.Tensor, n_kv: int, d: int) -> torch.Tensor:
    """(Hkv, 2d) value rows -> (2, Hkv, d): half c of K/V head g becomes DiffLlama head c·Hkv + g."""
    return _rows(w, n_kv, 2, d).transpose(0, 1).reshape(w.shape).contiguous()


def diff_v_from_hf(w: torch.Tensor, n_kv: int, d: int) -> torch.Tensor:
    return _rows(w, 2, n_kv, d).transpose(0, 1).reshape(w.shape).contiguous()


def rope_to_hf(w: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """(n, d) interleaved-rotary rows -> rotate-half rows, per head (standard q/k)."""
    return _rows(w, n, d)[:, rotate_half_order(d)].reshape(w.shape).contiguous()


def rope_from_hf(w: torch.Tensor, n: int, d: int) -> torch.Tensor:
    return _rows(w, n, d)[:, interleaved_order(d)].reshape(w.shape).contiguous()


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def _common_hf_fields(cfg: ModelConfig) -> dict:
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "attention_bias": False, "attention_dropout": 0.0, "head_dim": cfg.head_dim,
    }


def check_exportable(cfg: ModelConfig, to: str) -> None:
    """Raise :class:`ConversionError` if ``cfg`` has no exact ``to`` equivalent."""
    if to not in EXPORT_TARGETS:
        raise ConversionError(f"--to: unknown target {to!r}; valid: {', '.join(EXPORT_TARGETS)}")
    want = "diff_v1" if to == "diffllama" else "standard"
    if cfg.attention != want:
        hint = {"diff_v1": "use --to diffllama", "standard": "use --to llama"}.get(cfg.attention,
                                                                                    "no stock transformers class has it")
        raise ConversionError(f"attention: --to {to} needs attention {want!r}, the checkpoint has "
                              f"{cfg.attention!r} ({hint})")
    if to == "diffllama":
        if not cfg.diff_norm:
            raise ConversionError("diff_norm: false (the Table 6 ablation) cannot be exported: DiffLlama always "
                                  "applies the per-head RMSNorm")
        for i in range(cfg.n_layer):
            ours, theirs = cfg.layer_lambda_init(i), lambda_init_for_depth(i)
            if not math.isclose(ours, theirs, rel_tol=0.0, abs_tol=1e-12):
                raise ConversionError(f"lambda_init: {cfg.lambda_init!r} gives {ours:.6g} at layer {i}; DiffLlama "
                                      f"always uses 0.8-0.6*exp(-0.3*layer) = {theirs:.6g}")


def diffllama_config(cfg: ModelConfig, **extra):
    from transformers import DiffLlamaConfig

    check_exportable(cfg, "diffllama")
    return DiffLlamaConfig(**_common_hf_fields(cfg), num_attention_heads=2 * cfg.n_head,
                           num_key_value_heads=2 * cfg.n_kv_head, lambda_std_dev=cfg.lambda_std, **extra)


def llama_config(cfg: ModelConfig, **extra):
    from transformers import LlamaConfig

    check_exportable(cfg, "llama")
    return LlamaConfig(**_common_hf_fields(cfg), num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_kv_head, mlp_bias=False, **extra)


def _rope_theta(hf_cfg) -> float:
    rp = getattr(hf_cfg, "rope_parameters", None) or {}
    if not isinstance(rp, dict):
        raise ConversionError(f"rope_parameters: unsupported value {rp!r}")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(f"rope_parameters.rope_type: {rope_type!r} rotary scaling is not supported by diffattn "
                              f"(plain rotary only)")
    theta = rp.get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    if theta is None:
        raise ConversionError("rope_parameters.rope_theta: missing")
    return float(theta)


def model_config_from_hf(hf_cfg) -> ModelConfig:
    """The diffattn ModelConfig of a DiffLlama (-> diff_v1) or Llama (-> standard) config."""
    mt = hf_cfg.model_type
    if mt not in ("diffllama", "llama"):
        raise ConversionError(f"model_type: {mt!r} cannot be imported (supported: diffllama, llama)")
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act: {hf_cfg.hidden_act!r}; diffattn's FFN is SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_cfg, flag, False):
            raise ConversionError(f"{flag}: true; diffattn projections have no biases")
    n_q, n_kv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // n_q
    common = dict(vocab_size=hf_cfg.vocab_size, d_model=hf_cfg.hidden_size, n_layer=hf_cfg.num_hidden_layers,
                  head_dim=head_dim, max_seq_len=hf_cfg.max_position_embeddings, rope_theta=_rope_theta(hf_cfg),
                  ffn_hidden=hf_cfg.intermediate_size, norm_eps=float(hf_cfg.rms_norm_eps),
                  tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
                  init_std=float(getattr(hf_cfg, "initializer_range", None) or 0.02))
    if mt == "llama":
        return ModelConfig(attention="standard", n_head=n_q, n_kv_head=n_kv, **common)
    if n_q % 2 or n_kv % 2:
        raise ConversionError(f"num_attention_heads={n_q}, num_key_value_heads={n_kv}: both must be even to pair "
                              f"DiffLlama heads into DIFF heads (query head h with h + {n_q // 2})")
    if n_q % n_kv:
        raise ConversionError(f"num_key_value_heads: {n_kv} does not divide num_attention_heads={n_q}")
    std = getattr(hf_cfg, "lambda_std_dev", None)
    return ModelConfig(attention="diff_v1", n_head=n_q // 2, n_kv_head=n_kv // 2, lambda_init="depth",
                       lambda_std=0.1 if std is None else float(std), diff_norm=True, diff_norm_affine=False,
                       **common)


# ---------------------------------------------------------------------------------------------
# State dicts (DecoderLM keys without the "model." prefix  <->  transformers keys)
# ---------------------------------------------------------------------------------------------
_BLOCK = {  # ours (inside layers.i.) -> theirs (inside model.layers.i.), same tensor
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.gate.weight": "mlp.gate_proj.weight",
    "ffn.up.weight": "mlp.up_proj.weight",
    "ffn.down.weight": "mlp.down_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
}
_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def _layout(cfg: ModelConfig):
    """The one name-and-layout table of both directions: (ours, theirs, to_hf, from_hf) per tensor of one
    layer, after the plain renames of ``_BLOCK``. Identity entries are ``None``."""
    h, hkv, d = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    if cfg.attention == "standard":  # interleaved rotary -> HF's half-split rotary (rows permuted)
        return [("attn.q_proj.weight", "self_attn.q_proj.weight", lambda w: rope_to_hf(w, h, d),
                 lambda w: rope_from_hf(w, h, d)),
                ("attn.k_proj.weight", "self_attn.k_proj.weight", lambda w: rope_to_hf(w, hkv, d),
                 lambda w: rope_from_hf(w, hkv, d))]
    return [("attn.q_proj.weight", "self_attn.q_proj.weight", lambda w: diff_qk_to_hf(w, h, d),
             lambda w: diff_qk_from_hf(w, h, d)),
            ("attn.k_proj.weight", "self_attn.k_proj.weight", lambda w: diff_qk_to_hf(w, hkv, d),
             lambda w: diff_qk_from_hf(w, hkv, d)),
            ("attn.v_proj.weight", "self_attn.v_proj.weight", lambda w: diff_v_to_hf(w, hkv, d),
             lambda w: diff_v_from_hf(w, hkv, d)),
            *[("attn." + n, "self_attn." + n, None, lambda w: w.float()) for n in _LAMBDAS]]


def _convert_state(tensors: dict[str, torch.Tensor], cfg: ModelConfig, *, to_hf: bool) -> dict[str, torch.Tensor]:
    """Rename (and re-lay-out) every tensor one way; ``_layout`` is the table both directions read."""
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        top["lm_head.weight"] = "lm_head.weight"
    pairs = [(ours, theirs) if to_hf else (theirs, ours) for ours, theirs in top.items()]
    out = {dst: tensors[src] for src, dst in pairs}
    layout = _layout(cfg)
    for i in range(cfg.n_layer):
        ours_pre, theirs_pre = f"layers.{i}.", f"model.layers.{i}."
        src_pre, dst_pre = (ours_pre, theirs_pre) if to_hf else (theirs_pre, ours_pre)
        for ours, theirs in _BLOCK.items():
            out[dst_pre + (theirs if to_hf else ours)] = tensors[src_pre + (ours if to_hf else theirs)]
        for ours, theirs, fwd, back in layout:
            fn = fwd if to_hf else back
            src, dst = (ours, theirs) if to_hf else (theirs, ours)
            w = tensors[src_pre + src]
            out[dst_pre + dst] = fn(w) if fn is not None else w
        gain = tensors.get(ours_pre + "attn.head_norm.weight") if to_hf else None
        if gain is not None:  # fold the per-head norm gain into the o_proj columns (exact)
            o = out[dst_pre + "self_attn.o_proj.weight"]
            out[dst_pre + "self_attn.o_proj.weight"] = (
                o.double() * gain.double().repeat(cfg.n_head)[None, :]).to(o.dtype).contiguous()
    return out


def to_hf_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """DecoderLM state dict -> DiffLlama (diff_v1) or Llama (standard) state dict."""
    check_exportable(cfg, "diffllama" if cfg.attention == "diff_v1" else "llama")
    return _convert_state(state, cfg, to_hf=True)


def hf_expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The transformers tensor names and shapes of the stock model equivalent to ``cfg``."""
    with torch.device("meta"):
        state = build_model(cfg).state_dict()
    return {k: tuple(v.shape) for k, v in to_hf_state(state, cfg).items()}


def from_hf_state(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """DiffLlama / Llama state dict -> DecoderLM state dict, checking names and shapes first."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # derived buffers
    want = hf_expected_shapes(cfg)
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        if not torch.equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight", torch.empty(0))):
            raise ConversionError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
                                  f"model.embed_tokens.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    missing = [k for k in want if k not in tensors]
    if missing:
        raise ConversionError(f"{source}: missing tensor {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    unexpected = sorted(set(tensors) - set(want))
    if unexpected:
        raise ConversionError(f"{source}: unexpected tensor {unexpected[0]!r}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
                              + " (not part of the architecture config.json describes)")
    for k, shape in want.items():
        if tuple(tensors[k].shape) != shape:
            raise ConversionError(f"{source}: tensor {k!r} has shape {list(tensors[k].shape)} but config.json "
                                  f"implies {list(shape)}")
    return _convert_state(tensors, cfg, to_hf=False)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out: dict[str, torch.Tensor] = {}
            for f in files:
                out.update(load_file(str(directory / f)))
            return out
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors' own error types
        raise ValueError(f"{directory}: cannot read safetensors ({str(e).splitlines()[0] if str(e) else e!r})") from None
    bins = sorted(p.name for p in directory.glob("*.bin"))
    hint = f" ({bins[0]} is pickle: load and re-save it with save_pretrained(safe_serialization=True))" if bins else ""
    raise FileNotFoundError(f"no model.safetensors in {directory}{hint}")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _prepare_dst(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"SRC {src} is not a directory")
    if dst.resolve() == src.resolve():
        raise ValueError(f"DST {dst} is the same directory as SRC")
    if dst.exists():
        if not dst.is_dir():
            raise ValueError(f"DST {dst} exists and is not a directory")
        if any(dst.iterdir()) and not overwrite:
            raise ValueError(f"DST {dst} exists and is not empty (pass --overwrite to replace it)")


def _with_tmp_dir(dst: Path, write: Callable[[Path], None]) -> Path:
    with atomic_directory(dst) as tmp:
        write(tmp)
    return dst


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------
def _probe(vocab_size: int, max_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, min(16, max_len)), generator=g)


def _check_logits(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    diff = (ours.double() - theirs.double()).abs().max().item()
    scale = max(1.0, ours.double().abs().max().item())
    if not diff <= VERIFY_RTOL * scale:  # also catches NaN
        raise ConversionError(f"verification failed: {what} logits differ by {diff:.3g} (allowed "
                              f"{VERIFY_RTOL * scale:.3g}); nothing was written")
    return diff


@dataclass
class Report:
    src: Path
    dst: Path
    kind: str  # e.g. "diff_v1 -> DiffLlamaForCausalLM"
    max_abs_diff: float | None  # verification result (None: not verified)
    tokenizer_files: list[str]


# ---------------------------------------------------------------------------------------------
# Export: diffattn -> stock transformers
# ---------------------------------------------------------------------------------------------
def _check_file(path: Path, mapped: dict[str, torch.Tensor], dtype: torch.dtype, prefix: str = "") -> None:
    """The written safetensors hold exactly ``mapped`` cast to ``dtype`` (names, shapes, values)."""
    written = load_file(str(path))
    want = {prefix + k: v for k, v in mapped.items()}
    if set(written) != set(want):
        bad = sorted(set(written) ^ set(want))[0]
        raise ConversionError(f"verification failed: {path.name} has a different tensor set ({bad!r}); nothing was written")
    for k, v in want.items():
        expect = v if v.dtype == torch.float32 and "lambda_" in k and prefix else v.to(dtype)
        if written[k].dtype != expect.dtype or not torch.equal(written[k], expect):
            raise ConversionError(f"verification failed: {path.name} tensor {k!r} is not what was converted; "
                                  f"nothing was written")


def export_model(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, dtype: str | None = None,
                 verify: bool = True, overwrite: bool = False) -> Report:
    """Write ``dst``, a directory that stock transformers loads as DiffLlama/Llama, from diffattn ``src``.

    The mapping is computed in float32 (exact for bf16/fp16 sources) and cast to ``dtype`` (default:
    the source's) when written. ``verify``: the written config + weights are loaded back with the stock
    class; its tensors must equal the converted ones exactly, and its float32 logits (mapping computed
    in float32) must equal the source model's on a fixed probe batch.
    """
    from .modeling import validate_model_dir  # strict config/tensor check of the source

    src, dst = Path(src), Path(dst)
    if to not in EXPORT_TARGETS:
        raise ConversionError(f"--to: unknown target {to!r}; valid: {', '.join(EXPORT_TARGETS)}")
    _prepare_dst(src, dst, overwrite)
    cfg = read_config(src)
    check_exportable(cfg, to)
    validate_model_dir(src)
    config_json = _read_json(src / "config.json")
    tensors = _load_tensors(src)
    state = {k[len(WEIGHT_PREFIX):]: v.float() for k, v in tensors.items()}
    target_dtype = DTYPES[dtype] if dtype else tensors[WEIGHT_PREFIX + "embed.weight"].dtype
    hf_state = to_hf_state(state, cfg)  # float32
    special = special_token_ids(src, config_json)
    make = diffllama_config if to == "diffllama" else llama_config
    hf_cfg = make(cfg, dtype=str(target_dtype).removeprefix("torch."), **special)
    arch = "DiffLlamaForCausalLM" if to == "diffllama" else "LlamaForCausalLM"
    hf_cfg.architectures = [arch]
    result = Report(src, dst, f"{cfg.attention} -> {arch}", None, [])

    def write(tmp: Path) -> None:
        hf_cfg.save_pretrained(str(tmp))
        save_file({k: v.to(target_dtype).contiguous() for k, v in hf_state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        result.tokenizer_files = copy_tokenizer(src, tmp, max_len=cfg.max_seq_len, **special)
        if verify:
            _check_file(tmp / "model.safetensors", hf_state, target_dtype)
            result.max_abs_diff = _verify_export(state, hf_state, tmp, cfg, arch)

    _with_tmp_dir(dst, write)
    return result


def _decoder(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> DecoderLM:
    with torch.device("meta"):
        model = build_model(cfg.replace(kernel="eager"))
    model.load_state_dict(state, assign=True, strict=True)
    return own_memory(model.float().eval())  # not the safetensors buffers (checkpoint.own_memory says why)


def _verify_export(state, hf_state, out: Path, cfg: ModelConfig, arch: str) -> float:
    import transformers

    theirs = getattr(transformers, arch).from_pretrained(str(out), dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    missing, unexpected = theirs.load_state_dict(hf_state, strict=False)  # the float32 mapping
    if unexpected or any(k != "lm_head.weight" or not cfg.tie_embeddings for k in missing):
        raise ConversionError(f"verification failed: {arch} does not take tensors {sorted(unexpected)[:2]} / "
                              f"lacks {sorted(missing)[:2]}; nothing was written")
    ids = _probe(cfg.vocab_size, cfg.max_seq_len)
    with torch.no_grad():
        return _check_logits(_decoder(cfg, state)(ids), theirs(ids).logits, f"{arch} vs diffattn")


# ---------------------------------------------------------------------------------------------
# Import: stock transformers -> diffattn
# ---------------------------------------------------------------------------------------------
def import_model(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
                 verify: bool = True, overwrite: bool = False) -> Report:
    """Write diffattn checkpoint ``dst`` (diff_v1 / standard) from a DiffLlama / Llama directory ``src``.

    As :func:`export_model`: mapping in float32, written in ``dtype`` (default: the source's; the λ
    vectors stay float32 as diffattn keeps them), verified against the stock class in float32.
    """
    from transformers import AutoConfig

    from .modeling import DiffAttnForCausalLM

    src, dst = Path(src), Path(dst)
    _prepare_dst(src, dst, overwrite)
    config_json = _read_json(src / "config.json")
    mt = config_json.get("model_type")
    if mt not in ("diffllama", "llama"):
        raise ConversionError(f"{src / 'config.json'}: model_type {mt!r} cannot be imported (supported: diffllama, "
                              f"llama; diffattn checkpoints need no import)")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(src))
    except Exception as e:  # transformers' own validation errors come in several types
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{src / 'config.json'}: transformers cannot read it ({msg})") from None
    cfg = model_config_from_hf(hf_cfg)
    tensors = _load_tensors(src)
    target_dtype = DTYPES[dtype] if dtype else tensors.get("model.embed_tokens.weight", torch.empty(0)).dtype
    if target_dtype not in DTYPES.values():
        raise ConversionError(f"{src}: weights are {target_dtype}; pass --dtype float32|bfloat16|float16")
    hf_state = {k: v.float() for k, v in tensors.items()}
    state = from_hf_state(hf_state, cfg, str(src))  # float32
    model = _decoder(cfg, state).to(target_dtype)  # λ vectors stay float32 (KeepFP32Params)
    special = {k: v for k, v in special_token_ids(src, config_json).items() if v is not None}
    hf = DiffAttnForCausalLM.from_decoder(model.eval(), **special)
    hf.config.kernel = cfg.kernel  # the model above was built with the eager kernel for verification
    hf.config.architectures = ["DiffAttnForCausalLM"]
    arch = "DiffLlamaForCausalLM" if mt == "diffllama" else "LlamaForCausalLM"
    result = Report(src, dst, f"{arch} -> {cfg.attention}", None, [])

    def write(tmp: Path) -> None:
        hf.save_pretrained(str(tmp))
        result.tokenizer_files = copy_tokenizer(src, tmp, max_len=cfg.max_seq_len, **special)
        if verify:
            _check_file(tmp / "model.safetensors", state, target_dtype, prefix=WEIGHT_PREFIX)
            if read_config(tmp) != cfg:
                raise ConversionError("verification failed: the written config.json is not the converted config; "
                                      "nothing was written")
            result.max_abs_diff = _verify_import(src, state, cfg, arch)

    _with_tmp_dir(dst, write)
    return result


def _verify_import(src: Path, state, cfg: ModelConfig, arch: str) -> float:
    import transformers

    theirs = getattr(transformers, arch).from_pretrained(str(src), dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    ids = _probe(cfg.vocab_size, cfg.max_seq_len)
    with torch.no_grad():
        return _check_logits(_decoder(cfg, state)(ids), theirs(ids).logits, f"diffattn vs {arch}")


__all__ = ["ConversionError", "EXPORT_TARGETS", "Report", "check_exportable", "copy_tokenizer", "diffllama_config",
           "export_model", "from_hf_state", "hf_expected_shapes", "import_model", "llama_config",
           "model_config_from_hf", "to_hf_state"]
