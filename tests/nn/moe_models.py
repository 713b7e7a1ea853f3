"""Tiny random MoE models of three families, built from configs (no downloads), float32."""

from __future__ import annotations

import torch
import transformers

__all__ = ["deepseek_v3", "qwen3_moe", "mixtral", "FAMILIES"]


def deepseek_v3(seed: int = 0):
    """DeepSeek-V3 shapes scaled down: MLA, 1 dense layer, MoE with a shared expert, 2 groups."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=320, hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
        num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=96,
        kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_group=2,
        topk_group=1, max_position_embeddings=128, tie_word_embeddings=False)
    return _init(transformers.DeepseekV3ForCausalLM, cfg, seed)


def qwen3_moe(seed: int = 0):
    """Qwen3-MoE with an intermediate size (96) that is not a multiple of 128."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=320, hidden_size=192, intermediate_size=256, moe_intermediate_size=96,
        num_hidden_layers=2, num_experts=6, num_experts_per_tok=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=128,
        tie_word_embeddings=False)
    return _init(transformers.Qwen3MoeForCausalLM, cfg, seed)


def mixtral(seed: int = 0):
    """Mixtral (``block_sparse_moe.experts.{e}.w1/w2/w3`` on disk)."""
    cfg = transformers.MixtralConfig(
        vocab_size=320, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
        num_local_experts=4, num_experts_per_tok=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True)
    return _init(transformers.MixtralForCausalLM, cfg, seed)


FAMILIES = {"deepseek_v3": deepseek_v3, "qwen3_moe": qwen3_moe, "mixtral": mixtral}


def _init(cls, cfg, seed):
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # spread the weights so blocks differ and FP8 errors are visible
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "gate.weight" not in name:
                p.normal_(0.0, 0.06)
            elif "gate.weight" in name:
                p.normal_(0.0, 0.5)  # a router with clear preferences: no near-ties
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape) * 0.1)
    return model
