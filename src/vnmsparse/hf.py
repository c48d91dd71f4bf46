"""transformers interop: `model.save_pretrained(dir)` and `AutoModelForCausalLM.from_pretrained(dir)` for V:N:M models,
and the dense export any tool reads.

vnmsparse registers a quantization config and quantizer named "vnmsparse" with transformers (its
`register_quantization_config` / `register_quantizer` hooks). `sparsify` and `load_pretrained` attach them to a
transformers model (`attach`), so that its own `save_pretrained` writes `model.safetensors` with each pruned layer's
canonical tensors (`values`, `columns`, `positions`) and a `quantization_config` naming every layer's pattern in
config.json; `from_pretrained` then swaps those layers for `VNMLinear`s before the weights load and checks them
after (packing them on a GPU). Importing transformers costs seconds, so the registration waits for transformers'
quantizer registry to be imported (`install`, called by `import vnmsparse`). Without vnmsparse imported, transformers
does not know the method, warns and leaves the pruned layers uninitialised: import vnmsparse first.

`export_dense(source, out)` writes a plain transformers checkpoint, the pruned weights as zeros (`vnm export`).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .format import VNMTensor
from .nn import VNMLinear, extra_state_tensor
from .pattern import VNMPattern

QUANT_METHOD = "vnmsparse"
CONFIG_VERSION = "1"
_REGISTRY = "transformers.quantizers.auto"  # the module holding transformers' quantizer registry
_classes: tuple[type, type] | None = None  # (config class, quantizer class), once registered


def _define() -> tuple[type, type]:
    """The config and quantizer classes (transformers is imported by now), registered once."""
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config,
                                              register_quantizer)
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class VNMSparseConfig(QuantizationConfigMixin):
        """config.json's `quantization_config` for a V:N:M model: the pattern of every pruned nn.Linear."""

        def __init__(self, layers: dict[str, str] | None = None, version: str = CONFIG_VERSION, **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            if version != CONFIG_VERSION:
                raise ValueError(f"quantization_config version {version!r} is not supported; this build reads {CONFIG_VERSION}")
            if not isinstance(layers, dict) or not layers:
                raise ValueError(f"quantization_config.layers must map layer names to patterns, got {layers!r}")
            self.layers = {str(name): str(VNMPattern.parse(pattern)) for name, pattern in layers.items()}
            self.version = version

    class VNMSparseHfQuantizer(HfQuantizer):
        """Loads a checkpoint whose pruned layers hold V:N:M-compressed tensors; writes it back the same way."""

        requires_calibration = True  # only pre-pruned checkpoints: pruning itself is `vnmsparse.sparsify`

        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
            for name, pattern in self.quantization_config.layers.items():
                try:
                    linear = model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"quantization_config names layer {name!r}, which this model lacks") from None
                if not isinstance(linear, nn.Linear):
                    raise ValueError(f"quantization_config names {name!r}, a {type(linear).__name__}, not an nn.Linear")
                weight = VNMTensor.zeros((linear.out_features, linear.in_features), pattern, linear.weight.dtype,
                                         linear.weight.device)
                layer = VNMLinear(weight, linear.bias)
                layer.extra_state_as_tensor = True  # the loader reads model.state_dict(): tensors only
                model.set_submodule(name, layer)

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            for name in self.quantization_config.layers:
                layer = model.get_submodule(name)
                layer.extra_state_as_tensor = False
                if layer.values.is_meta:
                    raise ValueError(f"layer {name!r} was not in the checkpoint: its compressed tensors are missing")
                try:
                    layer.rebuild()
                except (TypeError, ValueError) as error:
                    raise ValueError(f"layer {name!r}: {error}") from None
            model.vnm_sparsity = getattr(model, "vnm_sparsity", {})
            model.is_quantized = False  # transformers would refuse .half() / .float(); VNMLinear converts itself
            return model

        def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
            # The layers as they are now (the config is written after this); safetensors holds tensors only, so each
            # layer's extra state (version, shape, pattern, two_four_copy) is stored as the uint8 JSON its
            # set_extra_state reads.
            self.quantization_config.layers = sparse_layers(model)
            state = model.state_dict()
            return {k: extra_state_tensor(v) if isinstance(v, dict) else v for k, v in state.items()}, {}

        def is_serializable(self) -> bool:
            return True

        @property
        def is_compileable(self) -> bool:
            return True  # the op has a fake implementation; torch.compile and CUDA graphs run it

        @property
        def is_trainable(self) -> bool:
            return False

    if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:  # registered by another copy of this module
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

        return AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD], AUTO_QUANTIZER_MAPPING[QUANT_METHOD]
    register_quantization_config(QUANT_METHOD)(VNMSparseConfig)
    register_quantizer(QUANT_METHOD)(VNMSparseHfQuantizer)
    return VNMSparseConfig, VNMSparseHfQuantizer


def register() -> tuple[type, type]:
    """Register the "vnmsparse" quantization method with transformers (imports it); returns (config, quantizer)."""
    global _classes
    if _classes is None:
        _classes = _define()
    return _classes


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers with transformers right after its quantizer registry is first imported (a post-import hook)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _REGISTRY:
            return None
        sys.meta_path.remove(self)  # one shot; lets the other finders find the real module
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module: Any) -> None:
                exec_module(module)
                register()

            spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Make "vnmsparse" checkpoints load through transformers: register now if its registry is imported, else as
    soon as it is (no transformers import here: `import vnmsparse` stays fast)."""
    if _REGISTRY in sys.modules:
        register()
    elif importlib.util.find_spec("transformers") is not None and not any(
            isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


def sparse_layers(model: nn.Module) -> dict[str, str]:
    """{layer name: pattern} of every VNMLinear in `model`."""
    return {name: str(m.pattern) for name, m in model.named_modules() if isinstance(m, VNMLinear)}


def _is_transformers_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def attach(model: nn.Module) -> None:
    """Let a transformers model's own `save_pretrained` write its VNMLinear layers (their pattern in config.json's
    quantization_config). `sparsify` and `load_pretrained` call this; other models are left as they are."""
    if not _is_transformers_model(model):
        return
    config_cls, quantizer_cls = register()
    config = config_cls(layers=sparse_layers(model))
    model.config.quantization_config = config
    model.hf_quantizer = quantizer_cls(config, pre_quantized=True)


def detach(model: nn.Module) -> None:
    """Undo `attach`: the model is a plain transformers model again (after its layers were densified)."""
    for name in ("hf_quantizer", "quantization_method"):
        if hasattr(model, name):
            delattr(model, name)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config


def densify(model: nn.Module) -> nn.Module:
    """Replace every VNMLinear of `model` (in place) by the nn.Linear holding its weight, pruned entries zero."""
    for name in list(sparse_layers(model)):
        model.set_submodule(name, model.get_submodule(name).to_linear())
    detach(model)
    return model


def _load_sparse(source: Path) -> nn.Module:
    """A pruned model from a folder: vnmsparse's own format or a transformers one with a vnmsparse config."""
    from .checkpoint import WEIGHTS_NAME, load_pretrained

    if (source / WEIGHTS_NAME).is_file():
        return load_pretrained(source)
    from transformers import AutoModelForCausalLM

    register()
    return AutoModelForCausalLM.from_pretrained(source)


def export_dense(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the pruned model in `source` (a `save_pretrained` folder, or a transformers one with a vnmsparse
    quantization_config) as a plain transformers checkpoint in `out`, pruned weights stored as zeros: loadable by
    any tool that reads dense models. A tokenizer in `source` is copied along. Returns `out`."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {os.fspath(source)!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out {os.fspath(out)!r} exists and is not an empty folder; pick a new one")
    model = densify(_load_sparse(source))
    if not _is_transformers_model(model):
        raise ValueError(f"{os.fspath(source)!r} holds no transformers model; a dense export needs one")
    model.save_pretrained(out)
    for path in source.iterdir():  # the tokenizer and generation files the source folder has
        if path.is_file() and (path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or
                               path.name in ("generation_config.json", "chat_template.jinja")):
            shutil.copy2(path, out / path.name)
    return out
