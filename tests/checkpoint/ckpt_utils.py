"""Small synthetic Hugging Face checkpoints for the checkpoint tests (built in the test)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, KV, VOCAB = 576, 1536, 192, 320


def llama_tensors(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A 2-layer Llama-like state dict with odd shapes (576 x 1536, 192 x 576), an all-zero
    weight, a bias, norms, a MoE router and experts, tied embeddings (no lm_head)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": r(VOCAB, HIDDEN)}
    for i in range(2):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + r(HIDDEN)).to(dtype)
        t[p + "self_attn.q_proj.weight"] = r(HIDDEN, HIDDEN)
        t[p + "self_attn.q_proj.bias"] = r(HIDDEN)
        t[p + "self_attn.k_proj.weight"] = r(KV, HIDDEN)
        t[p + "self_attn.v_proj.weight"] = r(KV, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = r(HIDDEN, HIDDEN)
        t[p + "post_attention_layernorm.weight"] = (1 + r(HIDDEN)).to(dtype)
    p = "model.layers.0.mlp."
    t[p + "gate_proj.weight"] = r(INTER, HIDDEN)
    t[p + "up_proj.weight"] = r(INTER, HIDDEN)
    t[p + "down_proj.weight"] = r(HIDDEN, INTER)
    p = "model.layers.1.mlp."
    t[p + "gate.weight"] = r(4, HIDDEN)
    for e in range(2):
        t[p + f"experts.{e}.gate_proj.weight"] = r(256, HIDDEN)
        t[p + f"experts.{e}.up_proj.weight"] = r(256, HIDDEN)
        t[p + f"experts.{e}.down_proj.weight"] = r(HIDDEN, 256)
    t["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(HIDDEN, HIDDEN, dtype=dtype)
    t["model.norm.weight"] = torch.ones(HIDDEN, dtype=dtype)
    return t


def write_checkpoint(root: Path, tensors: dict[str, torch.Tensor], n_shards: int = 3,
                     config: dict | None = None, extra_files: bool = True,
                     assign: dict[str, int] | None = None) -> Path:
    """Save ``tensors`` as ``n_shards`` safetensors shards + index (or one model.safetensors
    when ``n_shards == 1``), a config.json and a tokenizer-like file. ``assign`` pins a key to
    a shard index."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for i, k in enumerate(keys):
        s = (assign or {}).get(k, i * n_shards // len(keys))
        groups[s][k] = tensors[k].contiguous()
    if n_shards == 1:
        save_file(groups[0], str(root / "model.safetensors"), metadata={"format": "pt"})
    else:
        wm = {}
        for s, grp in enumerate(groups):
            name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file(grp, str(root / name), metadata={"format": "pt"})
            wm.update({k: name for k in grp})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (root / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
           "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
           "torch_dtype": "bfloat16"}
    cfg.update(config or {})
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    if extra_files:
        (root / "tokenizer.json").write_text('{"version": "1.0", "model": {}}')
        (root / "generation_config.json").write_text('{"do_sample": false}')
    return root
