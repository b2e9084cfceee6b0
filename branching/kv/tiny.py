"""A tiny random-weight Llama written to a directory, for tests, examples and the CPU bench.

Random weights (not vLLM's "dummy" loader, whose logits are uniform) so that sampling,
logprobs and their comparisons mean something. Prompts are token ids; with
`tokenizer=True` the directory also gets a word-level tokenizer over the same 512-token
vocabulary and a chat template, so that `vllm serve` can take messages and text.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 512
# ids 0-2 as in the model config (unk, bos, eos), then the chat template's markers
SPECIAL = ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# a few real words, so that examples read as text; the rest of the vocabulary is w<i>
WORDS = (
    "the a an and or not is are was be to of in on for with as at by from it this that "
    "i you we they he she my your our what which how why when where who yes no hello "
    "world fix bug test tests fail failed pass passed patch file line code function "
    "error run branch candidate best one two three four next step please write read "
    "change add remove return value call python import def class if else true false"
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_llama(path: str | Path, *, layers: int = 2, seed: int = 0,
                     tokenizer: bool = False) -> Path:
    """Write config + safetensors of a small Llama (head size 64, as vLLM's CPU
    attention requires) to `path`, once, and with `tokenizer` its tokenizer files;
    returns the directory."""
    path = Path(path)
    if tokenizer and not (path / "tokenizer.json").exists():
        _write_tokenizer(path)
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


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    names = list(SPECIAL) + WORDS.split()
    names += [f"w{i}" for i in range(len(names), VOCAB)]
    assert len(names) == len(set(names)) == VOCAB
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces
    tok.add_special_tokens(list(SPECIAL))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192,
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
