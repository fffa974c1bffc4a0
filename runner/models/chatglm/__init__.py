"""ChatGLM2/3 checkpoints on transformers' native ``GlmForCausalLM``, with no remote code.

ChatGLM3's architecture is exactly transformers' GLM: pre-RMSNorm decoder, fused and biased qkv
with multi-query groups, rotary embedding on the first half of every head with interleaved
(adjacent) pairs, SwiGLU MLP with a fused gate/up projection and an untied output layer. Why the
runner converts instead of running THUDM's own code: docs/compatibility.md.

One module per concern; callers import the one they need (this file re-exports nothing, so
loading the tokenizer never loads the adapter code):

- ``config``: the tensor layout a ChatGLM ``config.json`` implies; the equivalent ``GlmConfig``
- ``names``: module names both ways; LoRA ``target_modules`` translation
- ``tokenizer``: ChatGLM3's tokenizer from its SentencePiece model; its chat format
- ``files``: config.json, weight shards (never unpickled), safetensors, folders that appear whole
- ``weights``: state dicts both ways (fused ``query_key_value`` <-> ``q/k/v_proj``)
- ``checkpoint``: a whole ChatGLM checkpoint folder -> a native GLM folder
- ``adapters``: peft LoRA adapters both ways, exactly

The first four import nothing from this package; ``weights`` imports config and names;
``checkpoint`` and ``adapters`` import the modules above them, never each other.
torch / transformers / tokenizers are imported inside the functions that need them.
"""
