"""NVIDIA's official AWQ builds (`Efficient-Large-Model/VILA1.5-3b-AWQ` and siblings): the LLM
ships as one TinyChat state dict, `llm/*-w4-g128-awq-v2.pt`, in llm-awq's v2 packing. This
module reads such a file with `torch.load(weights_only=True)` (tensors only; a file that
pickles code is refused) and converts it to our AutoAWQ-GEMM checkpoint without
re-quantizing: the 4-bit codes, scales and zero points stay exactly the release's.

llm-awq's v2 layout of one linear (out N, in K, group g), as its packer builds it:
- `scales`, `scaled_zeros`: fp16 [8 * ceil(K/g / 8), N] (groups padded to a multiple of 8 with
  zeros); w = q * scales + scaled_zeros, where scaled_zeros = -scales * zero_point.
- `qweight`: int16 [N/4, K]. Within every 32 inputs, input k = 8a + 2b + c (a<4, b<4, c<2)
  moves to position 8b + 4c + a; then four output rows are interleaved per 64 positions: the
  block of rows 4n'..4n'+3 and positions 64j..64j+63, read row-major, is cut into runs of
  four, and run t (0..63) becomes int16 word 64j + t of row n', its first value in the low
  nibble.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from edge_vila.checkpoint import copy_all_but_llm_weights
from edge_vila.config import load_config, tinychat_weights
from edge_vila.errors import CheckpointError, InputError
from edge_vila.fsutil import atomic_dir, atomic_write_json, read_json
from edge_vila.quantfmt import pack_linear

log = logging.getLogger(__name__)

INTERLEAVE, KSTRIDE = 4, 64


def scale_rows(k: int, group: int) -> int:
    """Rows of `scales` / `scaled_zeros`: the K/g groups padded to a multiple of 8."""
    return 8 * -(-(k // group) // 8)


def pack_qweight(codes: np.ndarray) -> np.ndarray:
    """4-bit codes uint8 [N, K] -> llm-awq v2 int16 [N/4, K] (the module docstring's layout).
    We only consume this format; the packer makes replicas of the releases for tests."""
    n, k = codes.shape
    c = codes.astype(np.int32).reshape(n, k // 32, 4, 4, 2)  # input 8a + 2b + c -> [a, b, c]
    c = c.transpose(0, 1, 3, 4, 2).reshape(n, k)  # position 8b + 4c + a
    c = c.reshape(n // INTERLEAVE, INTERLEAVE, k // KSTRIDE, KSTRIDE).transpose(0, 2, 1, 3)
    c = c.reshape(n // INTERLEAVE, k // KSTRIDE, KSTRIDE, INTERLEAVE)
    words = c[..., 0] | (c[..., 1] << 4) | (c[..., 2] << 8) | (c[..., 3] << 12)
    return words.reshape(n // INTERLEAVE, k).astype(np.uint16).view(np.int16)


def unpack_qweight(qweight: np.ndarray) -> np.ndarray:
    """llm-awq v2 int16 [N/4, K] -> 4-bit codes uint8 [N, K] (pack_qweight undone)."""
    n4, k = qweight.shape
    if k % KSTRIDE:
        raise CheckpointError(f"qweight has {k} inputs, not a multiple of {KSTRIDE} (not llm-awq v2 packing)")
    words = qweight.astype(np.int32) & 0xFFFF
    nib = np.stack([(words >> (4 * i)) & 0xF for i in range(INTERLEAVE)], axis=-1)  # [N/4, K, 4]
    # runs of four -> the row-major [4 rows, 64 positions] block of each 64-stride
    blk = nib.reshape(n4, k // KSTRIDE, INTERLEAVE, KSTRIDE).transpose(0, 2, 1, 3).reshape(n4 * INTERLEAVE, k)
    # position 8b + 4c + a within 32 holds input 8a + 2b + c
    pos = blk.reshape(-1, k // 32, 4, 2, 4)  # [.., b, c, a]
    codes = pos.transpose(0, 1, 4, 2, 3).reshape(-1, k)  # [.., a, b, c]
    return codes.astype(np.uint8)


def pack_linear_v2(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int) -> dict[str, np.ndarray]:
    """codes [N, K], scales / zeros [N, G] -> the TinyChat tensors of one linear (fp16 padded
    scales and scaled_zeros = -scales * zeros, as the release stores them)."""
    n, k = codes.shape
    rows = scale_rows(k, group)
    sc = np.zeros((rows, n), np.float16)
    sz = np.zeros((rows, n), np.float16)
    sc[: scales.shape[1]] = scales.T
    sz[: scales.shape[1]] = -(scales.astype(np.float32) * zeros).T
    return {"qweight": pack_qweight(codes), "scales": sc, "scaled_zeros": sz}


def group_size_of(path: Path) -> int:
    """The group size in the release's file name (`...-w4-g128-awq-v2.pt`), else 128."""
    m = re.search(r"-g(\d+)", path.name)
    return int(m.group(1)) if m else 128


def convert_linear(qweight, scales, scaled_zeros, group: int, path: Path, name: str) -> dict[str, np.ndarray]:
    """One TinyChat linear -> AutoAWQ GEMM tensors (same codes, scales and zero points)."""
    q = unpack_qweight(qweight)
    k = q.shape[1]
    if scales.shape[0] != scale_rows(k, group):
        raise CheckpointError(f"{path}: {name}.scales has {scales.shape[0]} rows, expected "
                              f"{scale_rows(k, group)} for {k} inputs in groups of {group}")
    groups = k // group
    s = scales[:groups].astype(np.float32).T  # [N, G]
    zf = -scaled_zeros[:groups].astype(np.float32).T / np.where(s == 0, 1, s)
    z = np.rint(zf)
    if np.abs(zf - z).max(initial=0) > 0.05 or z.min(initial=0) < 0 or z.max(initial=0) > 15:
        raise CheckpointError(f"{path}: {name}.scaled_zeros are not -scales * zero_point with 4-bit zero points")
    return pack_linear(q, s, z.astype(np.uint8))


def read_tinychat_state(path: Path) -> dict:
    import pickle

    import torch

    try:
        try:  # memory-mapped: a 3B LLM's tensors are not read until converted, one at a time
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise CheckpointError(f"{path}: refused: the file needs more than weights-only loading "
                              f"(it pickles code, not just tensors: {first[:160]})") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({str(e).splitlines()[0][:160]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    if not any(k.endswith(".qweight") for k in sd):
        raise CheckpointError(f"{path}: no .qweight tensors: not a TinyChat AWQ state dict")
    return sd


def convert_tinychat_checkpoint(src: str | Path, out: str | Path) -> Path:
    """An official AWQ build (VILA layout, llm/ holding a TinyChat .pt) -> our quantized
    VILA checkpoint (llm/model.safetensors in AutoAWQ GEMM + quantization_config)."""
    import torch

    from .stream import write_shards

    src, out = Path(src), Path(out)
    cfg = load_config(src)
    pt = tinychat_weights(cfg.llm_dir)
    if pt is None:
        raise InputError(f"{cfg.llm_dir}: no TinyChat *.pt weights (an official *-AWQ build keeps its LLM there)")
    sd = read_tinychat_state(pt)
    group = group_size_of(pt)

    def items():  # one linear at a time: the .pt is memory-mapped, the output streamed to disk
        for key, t in sd.items():
            if key.endswith(".qweight"):
                base = key[: -len(".qweight")]
                missing = [base + s for s in (".scales", ".scaled_zeros") if base + s not in sd]
                if missing:
                    raise CheckpointError(f"{pt}: '{missing[0]}' missing for '{key}'")
                packed = convert_linear(t.numpy(), sd[base + ".scales"].float().numpy(),
                                        sd[base + ".scaled_zeros"].float().numpy(), group, pt, base)
                yield from ((f"{base}.{k}", torch.from_numpy(v)) for k, v in packed.items())
            elif not key.endswith((".scales", ".scaled_zeros")):
                yield key, t.contiguous()

    llm_cfg = read_json(cfg.llm_dir / "config.json", "LLM config")
    llm_cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                      "version": "gemm", "modules_to_not_convert": ["lm_head"],
                                      "edge_vila_method": "tinychat", "edge_vila_source": pt.name}
    with atomic_dir(out) as tmp:
        llm_dir = copy_all_but_llm_weights(cfg, tmp)
        write_shards(items(), llm_dir, {"format": "pt", "quant": "awq-gemm"})
        atomic_write_json(llm_dir / "config.json", llm_cfg)
    log.info("converted %s (TinyChat AWQ, g%d) to %s without re-quantizing", pt, group, out)
    return out
