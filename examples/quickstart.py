"""Build a tiny model of every variant, parameter-matched, and decode a few tokens with the KV cache."""

import torch

import diffattn
from diffattn import presets

torch.manual_seed(0)
prompt = torch.randint(0, 512, (1, 8))
for attention in diffattn.ATTENTION_VARIANTS:
    config = presets.get("tiny", attention)
    model = diffattn.build_model(config).eval()
    logits = model(prompt)  # (batch, time, vocab)
    out = model.generate(prompt, max_new_tokens=8)  # greedy, with the KV cache
    n = model.param_counts()["total"]
    print(f"{attention:12s} heads={config.n_head:2d}/{config.n_kv_head:<2d} params={n:,} "
          f"logits={tuple(logits.shape)} generated={out[0, 8:].tolist()}")
