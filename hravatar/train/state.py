"""Resumable training state: model + optimiser moments + strategy + RNG, one atomic file."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from hravatar.io.safe import CheckpointError, load_safetensors_checked, save_safetensors_atomic

STATE_FORMAT = "hravatar-train-state"


def optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Flatten an optimiser's per-parameter state into named tensors + JSON-able scalars."""
    t, meta = {}, {"groups": [], "state_keys": {}}
    sd = opt.state_dict()
    for gi, g in enumerate(sd["param_groups"]):
        meta["groups"].append({k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, str, list, tuple, type(None)))})
    for pid, st in sd["state"].items():
        keys = []
        for k, v in st.items():
            if torch.is_tensor(v):
                t[f"{prefix}.{pid}.{k}"] = v.detach().cpu().reshape(v.shape) if v.dim() else v.detach().cpu().reshape(1)
                keys.append([k, v.dim()])
        meta["state_keys"][str(pid)] = keys
    return t, meta


def load_optimizer_tensors(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_tensors` (the optimiser must hold same-shaped parameters)."""
    sd = opt.state_dict()
    state = {}
    for pid, keys in meta["state_keys"].items():
        st = {}
        for k, nd in keys:
            v = tensors[f"{prefix}.{pid}.{k}"]
            st[k] = v.reshape(()) if nd == 0 else v
        state[int(pid)] = st
    # how the step is computed (fused, foreach, ...) is this machine's choice, not the run's
    impl = ("fused", "foreach", "capturable", "differentiable")
    for g, gm in zip(sd["param_groups"], meta["groups"]):
        g.update({k: v for k, v in gm.items() if k in g and k not in impl})
    sd["state"] = state
    opt.load_state_dict(sd)


def save_train_state(path: str | Path, tensors: dict[str, Tensor], meta: dict) -> None:
    save_safetensors_atomic(tensors, path, {"hravatar_train": json.dumps({"format": STATE_FORMAT, **meta})})


def load_train_state(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    tensors, header = load_safetensors_checked(path, required_meta=("hravatar_train",))
    meta = json.loads(header["hravatar_train"])
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a hravatar training state")
    return tensors, meta
