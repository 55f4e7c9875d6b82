"""Mid-stage resume state without pickle: tensors in safetensors, the rest in JSON,
written atomically so a kill at any instant leaves the last good state."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..fsutil import atomic_dir


def save_resume(folder: Path, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}  # tied weights (e.g. lm_head = embed_tokens) are stored once
    first: dict[int, str] = {}
    for k, v in module.state_dict().items():
        key = f"model.{k}"
        if v.data_ptr() in first:
            aliases[key] = first[v.data_ptr()]
        else:
            first[v.data_ptr()] = key
            tensors[key] = v.detach().contiguous()
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for idx, st in opt["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{idx}.{name}"] = val.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = val
    tensors["rng.torch"] = torch.get_rng_state()
    with atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"meta": meta, "param_groups": opt["param_groups"],
                                                    "opt_scalars": scalars, "aliases": aliases}, indent=1))


def load_resume(folder: Path, *, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    tensors = load_file(str(folder / "state.safetensors"))
    info = json.loads((folder / "state.json").read_text())
    for alias, src in info.get("aliases", {}).items():
        tensors[alias] = tensors[src]
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, sc in info["opt_scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return info["meta"]
