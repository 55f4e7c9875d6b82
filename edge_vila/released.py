"""NVIDIA's released VILA-family checkpoints: the facts of their layouts (no torch).

Each entry records what the released `config.json` and sub-folders hold — LLM, vision
tower and projector configs, preprocessing mode, tokenizer kind, weight dtype and
sharding — so that tests can write faithful random-weight replicas
(`edge_vila.replicas`) and the toolchain can name what is supported.

Sources (public): VILA1.5-3B's and NVILA-8B's full `config.json` as TensorRT-LLM's VILA
tests hold them; the other entries change only what their base models differ in
(Llama-2-13B, Meta-Llama-3-8B-Instruct, Qwen2). Fields that our parser does not read are
kept where they are cheap to keep, so the parser is tested against the clutter a real
file carries.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

# Hugging Face PretrainedConfig boilerplate that the released (transformers 4.36) files carry
_HF_CLUTTER = {"add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None,
               "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
               "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False,
               "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None,
               "finetuning_task": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False, "is_encoder_decoder": False,
               "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
               "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
               "output_attentions": False, "output_hidden_states": False, "output_scores": False, "prefix": None,
               "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
               "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None, "suppress_tokens": None,
               "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False,
               "tie_encoder_decoder": False, "tokenizer_class": None, "top_k": 50, "top_p": 1.0,
               "torch_dtype": "bfloat16", "torchscript": False, "typical_p": 1.0, "use_bfloat16": False}

_SIGLIP_384 = {"_name_or_path": "./vision_tower", "architectures": ["SiglipVisionModel"], "attention_dropout": 0.0,
               "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "image_size": 384,
               "intermediate_size": 4304, "layer_norm_eps": 1e-06, "model_type": "siglip_vision_model",
               "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 27, "patch_size": 14}

_SIGLIP_PROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                     "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
                     "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098}

_PROJECTOR = {"_name_or_path": "./mm_projector", "architectures": ["MultimodalProjector"],
              "model_type": "v2l_projector", "tie_word_embeddings": True}

_LLAMA2_3B = {"_name_or_path": "./llm", "architectures": ["LlamaForCausalLM"], "attention_bias": False,
              "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
              "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 6912,
              "max_position_embeddings": 4096, "model_max_length": 4096, "model_type": "llama",
              "num_attention_heads": 20, "num_hidden_layers": 32, "num_key_value_heads": 20, "pad_token_id": 0,
              "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right",
              "use_cache": True, "vocab_size": 32000}

_TOP = {"architectures": ["LlavaLlamaModel"], "drop_path_rate": 0.0, "image_aspect_ratio": "resize",
        "interpolate_mode": "linear", "mm_projector_lr": None, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "cls_patch", "mm_vision_select_layer": -2,
        "model_dtype": "torch.bfloat16", "model_type": "llava_llama", "num_video_frames": 8, "resume_path": "./vlm",
        "s2": False, "s2_max_split_size": 336, "s2_scales": "336,672,1008", "transformers_version": "4.36.2",
        "tune_language_model": True, "tune_mm_projector": True, "tune_vision_tower": True, "vision_resolution": -1}


@dataclass(frozen=True)
class ReleasedLayout:
    """One released checkpoint's layout. `top` is config.json without the three sub-configs."""
    name: str                 # the Hugging Face repo name under Efficient-Large-Model
    llm: dict
    vision: dict
    projector_type: str
    top: dict
    processor: dict
    tokenizer: str            # sentencepiece (tokenizer.model only) | llama3 | qwen2 (tokenizer.json)
    template: str             # the conversation mode VILA uses for it
    llm_shards: int           # safetensors shards of llm/ in the release
    supported: bool = True
    note: str = ""

    @property
    def repo(self) -> str:
        return f"Efficient-Large-Model/{self.name}"

    def config_json(self) -> dict:
        """The top-level config.json as released (sub-configs nested, HF clutter included)."""
        llm = {**_HF_CLUTTER, **self.llm}
        vision = {**_HF_CLUTTER, **self.vision, "tie_word_embeddings": True}
        proj = {**_HF_CLUTTER, **_PROJECTOR, "mm_projector_type": self.projector_type}
        # a deep copy: callers edit the result, and the clutter's nested dicts are shared
        return copy.deepcopy({"_name_or_path": self.repo, **self.top, "hidden_size": self.llm["hidden_size"],
                              "mm_hidden_size": self.top.get("mm_hidden_size", self.vision["hidden_size"]),
                              "llm_cfg": llm, "vision_tower_cfg": vision, "mm_projector_cfg": proj})


def _layout(name: str, *, llm: dict | None = None, vision: dict | None = None, top: dict | None = None,
            projector: str = "mlp_downsample", **kw) -> ReleasedLayout:
    image = (vision or {}).get("image_size", 384)
    return ReleasedLayout(name=name, llm={**_LLAMA2_3B, **(llm or {})}, vision={**_SIGLIP_384, **(vision or {})},
                          projector_type=projector, top={**_TOP, **(top or {})},
                          processor={**_SIGLIP_PROCESSOR, "size": {"height": image, "width": image}}, **kw)


_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151645,
          "max_window_layers": 28, "model_type": "qwen2", "pad_token_id": None, "rms_norm_eps": 1e-06,
          "rope_theta": 1000000.0, "sliding_window": None, "use_sliding_window": False, "vocab_size": 151648,
          "max_position_embeddings": 32768, "model_max_length": 8192, "tokenizer_model_max_length": 8192,
          "pretraining_tp": None}
_NVILA_TOP = {"dynamic_s2": True, "fps": 0.0, "chat_template": None, "mm_use_im_patch_token": True,
              "num_time_tokens": 0, "s2_max_split_size": 448, "s2_resize_output_to_scale_idx": -1,
              "s2_scales": "448,896,1344", "soft_ce_std": 1.0, "time_token_format": "<t{t}>", "time_token_ids": [],
              "transformers_version": "4.46.0",
              # VILA's LlavaConfig writes its media encoders as JSON strings (BasicImageEncoder
              # appends the embedding of "\n" after every image or tile)
              "image_encoder": '{"_target_": "llava.model.encoders.BasicImageEncoder"}',
              "video_encoder": '{"_target_": "llava.model.encoders.TSPVideoEncoder"}'}

LAYOUTS: dict[str, ReleasedLayout] = {lay.name.lower(): lay for lay in (
    # Sheared-LLaMA-2.7B + SigLIP-so400m/14@384, 2x2 downsample: 27x27 patches -> 14x14 = 196 tokens
    _layout("VILA1.5-3b", tokenizer="sentencepiece", template="vicuna_v1", llm_shards=2),
    _layout("VILA1.5-13b", llm={"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                                "num_hidden_layers": 40, "num_key_value_heads": 40},
            tokenizer="sentencepiece", template="vicuna_v1", llm_shards=6),
    _layout("Llama-3-VILA1.5-8B", llm={"bos_token_id": 128000, "eos_token_id": 128001, "hidden_size": 4096,
                                       "intermediate_size": 14336, "max_position_embeddings": 8192,
                                       "model_max_length": 8192, "tokenizer_model_max_length": 8192,
                                       "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                                       "pad_token_id": None, "rope_theta": 500000.0, "vocab_size": 128256},
            tokenizer="llama3", template="llama_3", llm_shards=4),
    # Qwen2-1.5B + SigLIP-so400m/14@448 + 3x3 fold: 32x32 patches -> 11x11 = 121 tokens per tile;
    # `dynamic`: 1-12 tiles of 448 px on the grid nearest the aspect ratio, plus a thumbnail
    _layout("NVILA-Lite-2B", llm={**_QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
                                  "num_hidden_layers": 28, "num_key_value_heads": 2, "max_window_layers": 21,
                                  "tie_word_embeddings": True},
            vision={"image_size": 448}, projector="mlp_downsample_3x3_fix",
            top={**_NVILA_TOP, "dynamic_s2": False, "image_aspect_ratio": "dynamic", "mm_hidden_size": 1152},
            tokenizer="qwen2", template="chatml", llm_shards=1),
    # Qwen2-7B + SigLIP-so400m/14@448, dynamic_s2 at 448/896/1344 (3 x 1152 = 3456 channels) and
    # the 2x2 mlp_downsample: 32x32 patches -> 16x16 = 256 tokens per block, 9-12 blocks per image.
    # TensorRT-LLM's copy of the released config.json has no image_encoder field.
    _layout("NVILA-8B", llm={**_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                             "num_hidden_layers": 28, "num_key_value_heads": 4},
            vision={"image_size": 448, "num_image_tokens": 256, "projection_dim": 2048,
                    "projector_hidden_act": "gelu_fast", "vision_use_head": False},
            top={**{k: v for k, v in _NVILA_TOP.items() if k not in ("image_encoder", "video_encoder")},
                 "_attn_implementation_autoset": True, "image_aspect_ratio": "dynamic_s2", "mm_hidden_size": 3456},
            tokenizer="qwen2", template="chatml", llm_shards=4),
)}


def get_layout(name: str) -> ReleasedLayout:
    key = name.lower().removeprefix("efficient-large-model/")
    if key not in LAYOUTS:
        raise KeyError(f"released layout {name!r} unknown (known: {', '.join(v.name for v in LAYOUTS.values())})")
    return LAYOUTS[key]


# VILA picks the conversation mode from the model's name (llava/conversation.py's
# CONVERSATION_MODE_MAPPING); the released configs carry no chat_template of their own.
NAME_TEMPLATES = (("vila1.5-3b", "vicuna_v1"), ("vila1.5-8b", "llama_3"), ("vila1.5-13b", "vicuna_v1"),
                  ("vila1.5-40b", "hermes-2"), ("llama-3", "llama_3"), ("llama3", "llama_3"))


def template_for_name(name: str | None) -> str | None:
    """The template VILA chooses for a model name or path, or None when the name says nothing."""
    low = (name or "").lower()
    for key, template in NAME_TEMPLATES:
        if key in low:
            return template
    return None
