"""A toy fifth attention variant, defined here and nowhere else (a helper module for the tests, not a test module).

It is written to the variant contract of docs/architecture.md: a subclass of ``AttentionBase`` with the forward
pieces ``project_q/k/v`` (inherited), ``split`` (inherited) and ``combine``, plus the pipeline's hooks, and one
registry row. ``register`` is what a third-party package names as its entry point (group ``diffattn.variants``);
tests/test_variant_registry.py also installs such an entry point for a subprocess.

Output head h = C(2h) − λ·C(2h+1) over 2H query heads against Hkv shared K/V heads, with ONE learnable scalar λ per
layer, through the kernel's differential entry point. λ starts at ``toy_lambda_init``: a config field of this variant
alone, which ``ModelConfig`` does not declare (its default and value check are in the row below).
"""

from fractions import Fraction

import torch
from torch import nn

from diffattn import variants
from diffattn.model import AttentionBase, AttentionMaps
from diffattn.utils.checks import check_float


class ToyDiffAttention(AttentionBase):
    _fp32_params = ("lam",)
    PARAM_BUCKETS = {"lam": "attention.lambda"}
    uses_attend_differential = True

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        h, hkv, d, dm = config.n_head, config.n_kv_head, config.head_dim, config.d_model
        self.q_proj = nn.Linear(dm, 2 * h * d, bias=False)
        self.k_proj = nn.Linear(dm, hkv * d, bias=False)
        self.v_proj = nn.Linear(dm, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, dm, bias=False)
        self.lam = nn.Parameter(torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def reset_variant_parameters(self):
        self.lam.fill_(self.config.toy_lambda_init)

    @classmethod
    def attention_widths(cls, config):
        hd = config.n_head * config.head_dim
        return 2 * hd, 2 * hd

    def lambda_report(self):
        return {"lambda": float(self.lam)}

    def combine(self, q, k, v, xq, *, mask=None, is_causal=True, need_weights=False, kernel=None, dropout_p=0.0):
        out, probs = (kernel or self.kernel).attend_differential(
            q[:, 0::2], q[:, 1::2], k, k, v, self.lam, mask=mask, is_causal=is_causal, scale=self.scale,
            need_weights=need_weights, dropout_p=dropout_p)  # (B, H, T, d)
        maps = None
        if need_weights:
            p1, p2 = probs
            maps = AttentionMaps(p1 - self.lam.to(p1.dtype) * p2, torch.stack((p1, p2), dim=2))
        return out.transpose(1, 2).flatten(2), maps


TOY = variants.VariantSpec(
    name="toy_diff", cls=ToyDiffAttention, label="Toy DIFF", heads="n_head output heads, 2·n_head query heads",
    fields={"toy_lambda_init": variants.VariantField(0.25, lambda cfg, set_: check_float(
        "toy_lambda_init", cfg.toy_lambda_init, 0.0, 1.0, lo_open=True, hi_open=True))},
    baseline_heads=Fraction(2, 3), keep_kv_heads=True, report_note="Toy DIFF is a test's variant.")


def register():
    """The entry point: the rows to register."""
    return [TOY]
