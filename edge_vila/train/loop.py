"""The training loop: stages in order, a VILA checkpoint after each, resumable mid-stage,
DDP under torchrun (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from ..progress import tqdm

from ..fsutil import atomic_write_json
from ..prompt import IMAGE_PLACEHOLDER, TextTokenizer, get_template
from .checkpointing import load_resume, save_resume
from .config import RecipeConfig, StageConfig
from .data import RealData, collate, draw_samples
from .model import ClipObjective, TrainVLM, build_model, load_model
from ..synthetic.world import rng_for

log = logging.getLogger(__name__)

DEFAULT_TRAIN = {"clip": {"vision": 1.0}, "align": {"projector": 1.0},
                 "pretrain": {"projector": 1.0, "llm": 1.0}, "sft": {"projector": 1.0, "llm": 1.0}}
DEFAULT_MIX = {"clip": {"captions_hard": 1.0}, "align": {"captions": 1.0},
               "pretrain": {"interleaved": 0.5, "captions": 0.3, "text": 0.2},
               "sft": {"vqa": 0.75, "multi": 0.15, "text": 0.10}}


class Dist:
    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def lr_at(step: int, st: StageConfig) -> float:
    """Linear warmup, then cosine down to min_lr_ratio of the peak."""
    if step < st.warmup:
        return (step + 1) / st.warmup
    t = (step - st.warmup) / max(1, st.steps - st.warmup)
    return st.min_lr_ratio + (1 - st.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def param_groups(model: TrainVLM, clip: ClipObjective | None, st: StageConfig) -> list[dict]:
    """One group per (part, decay/no-decay); multiplier 0 freezes the part."""
    train = st.train or DEFAULT_TRAIN[st.kind]
    parts = dict(model.parts())
    if clip is not None:
        parts = {"vision": model.vision, "clip_head": _ClipHead(clip)}
        train = dict(train, clip_head=1.0)
    groups = []
    for name, mod in parts.items():
        mult = float(train.get(name, 0.0))
        for p in mod.parameters():
            p.requires_grad_(mult > 0)
        if mult <= 0:
            continue
        params = [p for p in mod.parameters()]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        for ps, wd in ((decay, st.weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": st.lr * mult, "weight_decay": wd, "mult": mult, "part": name})
    if not groups:
        raise ValueError(f"stage {st.kind}: nothing to train (all multipliers are 0)")
    return groups


class _ClipHead(torch.nn.Module):
    def __init__(self, clip: ClipObjective):
        super().__init__()
        for name, mod in clip.named_children():  # everything but the ViT, whatever the objective holds
            if name != "vision":
                setattr(self, name, mod)
        self.logit_scale = clip.logit_scale


def _clip_batch(samples, tok: TextTokenizer, pre):
    from ..preprocess import preprocess_images

    seqs = [tok.encode(s.text.replace(IMAGE_PLACEHOLDER + "\n", "")) + [tok.eos_id] for s in samples]
    L = max(map(len, seqs))
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    pixels = torch.from_numpy(preprocess_images([s.images[0] for s in samples], pre))
    return ids, torch.tensor([len(s) for s in seqs]), pixels


def _checksum(module: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


class Trainer:
    def __init__(self, recipe: RecipeConfig, out: Path):
        self.r, self.out = recipe, Path(out)
        self.d = Dist()
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        elif self.d.world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // self.d.world))
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(recipe.seed)
        self.tok_dir = self._tokenizer()
        self.tok = TextTokenizer(self.tok_dir)
        self.real = RealData(**recipe.data) if recipe.data else None
        self.metrics_path = self.out / "metrics.jsonl"

    def _tokenizer(self) -> Path:
        m = self.r.model
        if m.init:
            return Path(m.init) / "llm"
        if m.llm:
            return Path(m.llm)
        tdir = self.out / "tokenizer"
        if self.d.main and not (tdir / "tokenizer.json").exists():
            from ..testing import build_tokenizer
            from ..synthetic import textdata, world

            corpus = [world.make_question(world.rng_for(i)).question + " " + world.random_scene(world.rng_for(i, 1)).caption()
                      for i in range(400)] + textdata.vocabulary_corpus()
            corpus += ["first second yes no left right top bottom " + " ".join(world.COLORS) + " " + " ".join(world.SHAPES)]
            corpus += ["USER: ASSISTANT: USER: ASSISTANT:"] * 50  # the template's words as whole tokens
            tok = build_tokenizer(self.r.model.vocab_size, corpus)
            tmp = self.out / ".tokenizer.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tok.save_pretrained(str(tmp))
            os.replace(tmp, tdir)
        self.d.barrier()
        return tdir

    def stage_dir(self, i: int, st: StageConfig) -> Path:
        return self.out / f"stage{i}-{st.kind}"

    # ------------------------------------------------------------------------------
    def run(self) -> Path:
        stages = self.r.stages
        done = [i for i, st in enumerate(stages) if (self.stage_dir(i, st) / "config.json").is_file()]
        last_done = max(done) if done else -1
        if last_done >= 0:
            log.info("stages up to %d already done; continuing from %s", last_done, self.stage_dir(last_done, stages[last_done]))
            model = load_model(self.stage_dir(last_done, stages[last_done]), self.r.model.template)
        else:
            t = self.tok
            model = build_model(self.r.model, self.tok_dir, t.vocab_size, t.bos_id, t.eos_id, t.vocab.get("<pad>"))
        for i, st in enumerate(stages):
            if i <= last_done:
                continue
            self._run_stage(i, st, model)
            if self.d.main:
                model.save(self.stage_dir(i, st), self.tok_dir)
                shutil.rmtree(self.out / "_resume", ignore_errors=True)
                self.plot()
            self.d.barrier()
        return self.stage_dir(len(stages) - 1, stages[-1])

    def _run_stage(self, i: int, st: StageConfig, model: TrainVLM) -> None:
        clip = ClipObjective(model.vision, self.tok.vocab_size) if st.kind == "clip" else None
        module: torch.nn.Module = clip if clip is not None else model
        groups = param_groups(model, clip, st)
        model.frozen_vision_bf16 = _frozen_vision_bf16(self.r.frozen_vision_dtype)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)
        step = 0
        resume = self.out / "_resume"
        if (resume / "state.json").is_file():
            meta = json.loads((resume / "state.json").read_text())["meta"]
            if meta["stage"] == i:
                meta = load_resume(resume, module=_Both(model, clip), optimizer=opt)
                step = meta["step"]
                log.info("resuming stage %d (%s) at step %d", i, st.kind, step)
                if self.d.main:
                    self._truncate_metrics(i, step)
        wrapped = module
        if self.d.world > 1:
            wrapped = torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
        template = get_template(model.template)
        pre = _preprocess(model)
        tpi = model.projector.spec.num_tokens(_num_patches(model))
        mix = st.mix or (DEFAULT_MIX[st.kind] if st.kind != "sft" or self.r.text_blend
                         else {"vqa": 0.85, "multi": 0.15})
        if st.kind == "sft" and not self.r.text_blend:
            mix = {k: v for k, v in mix.items() if k != "text"}
        bar = tqdm(total=st.steps, initial=step, desc=f"stage {i} {st.kind}", disable=not self.d.main,
                   dynamic_ncols=True)
        module.train()
        t_last, n_last = time.perf_counter(), 0
        while step < st.steps:
            rng = rng_for(self.r.seed, i, step, self.d.rank)
            samples = draw_samples(mix, st.batch_size, rng, model.vision.model.config.image_size, self.real)
            if clip is not None:
                loss = wrapped(*_clip_batch(samples, self.tok, pre))
            else:
                b = collate(samples, self.tok, template, tpi, pre, self.r.model.max_position, pack=st.pack)
                loss = wrapped(b.ids, b.labels, b.pixels, b.positions, b.segments)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if st.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], st.grad_clip)
            scale = lr_at(step, st)
            for g in opt.param_groups:
                g["lr"] = st.lr * g["mult"] * scale
            opt.step()
            step += 1
            n_last += len(samples) * self.d.world
            bar.update(1)
            if step % st.log_every == 0 or step == st.steps:
                now = time.perf_counter()
                sps = n_last / max(now - t_last, 1e-9)
                t_last, n_last = now, 0
                lv = float(loss.detach())
                bar.set_postfix(loss=f"{lv:.3f}", samples_s=f"{sps:.0f}")
                if self.d.main:
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps({"stage": i, "kind": st.kind, "step": step, "loss": lv,
                                            "lr": st.lr * scale, "samples_per_s": sps, "time": time.time()}) + "\n")
            if step % st.save_every == 0 and step < st.steps and self.d.main:
                save_resume(resume, module=_Both(model, clip), optimizer=opt,
                            meta={"stage": i, "step": step, "kind": st.kind})
        bar.close()
        module.eval()
        self._check_sync(i, model)

    def _check_sync(self, i: int, model: TrainVLM) -> None:
        if self.d.world == 1:
            return
        mine = torch.tensor([_checksum(model)], dtype=torch.float64)
        allv = [torch.zeros_like(mine) for _ in range(self.d.world)]
        dist.all_gather(allv, mine)
        sums = [float(v) for v in allv]
        ok = max(sums) - min(sums) <= 1e-6 * max(1.0, abs(sums[0]))
        if self.d.main:
            path = self.out / "ddp_sync.json"
            prev = json.loads(path.read_text()) if path.exists() else []
            atomic_write_json(path, prev + [{"stage": i, "world": self.d.world, "checksums": sums, "in_sync": ok}])
        if not ok:
            raise RuntimeError(f"DDP ranks diverged after stage {i}: {sums}")

    def _truncate_metrics(self, stage: int, step: int) -> None:
        if not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and (json.loads(ln)["stage"], json.loads(ln)["step"]) <= (stage, step)]
        self.metrics_path.write_text("".join(k + "\n" for k in keep))

    def plot(self) -> Path | None:
        from .plots import plot_losses

        return plot_losses(self.metrics_path, self.out / "loss_curve.png")


class _Both(torch.nn.Module):
    """Model (+ the CLIP head in stage 0) as one state dict for resume files."""

    def __init__(self, model: TrainVLM, clip: ClipObjective | None):
        super().__init__()
        self.model = model
        if clip is not None:
            self.clip_head = _ClipHead(clip)


def _frozen_vision_bf16(setting: str) -> bool:
    if setting != "auto":
        return setting == "bf16"
    if torch.cuda.is_available():
        return True
    # bf16 without native support (AVX512-BF16 or AMX) is emulated and slower than float32
    cpu = getattr(torch, "cpu", None)
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def _preprocess(model: TrainVLM):
    from ..config import PreprocessSpec

    return PreprocessSpec.from_processor(model.processor, Path("processor"), model.aspect,
                                         model.vision.model.config.image_size)


def _num_patches(model: TrainVLM) -> int:
    c = model.vision.model.config
    n = (c.image_size // c.patch_size) ** 2
    return n + (1 if model.vision.has_cls and model.vision.select_feature == "cls_patch" else 0)


def train(recipe: RecipeConfig, out: Path) -> Path:
    return Trainer(recipe, out).run()
