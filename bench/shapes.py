"""Model shapes the GPU benchmarks build with random weights (no download needed)."""

from __future__ import annotations

from typing import Any

# THUDM/chatglm3-6b's config.json in transformers' native GLM terms (what the converter writes).
GLM_6B: dict[str, Any] = {
    "model_type": "glm",
    "architectures": ["GlmForCausalLM"],
    "vocab_size": 65024,
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_hidden_layers": 28,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "partial_rotary_factor": 0.5,
    "attention_bias": True,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 2,
    "bos_token_id": 1,
}
