"""A random-weight Llama HF folder of a chosen size, for speed benchmarks (speed does not
depend on weight values). The tokenizer is SmolLM2's (from /tmp/smol or --tokenizer).

    python benchmarks/make_random_llama.py OUT --size 250m     # ~0.27B: hidden 1024, 16 layers, GQA 16/4
    python benchmarks/make_random_llama.py OUT --size 500m     # ~0.52B: hidden 1280, 24 layers, GQA 20/5
then, for the side-by-side decode benchmark:
    edge-vila quantize OUT --out OUT-q --method rtn --quantize-lm-head --no-eval
    edge-vila export OUT-q --out OUT-bundle --max-context 2048 --no-report
    python -m onnxruntime_genai.models.builder -i OUT -o OUT-genai -p int4 -e cpu
    python benchmarks/decode_speed.py --hf OUT --bundle OUT-bundle --genai OUT-genai
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SIZES = {"250m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=4),
         "500m": dict(hidden_size=1280, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=20,
                      num_key_value_heads=5)}


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=list(SIZES), default="250m")
    ap.add_argument("--tokenizer", type=Path, default=Path("/tmp/smol"), help="HF folder with tokenizer.json")
    a = ap.parse_args()
    if not (a.tokenizer / "tokenizer.json").is_file():  # a folder without one is of no use to any benchmark
        raise SystemExit(f"make_random_llama: {a.tokenizer / 'tokenizer.json'} not found; pass --tokenizer with "
                         "SmolLM2's HF folder (edge-vila convert-gguf DIR writes one)")
    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **SIZES[a.size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(a.out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (a.tokenizer / f).exists():
            shutil.copy(a.tokenizer / f, a.out / f)
    print(f"{a.out}: random Llama, {n / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
