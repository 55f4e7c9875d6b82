"""Random-weight replicas of the released VILA-family checkpoints, for tests and benchmarks.

A replica has the release's folder layout, config.json fields, tensor names, dtype (bf16),
safetensors sharding with its index, and tokenizer kind (a sentencepiece `tokenizer.model`
alone for VILA1.5-3B/13B; a `tokenizer.json` with Llama-3's or Qwen2's special tokens at
their real ids), at the release's full widths. Only the number of layers is cut (given by
the caller), so a replica writes in seconds and runs through the toolchain in a test.

Weights are random (normal, std 0.02; norms one), so a replica says nothing about answer
quality — it proves that the release's files load, quantize, export and run.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from .fsutil import atomic_dir, atomic_write_json
from .released import ReleasedLayout, get_layout
from .testing import default_corpus

log = logging.getLogger(__name__)

def sentencepiece_model(vocab_size: int = 32000, seed_vocab: int = 800) -> bytes:
    """A Llama-2-style sentencepiece BPE model (byte fallback, dummy prefix, digits split,
    identity normalizer; <unk>=0 <s>=1 </s>=2, bytes at 3..258) with exactly `vocab_size`
    pieces: trained on the synthetic world's text, then padded with single private-use
    characters so ids and the embedding table have the release's size."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(default_corpus() * 3), model_writer=buf, vocab_size=seed_vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    model = pb.ModelProto()
    model.ParseFromString(buf.getvalue())
    low = min(p.score for p in model.pieces) - 1.0
    for i in range(vocab_size - len(model.pieces)):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = chr(0xF0000 + i), low - i * 1e-3, pb.ModelProto.SentencePiece.NORMAL
    return model.SerializeToString()


def bpe_tokenizer_json(vocab_size: int, specials: dict[str, int]) -> str:
    """A byte-level BPE tokenizer.json (Llama-3 / Qwen2 style) whose regular vocabulary is
    padded to the first special id and whose special tokens sit at their released ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(default_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=1000, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    first_special = min(specials.values())
    for i in range(len(vocab), first_special):
        vocab[f"\u0120unused{i}"] = i  # never produced: no merge leads to it
    data["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in sorted(specials.items(), key=lambda x: x[1])]
    assert max(specials.values()) < vocab_size
    return json.dumps(data, ensure_ascii=False)


def llama3_specials() -> dict[str, int]:
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    return {n: 128000 + i for i, n in enumerate(names)}


def qwen2_specials() -> dict[str, int]:
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return {n: 151643 + i for i, n in enumerate(names)}


QWEN2_VILA_JINJA = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant"
                    "<|im_end|>\\n' }}{% endif %}{% for message in messages if message['content'] is not none %}"
                    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_tokenizer(folder: Path, lay: ReleasedLayout) -> None:
    vocab = lay.llm["vocab_size"]
    if lay.tokenizer == "sentencepiece":
        (folder / "tokenizer.model").write_bytes(sentencepiece_model(vocab))
        atomic_write_json(folder / "tokenizer_config.json", {
            "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
            "eos_token": "</s>", "legacy": False, "model_max_length": lay.llm["model_max_length"],
            "pad_token": "<unk>", "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>", "use_default_system_prompt": False})
        atomic_write_json(folder / "special_tokens_map.json",
                          {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"})
        return
    if lay.tokenizer == "llama3":
        specials, bos, eos = llama3_specials(), "<|begin_of_text|>", "<|eot_id|>"
    elif lay.tokenizer == "qwen2":
        specials, bos, eos = qwen2_specials(), None, "<|im_end|>"
    else:
        raise ValueError(f"tokenizer kind {lay.tokenizer!r} unknown")
    (folder / "tokenizer.json").write_text(bpe_tokenizer_json(vocab, specials))
    cfg = {"bos_token": bos, "eos_token": eos, "model_max_length": lay.llm["model_max_length"],
           "tokenizer_class": "PreTrainedTokenizerFast" if lay.tokenizer == "llama3" else "Qwen2Tokenizer",
           "clean_up_tokenization_spaces": False}
    if lay.tokenizer == "qwen2":  # VILA's chat_templates/qwen2.jinja, stored with its indents and newlines cut
        cfg["chat_template"] = QWEN2_VILA_JINJA
    atomic_write_json(folder / "tokenizer_config.json", cfg)


def _random_tensors(meta_state: dict, seed: int, dtype):
    """(name, tensor) one at a time: Normal(0, 0.02) for matrices, ones for norm weights,
    zeros for other vectors — in the release's dtype, from the exact names and shapes
    transformers gives. One at a time, so an 8B replica never sits in memory whole."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name, t in meta_state.items():
        if "rotary" in name or name.endswith("position_ids"):
            continue
        vector = t.ndim < 2
        if vector and "norm" in name and name.endswith("weight"):
            val = torch.ones(t.shape)
        elif vector and name.endswith("bias") and not any(p in name for p in ("q_proj", "k_proj", "v_proj")):
            val = torch.zeros(t.shape)  # Qwen2's q/k/v biases are random, as trained ones are
        else:
            val = torch.randn(t.shape, generator=gen) * 0.02
        yield name, val.to(dtype).contiguous()


def _random_state(meta_state: dict, seed: int, dtype) -> dict:
    return dict(_random_tensors(meta_state, seed, dtype))


def _meta_state(model_cls, config) -> dict:
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    return model.state_dict()


def save_sharded(folder: Path, meta_state: dict, tensors, shards: int) -> None:
    """model-0000i-of-0000n.safetensors + model.safetensors.index.json, as HF writes them:
    shards planned from the shapes in `meta_state`, filled from the `tensors` stream."""
    from .modeling.weights import SafetensorsWriter

    def nbytes(t) -> int:
        return t.numel() * 2  # stored as bf16, as released (the meta tensors are float32)

    names = [n for n in meta_state if "rotary" not in n and not n.endswith("position_ids")]
    total = sum(nbytes(meta_state[n]) for n in names)
    per = total / max(shards, 1)
    file_of, size, n_files = {}, 0, 1
    for n in names:
        if size >= per * n_files and n_files < shards:
            n_files += 1
        file_of[n] = n_files
        size += nbytes(meta_state[n])
    fname = {i: "model.safetensors" if n_files == 1 else f"model-{i:05d}-of-{n_files:05d}.safetensors"
             for i in range(1, n_files + 1)}
    writer, cur, weight_map = None, 0, {}
    for name, t in tensors:
        if file_of[name] != cur:
            if writer is not None:
                writer.close()
            cur = file_of[name]
            writer = SafetensorsWriter(folder / fname[cur], {"format": "pt"})
        writer.add(name, t)
        weight_map[name] = fname[cur]
    if writer is not None:
        writer.close()
    if n_files > 1:
        atomic_write_json(folder / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})


def _hf_kwargs(cfg: dict) -> dict:
    """A released sub-config as transformers config kwargs (no private or architecture keys)."""
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}


def _write_random_weights(tmp: Path, lay: ReleasedLayout, top: dict, seed: int) -> None:
    """Random bf16 weights under the names and shapes transformers (LLM, SigLIP) and our
    projector give, written as the release stores them."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, \
        SiglipVisionModel

    from .config import ProjectorSpec
    from .modeling.projector import MultimodalProjector

    llm_cfg = top["llm_cfg"]
    llm_cls, cfg_cls = (LlamaForCausalLM, LlamaConfig) if llm_cfg["model_type"] == "llama" else \
        (Qwen2ForCausalLM, Qwen2Config)
    meta = _meta_state(llm_cls, cfg_cls(**_hf_kwargs(llm_cfg)))
    if llm_cfg.get("tie_word_embeddings"):
        meta.pop("lm_head.weight", None)
    save_sharded(tmp / "llm", meta, _random_tensors(meta, seed, torch.bfloat16), lay.llm_shards)
    vis = _random_state(_meta_state(SiglipVisionModel, SiglipVisionConfig(**_hf_kwargs(top["vision_tower_cfg"]))),
                        seed + 1, torch.bfloat16)
    # the releases were saved by transformers 4.x, whose SiglipVisionModel nests every
    # tensor under vision_model. (5.x holds them on the model itself)
    vis = {k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in vis.items()}
    save_file(vis, str(tmp / "vision_tower" / "model.safetensors"), metadata={"format": "pt"})
    with torch.device("meta"):
        proj = MultimodalProjector(ProjectorSpec(lay.projector_type, top["mm_hidden_size"], llm_cfg["hidden_size"]))
    save_file(_random_state(proj.state_dict(), seed + 2, torch.bfloat16),
              str(tmp / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})


def make_replica(out: str | Path, name: str = "VILA1.5-3b", *, llm_layers: int | None = 2,
                 vision_layers: int | None = 3, seed: int = 0, weights: bool = True) -> Path:
    """Write a random-weight replica of the released checkpoint `name` to `out`
    (weights=False: configs and tokenizer only, for tests of what is refused up front).
    llm_layers / vision_layers None: as many layers as the release has (full size)."""
    lay = get_layout(name)
    top = lay.config_json()
    if llm_layers is not None:
        top["llm_cfg"]["num_hidden_layers"] = llm_layers
    if vision_layers is not None:
        top["vision_tower_cfg"]["num_hidden_layers"] = vision_layers
    llm_layers = top["llm_cfg"]["num_hidden_layers"]
    llm_cfg = top["llm_cfg"]
    out = Path(out)
    with atomic_dir(out) as tmp:
        for sub in ("llm", "vision_tower", "mm_projector"):
            (tmp / sub).mkdir()
        if weights:
            _write_random_weights(tmp, lay, top, seed)
        atomic_write_json(tmp / "llm" / "config.json", llm_cfg)
        gen = {"bos_token_id": llm_cfg["bos_token_id"], "eos_token_id": llm_cfg["eos_token_id"],
               "pad_token_id": llm_cfg.get("pad_token_id"), "_from_model_config": True}
        atomic_write_json(tmp / "llm" / "generation_config.json", gen)
        write_tokenizer(tmp / "llm", lay)
        atomic_write_json(tmp / "vision_tower" / "config.json", top["vision_tower_cfg"])
        atomic_write_json(tmp / "vision_tower" / "preprocessor_config.json", lay.processor)
        atomic_write_json(tmp / "mm_projector" / "config.json", top["mm_projector_cfg"])
        atomic_write_json(tmp / "config.json", top)
    log.info("wrote a %d-layer replica of %s to %s", llm_layers, lay.repo, out)
    return out


def make_awq_replica(out: str | Path, name: str = "VILA1.5-3b", *, llm_layers: int = 2, vision_layers: int = 3,
                     group_size: int = 128, seed: int = 0) -> Path:
    """A replica of the official `<name>-AWQ` build: the float replica's vision tower and
    projector, and the LLM as one TinyChat state dict (`llm/<name>-w4-g128-awq-v2.pt`, fp16,
    llm-awq v2 packing) quantized round-to-nearest from the replica's random weights."""
    import torch

    from .modeling.llm import load_safetensors_dir
    from .quant.rtn import QuantConfig, quantize
    from .quant.tinychat import pack_linear_v2

    out = Path(out)
    with atomic_dir(out) as base:
        base.rmdir()  # make_replica writes it (atomically itself), then the LLM is swapped in place
        make_replica(base, name, llm_layers=llm_layers, vision_layers=vision_layers, seed=seed)
        q = QuantConfig(4, group_size, True)
        state = {}
        for key, t in load_safetensors_dir(base / "llm").items():
            if key.endswith("_proj.weight") and ".layers." in key:
                codes, s, z = quantize(t.float(), q)  # [N, K], [N, G], [N, G]
                packed = pack_linear_v2(codes.numpy(), s.numpy(), z.float().numpy(), group_size)
                state.update({f"{key[: -len('.weight')]}.{k}": torch.from_numpy(v) for k, v in packed.items()})
            else:
                state[key] = t.half()
        for f in (base / "llm").glob("model*.safetensors*"):
            f.unlink()
        tag = name.lower().replace("vila1.5", "vila-1.5")
        torch.save(state, str(base / "llm" / f"{tag}-w4-g{group_size}-awq-v2.pt"))
        top = json.loads((base / "config.json").read_text())
        top["_name_or_path"] = f"Efficient-Large-Model/{name}-AWQ"
        atomic_write_json(base / "config.json", top)
    return out
