"""A tiny random-weight Llama written to a directory, for tests, examples and the CPU bench.

Random weights (not vLLM's "dummy" loader, whose logits are uniform) so that sampling,
logprobs and their comparisons mean something; no tokenizer: prompts are token ids.
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 512


def build_tiny_llama(path: str | Path, *, layers: int = 2, seed: int = 0) -> Path:
    """Write config + safetensors of a small Llama (head size 64, as vLLM's CPU
    attention requires) to `path`, once; returns the directory."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
        # a wide init so that logits are peaked: different prompts, different tokens
        initializer_range=0.2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(path, safe_serialization=True)
    return path
