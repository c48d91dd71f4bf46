"""Small random-init models for the model-level tests: SmolLM2's LLaMA config shrunk to 2 layers, and a 2-block ViT."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M's architecture (GQA, tied embeddings, SiLU MLP) at 2 layers, hidden 64, vocab 512."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=128, rms_norm_eps=1e-5)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_vit(seed: int = 0):
    """timm's vit_tiny_patch16_224 (hidden 192) cut to 2 blocks, random init, 10 classes."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=10).eval()


def token_ids(n: int = 4, seq_len: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


class WordTokenizer:
    """Enough of an HF tokenizer for the jobs: words to ids below 512, and a save_pretrained that writes a file."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        ids = [sum(word.encode()) % 512 for word in text.split()]
        return SimpleNamespace(input_ids=torch.tensor([ids]))

    def save_pretrained(self, folder):
        Path(folder, "tokenizer.txt").write_text("words")
