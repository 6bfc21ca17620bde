"""Resumable training state beside a checkpoint: ``P.train.safetensors`` (no pickle).

Holds what the model checkpoint does not: the step, the raw (non-EMA) weights where they
differ, and the optimizer's moments. Tensors go into safetensors; the optimizer's scalar
hyper-parameters go into the file's string metadata as JSON.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mvld.common.errors import ConfigError
from mvld.model.checkpoint import checkpoint_paths


def state_path(checkpoint: str | Path) -> Path:
    """``P.train.safetensors`` for the checkpoint ``P``."""
    json_path, _ = checkpoint_paths(checkpoint)
    return json_path.with_name(json_path.name[: -len(".json")] + ".train.safetensors")


@dataclass
class TrainingState:
    """Everything needed to continue a run exactly."""

    step: int
    modules: dict[str, dict[str, torch.Tensor]]  # name -> state_dict
    optimizer: dict[str, Any]  # torch optimizer state_dict
    info: dict[str, Any]  # JSON-ready extras (e.g. best validation score)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(checkpoint: str | Path, state: TrainingState) -> Path:
    """Write the state atomically beside the checkpoint ``P``."""
    path = state_path(checkpoint)
    tensors, optimizer_meta = _flatten_optimizer(state.optimizer)
    for module, weights in state.modules.items():
        tensors |= {f"module.{module}.{k}": v for k, v in weights.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "step": state.step,
        "optimizer": optimizer_meta,
        "info": state.info,
        "modules": sorted(state.modules),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"mvld_training_state": json.dumps(meta)})
    tmp.replace(path)
    return path


def load_training_state(checkpoint: str | Path) -> TrainingState:
    """Read the state written by ``save_training_state``; ``ConfigError`` if absent or bad."""
    path = state_path(checkpoint)
    if not path.is_file():
        raise ConfigError(f"cannot resume: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["mvld_training_state"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot resume: {path} is corrupt: {exc}") from exc
    modules: dict[str, dict[str, torch.Tensor]] = {name: {} for name in meta["modules"]}
    optimizer_tensors = {}
    for key, tensor in tensors.items():
        if key.startswith("module."):
            module, name = key[len("module.") :].split(".", 1)
            modules[module][name] = tensor
        else:
            optimizer_tensors[key] = tensor
    optimizer = _unflatten_optimizer(optimizer_tensors, meta["optimizer"])
    return TrainingState(
        step=int(meta["step"]), modules=modules, optimizer=optimizer, info=meta["info"]
    )


def promote_to_best(out: Path) -> None:
    """Copy the model files of ``out/last`` to ``out/best`` (after a better validation)."""
    for source in checkpoint_paths(out / "last"):
        shutil.copyfile(source, out / source.name.replace("last", "best", 1))
