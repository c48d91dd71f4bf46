"""Checkpoints of sparsified models: `save_pretrained(model, dir)` / `load_pretrained(dir, densify=False)`.

A folder holds `config.json` (for HF models their own config) with a `sparsity_config` (pattern per layer, whether
each layer asks for a 2:4 copy (`VNMLinear.two_four_copy`: the flag, never the derived copy), method, version), and
one safetensors file with the whole state dict: each `VNMLinear`'s compressed tensors under its buffer names, with
its `VNMTensor.metadata()` record (checksummed) in the file header, and every other tensor under a second checksum.
The file is not named `model.safetensors`, so that a plain HF `from_pretrained` fails loudly instead of filling the
pruned layers with random weights; `load_pretrained(dir, densify=True)` gives the ordinary dense model (pruned
weights zero).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, hf
from .format import VNMTensor
from .nn import VNMLinear
from .ops import check_two_four_copy

WEIGHTS_NAME = "vnm_model.safetensors"
CONFIG_NAME = "config.json"
CHECKPOINT_FORMAT = "vnmsparse.checkpoint"
CHECKPOINT_VERSION = "1"
_DTYPE_NAMES = {"float32", "float16", "bfloat16"}


def _dense_checksum(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> str:
    """sha256 over every name, dtype, shape and byte of the tensors outside the compressed records."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{str(t.dtype)}:{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    digest.update(json.dumps(aliases, sort_keys=True).encode())
    return digest.hexdigest()


def _config_checksum(config: dict[str, Any]) -> str:
    """sha256 of config.json's content (key order aside): an edited rms_norm_eps or rope_theta cannot load silently."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _float_dtype(model: nn.Module) -> str | None:
    """The dtype of the model's first floating-point parameter or buffer, as a name ("bfloat16")."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return str(t.dtype).removeprefix("torch.")
    return None


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, so a failed save never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model` (VNMLinear layers compressed, everything else as is) to `directory`; returns the folder."""
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sparse = {name: m for name, m in model.named_modules() if isinstance(m, VNMLinear)}
    if not sparse:
        raise ValueError("model has no VNMLinear layer; sparsify it first (or save it with its own library)")
    records = {name: m.weight.metadata() for name, m in sparse.items()}
    extra = {f"{name}._extra_state" for name in sparse}

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, value in model.state_dict().items():
        if name in extra:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(value).__name__}; only tensors can be saved")
        view = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if view in views:  # a tied weight: saved once, re-linked on load
            aliases[name] = views[view]
            continue
        views[view] = name
        tensor = value.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in storages:  # overlapping views of one buffer
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    compressed = {f"{name}.{k}" for name in sparse for k in ("values", "columns", "positions")}
    dense = {k: v for k, v in tensors.items() if k not in compressed}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "layers": json.dumps(records),
        "aliases": json.dumps(aliases),
        "dense_sha256": _dense_checksum(dense, aliases),
    }

    sparsity_config = {
        **getattr(model, "vnm_sparsity", {}),
        "format": "vnmsparse",
        "version": CHECKPOINT_VERSION,
        "library_version": __version__,
        "dtype": _float_dtype(model),
        "layers": {name: str(m.pattern) for name, m in sparse.items()},
        "two_four_copy": {name: m.two_four_copy for name, m in sparse.items()},
    }
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_json_string"):
        config = json.loads(hf_config.to_json_string(use_diff=False))
        config["architectures"] = config.get("architectures") or [type(model).__name__]
        config.pop("quantization_config", None)  # transformers' record of the same layers (`vnmsparse.hf`)
    else:
        config = {"architecture": f"{type(model).__module__}.{type(model).__qualname__}"}
    config["sparsity_config"] = sparsity_config
    metadata["config_sha256"] = _config_checksum(config)

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, os.fspath(p), metadata=metadata))
    _atomic_write(folder / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return folder


def read_sparsity_config(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json as a dict, its sparsity_config), checked to be a vnmsparse checkpoint this build reads."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    sparsity = config.get("sparsity_config") if isinstance(config, dict) else None
    if not isinstance(sparsity, dict) or sparsity.get("format") != "vnmsparse":
        raise ValueError(f"{path} has no vnmsparse sparsity_config: not a checkpoint written by save_pretrained")
    if sparsity.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"sparsity_config version {sparsity.get('version')!r} is not supported; this build reads {CHECKPOINT_VERSION}")
    layers = sparsity.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in layers.items()):
        raise ValueError(f"{path}: sparsity_config.layers must map layer names to pattern strings, got {layers!r}")
    copies = sparsity.get("two_four_copy", {})  # absent in checkpoints written before the flag: no copies
    if not isinstance(copies, dict) or not all(k in layers and isinstance(v, bool) for k, v in copies.items()):
        raise ValueError(f"{path}: sparsity_config.two_four_copy must map pruned layer names to true or false, got {copies!r}")
    if sparsity.get("dtype") is not None and sparsity["dtype"] not in _DTYPE_NAMES:
        raise ValueError(f"{path}: sparsity_config.dtype must be one of {sorted(_DTYPE_NAMES)} or null, got {sparsity['dtype']!r}")
    architectures = config.get("architectures")
    if architectures is not None and (not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)):
        raise ValueError(f"{path}: architectures must be a list of class names, got {architectures!r}")
    return config, sparsity


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of the weights file; a damaged file raises ValueError."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {os.fspath(path.parent)!r}")
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"cannot read {path} (truncated or not a safetensors file): {error}") from error


def _parse_header(metadata: dict[str, str], path: Path) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    if metadata.get("format") != CHECKPOINT_FORMAT or metadata.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} file "
                         f"(format={metadata.get('format')!r}, version={metadata.get('version')!r})")
    try:
        return json.loads(metadata["layers"]), json.loads(metadata["aliases"])
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} has a damaged header: {error}") from None


def _skeleton(config: dict[str, Any], dtype: str | None) -> nn.Module:
    """An HF model of the saved architecture, uninitialised (its weights are loaded next)."""
    import transformers
    from transformers.initialization import no_init_weights

    architectures = config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"config.json names no transformers architecture ({architectures!r}); "
                         "pass model= an instance of the saved (dense) model to load into")
    hf_config = cls.config_class.from_dict({k: v for k, v in config.items() if k != "sparsity_config"})
    with no_init_weights():
        model = cls._from_config(hf_config, dtype=getattr(torch, dtype) if dtype else None)
    model.tie_weights()
    return model


def _check_ties(model: nn.Module, stored: set[str]) -> None:
    """Parameters the model shares must have been saved once (the others as aliases); else one would be lost."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for group in names.values():
        separate = [n for n in group if n in stored]
        if len(separate) > 1:
            raise ValueError(f"the checkpoint holds separate tensors for {separate}, which this model ties together")


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], weights: dict[str, VNMTensor], densify: bool,
                folder: Path) -> None:
    """Raise ValueError unless `state` (dense tensors) and `weights` (compressed layers) fill `model` exactly: every
    layer an nn.Linear of the stored shape, every other tensor present with its shape, nothing left over."""
    current = model.state_dict()
    expected = dict(current)
    for name, weight in weights.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r} to load into") from None
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != weight.shape:
            raise ValueError(f"layer {name!r} of the model is {linear!r}; the checkpoint holds a {weight.shape} weight")
        if not densify:
            del expected[f"{name}.weight"]
    missing = sorted(set(expected) - set(state) - {f"{n}.weight" for n in weights})
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(current[key].shape):
            raise ValueError(f"{folder} does not fit the model: {key} is {tuple(tensor.shape)} in the checkpoint, "
                             f"{tuple(current[key].shape)} in the model")


def load_pretrained(
    directory: str | os.PathLike, densify: bool = False, model: nn.Module | None = None
) -> nn.Module:
    """Load a folder written by `save_pretrained` (on the CPU; move it after).

    HF models are rebuilt from config.json; for others pass `model=`, a dense instance of the same
    architecture, which is filled in place. `densify=True` returns the plain dense model (nn.Linear layers
    holding the pruned weights, zeros included) instead of VNMLinear layers. Every compressed record and the
    rest of the state are checksummed: a truncated or altered folder raises ValueError.
    """
    if not isinstance(densify, bool):
        raise TypeError(f"densify must be a bool, got {densify!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    folder = Path(directory)
    config, sparsity = read_sparsity_config(folder)
    tensors, metadata = _read_weights(folder / WEIGHTS_NAME)
    records, aliases = _parse_header(metadata, folder / WEIGHTS_NAME)
    if set(records) != set(sparsity.get("layers", {})):
        raise ValueError(f"{CONFIG_NAME} and {WEIGHTS_NAME} disagree on the pruned layers")
    compressed = {f"{name}.{k}" for name in records for k in ("values", "columns", "positions")}
    dense = {k: v for k, v in tensors.items() if k not in compressed}
    if _dense_checksum(dense, aliases) != metadata.get("dense_sha256"):
        raise ValueError(f"{folder / WEIGHTS_NAME} fails its sha256 check: the file was altered or damaged")

    weights = {}
    copies = sparsity.get("two_four_copy", {})
    for name, record in records.items():
        try:
            weights[name] = VNMTensor.from_state({k: tensors[f"{name}.{k}"] for k in ("values", "columns", "positions")}, record)
            check_two_four_copy(copies.get(name, False), weights[name])
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"layer {name!r} in {folder / WEIGHTS_NAME}: {error}") from None
        if sparsity["layers"][name] != record["pattern"]:
            raise ValueError(f"layer {name!r}: {CONFIG_NAME} says {sparsity['layers'][name]}, the weights {record['pattern']}")
    if metadata.get("config_sha256") != _config_checksum(config):
        raise ValueError(f"{folder / CONFIG_NAME} does not match the checksum {WEIGHTS_NAME} holds for it: the config "
                         "was edited or belongs to another checkpoint")

    if model is None:
        model = _skeleton(config, sparsity.get("dtype"))
    _check_ties(model, set(dense))
    state = dict(dense)
    for alias, target in aliases.items():
        if target not in state:
            raise ValueError(f"{folder / WEIGHTS_NAME}: alias {alias!r} names {target!r}, which it does not hold")
        state[alias] = state[target]
    _check_fits(model, state, weights, densify, folder)  # every check before the first change to `model`

    for name, weight in weights.items():
        if densify:
            state[f"{name}.weight"] = weight.to_dense()
        else:
            sparse = VNMLinear(weight, model.get_submodule(name).bias, copies.get(name, False))
            model.set_submodule(name, sparse)
            state.update({f"{name}.{k}": v for k, v in weight.state_tensors().items()})
            state[f"{name}._extra_state"] = sparse.get_extra_state()
    model.load_state_dict(state, strict=True)
    if not densify:
        model.vnm_sparsity = {k: v for k, v in sparsity.items()
                              if k not in ("format", "version", "library_version", "dtype", "layers", "two_four_copy")}
        hf.attach(model)
    return model.eval()
