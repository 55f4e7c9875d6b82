"""Tiny random-weight checkpoints in the exact VILA layout, built in seconds.

Used by the tests and the quickstart, and as the starting point of the `tiny` training
recipe. Everything is deterministic given the seed (weights, tokenizer).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                  "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

_WORDS = {
    "colors": "red green blue yellow purple orange white black gray pink cyan brown".split(),
    "shapes": "square circle triangle squares circles triangles shape shapes".split(),
    "where": "left right top bottom middle center above below".split(),
    "numbers": "zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9".split(),
}
_SENTENCES = [
    "There is a {c} {s} on the {w}.", "How many {s} are there? {n}.", "What color is the {s}? {c}.",
    "Is there a {c} {s} in the image? Yes.", "Is there a {c} {s} in the image? No.",
    "Where is the {c} {s}? It is on the {w}.", "Which image has more {s}? The first image.",
    "Describe the image. A {c} {s} and a {c} {s} on a {c} background.",
    "The quick brown fox jumps over the lazy dog.", "A chat between a curious user and an assistant.",
    "USER: ASSISTANT: Answer the question with a single word or phrase.",
]


def default_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the synthetic world's words plus plain English."""
    out = []
    combos = itertools.product(_WORDS["colors"], _WORDS["shapes"], _WORDS["where"], _WORDS["numbers"][:6])
    for i, (c, s, w, n) in enumerate(combos):
        if i % 7:
            continue
        out.append(_SENTENCES[i % len(_SENTENCES)].format(c=c, s=s, w=w, n=n))
    out += [" ".join(v) for v in _WORDS.values()]
    return out


def build_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """Byte-level BPE (any text encodes) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus or default_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


@dataclass
class TinySpec:
    llm: str = "llama"  # llama | qwen2
    vision: str = "siglip"  # siglip | clip
    projector: str = "mlp_downsample"
    template: str = "vicuna_v1"
    image_size: int = 32
    patch_size: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 0  # 0: twice vision_hidden
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    intermediate: int = 128
    vocab_size: int = 512
    max_position: int = 1024
    select_layer: int = -2
    select_feature: str = "cls_patch"
    aspect: str = "resize"
    seed: int = 0


def build_models(spec: TinySpec):
    """Random-weight (llm, tokenizer, vision, processor_dict, projector) per the spec."""
    import torch
    from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel)

    from .config import ProjectorSpec
    from .modeling.projector import MultimodalProjector

    torch.manual_seed(spec.seed)
    tok = build_tokenizer(spec.vocab_size)
    common = dict(vocab_size=len(tok), hidden_size=spec.llm_hidden, intermediate_size=spec.intermediate,
                  num_hidden_layers=spec.llm_layers, num_attention_heads=spec.llm_heads,
                  num_key_value_heads=spec.llm_kv_heads, max_position_embeddings=spec.max_position,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=False)
    if spec.llm == "llama":
        llm = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0))
    elif spec.llm == "qwen2":
        llm = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1000000.0))
    else:
        raise ValueError(f"tiny llm must be llama or qwen2, got {spec.llm!r}")
    vkw = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
               num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
               patch_size=spec.patch_size)
    if spec.vision == "siglip":
        vision = SiglipVisionModel(SiglipVisionConfig(**vkw))
        proc = {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                "size": {"height": spec.image_size, "width": spec.image_size}, "resample": 3,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    elif spec.vision == "clip":
        vision = CLIPVisionModel(CLIPVisionConfig(**vkw, projection_dim=spec.vision_hidden))
        proc = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                "size": {"shortest_edge": spec.image_size}, "do_center_crop": True,
                "crop_size": {"height": spec.image_size, "width": spec.image_size}, "resample": 3,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    else:
        raise ValueError(f"tiny vision must be siglip or clip, got {spec.vision!r}")
    projector = MultimodalProjector(ProjectorSpec(spec.projector, spec.vision_hidden, spec.llm_hidden))
    return llm.eval(), tok, vision.eval(), proc, projector.eval()


def make_tiny_checkpoint(out: str | Path, spec: TinySpec | None = None, **overrides) -> Path:
    """Write a random-weight VILA checkpoint to `out` (seconds on a laptop CPU)."""
    from .checkpoint import write_checkpoint

    spec = dataclasses.replace(spec or TinySpec(), **overrides)
    llm, tok, vision, proc, projector = build_models(spec)
    return write_checkpoint(Path(out), llm_config=llm.config.to_dict(), llm_state=llm.state_dict(), tokenizer=tok,
                            vision=vision, image_processor=proc,
                            projector=projector, select_layer=spec.select_layer,
                            select_feature=spec.select_feature, aspect=spec.aspect, chat_template=spec.template)


class MJPEGServer:
    """An MJPEG-over-HTTP camera on loopback (what many IP cameras serve), for tests and
    soak benchmarks of network sources; `frame_fn(i) -> HxWx3 uint8` picks the pictures.
    `drop()` closes every open stream and refuses new ones until `resume()`, which is how
    a camera that loses its link looks to a client; `stall()` keeps the connections open but
    sends nothing until `resume()` (a hung camera); `garbage_every=N` sends random bytes in
    place of every Nth JPEG (a corrupting link)."""

    def __init__(self, fps: float = 30.0, size: tuple[int, int] = (64, 48), host: str = "127.0.0.1",
                 frame_fn=None, garbage_every: int = 0):
        import http.server
        import io
        import socketserver
        import threading
        import time

        import numpy as np
        from PIL import Image

        self.up = threading.Event()
        self.up.set()
        self.flowing = threading.Event()
        self.flowing.set()
        self.sent = 0
        noise = np.random.default_rng(0)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                if not server.up.is_set():
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                w, h = size
                try:
                    while server.up.is_set():
                        if not server.flowing.is_set():
                            time.sleep(0.02)
                            continue
                        v = server.sent % 200
                        img = frame_fn(server.sent) if frame_fn else np.full((h, w, 3), v, np.uint8)
                        buf = io.BytesIO()
                        Image.fromarray(img).save(buf, "JPEG", quality=95)
                        data = buf.getvalue()
                        if garbage_every and server.sent % garbage_every == garbage_every - 1:
                            data = noise.integers(0, 256, len(data), dtype=np.uint8).tobytes()
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(data) + data + b"\r\n")
                        server.sent += 1
                        time.sleep(1 / fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._srv = socketserver.ThreadingTCPServer((host, 0), Handler)
        self._srv.daemon_threads = True
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://{host}:{self._srv.server_address[1]}/stream.mjpg"

    def drop(self) -> None:
        self.up.clear()

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.up.set()
        self.flowing.set()

    def close(self) -> None:
        self.up.clear()
        self._srv.shutdown()
        self._srv.server_close()


def wait_healthy(url: str, proc, tries: int = 600) -> bool:
    """Poll `url`/health until the server answers 200 (True) or `proc` exits (False); waits
    at most `tries` × 0.1 s. For tests and benchmarks that start `edge-vila serve`."""
    import time

    import httpx

    for _ in range(tries):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.1)
        if proc.poll() is not None:
            return False
    return False


def free_port() -> int:
    """A loopback TCP port nothing listens on (for a server a test or benchmark starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bomb_png(w: int = 60000, h: int = 60000) -> bytes:
    """A valid PNG header claiming w x h 8-bit RGB pixels, with a few bytes of data: decoding
    it would need w*h*3 bytes (10 GB at the default), reading its header needs none."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
