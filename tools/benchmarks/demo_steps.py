"""Where the demo build's time goes (not a test): one training step of each heavy stage, profiled.

The one command (``python -m rtrt.tools.demo.build``) spends most of its time in three loops: the VLM's
stage 0b (the language model on 196-slot pseudo-images), its stage 1 (the CLIP tower on patch labels)
and the VFM (DINOv3 on 224-px crops). This builds each model at a preset's sizes with random weights
(nothing is downloaded or read), times a few steps of forward, backward, gradient clipping and AdamW,
and splits one step by PyTorch's profiler into matrix products, attention, convolution and the rest.
Beside them, a 4096-cube single-precision matrix product gives the cores' practical peak, so a step
whose matrix products run near it is bound by arithmetic, not by waste::

    python -m rtrt.tools.benchmarks.demo_steps                  # the full preset, every CPU
    python -m rtrt.tools.benchmarks.demo_steps --threads 1 --json steps.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Sequence

__all__ = ["stage0b_step", "stage1_step", "vfm_step", "profile_step", "sgemm_gflops", "parse_args", "main"]

# Profiler op names per kind (CPU kernels of PyTorch 2.x).
KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward"),
}


def _update(loss, opt, clipped) -> None:
    """The demo trainers' update: backward, gradients clipped to norm 1, AdamW."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(clipped, 1.0)
    opt.step()


def stage0b_step(plan, batch: int | None = None, seq: int = 260, answer: int = 20) -> Callable[[], None]:
    """A stage-0b step: the preset's Llama on ``batch`` sequences of ``seq`` input embeddings, loss on the last ``answer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rtrt.tools.demo.vlm import VLMConfig

    cfg = VLMConfig(**plan.vlm)
    batch = batch or cfg.batch_size
    m = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden,
                                     intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
                                     num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_heads,
                                     max_position_embeddings=max(cfg.max_positions, seq)))
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    emb = torch.randn(batch, seq, cfg.text_hidden)
    labels = torch.full((batch, seq), -100)
    labels[:, -answer:] = torch.randint(0, cfg.vocab_size, (batch, answer))
    mask = torch.ones(batch, seq, dtype=torch.long)

    def step() -> None:
        _update(m(inputs_embeds=emb, attention_mask=mask, labels=labels).loss, opt, m.parameters())
    return step


def stage1_step(plan, batch: int | None = None) -> Callable[[], None]:
    """A stage-1 step: the preset's CLIP tower on ``batch`` uint8 images, a patch-class and a red-box head."""
    import torch
    import torch.nn.functional as F
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from rtrt.tools.demo.vlm import VLMConfig
    from rtrt.trainer.coda import CATEGORIES

    cfg = VLMConfig(**plan.vlm)
    batch = batch or cfg.tag_batch_size
    classes = 1 + len(CATEGORIES)  # background and every CODA-LM category, as stage 1's patch head
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                                             num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                                             image_size=cfg.image_size, patch_size=cfg.patch_size,
                                             projection_dim=cfg.vision_hidden))
    tower.train()
    grid = cfg.image_size // cfg.patch_size
    head, box = torch.nn.Linear(cfg.vision_hidden, classes), torch.nn.Linear(cfg.vision_hidden, 1)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters(), *box.parameters()], lr=1e-3)
    pixels = torch.randint(0, 256, (batch, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    labels = torch.randint(0, classes, (batch * grid * grid,))

    def step() -> None:
        x = pixels.to(torch.float32, copy=True).div_(255.0).sub_(0.5).div_(0.25)
        h = tower(x, output_hidden_states=True).hidden_states[-1][:, 1:]
        loss = F.cross_entropy(head(h).flatten(0, 1), labels) + \
            F.binary_cross_entropy_with_logits(box(h).squeeze(-1), torch.zeros(batch, grid * grid))
        _update(loss, opt, tower.parameters())
    return step


def vfm_step(plan, batch: int | None = None) -> Callable[[], None]:
    """A VFM step: the preset's timm DINOv3 on ``batch`` training crops, a per-patch classifier."""
    import torch
    import torch.nn.functional as F

    from rtrt.runtime.vfm import create_timm_vfm
    from rtrt.tools.demo.vfm import VFMConfig
    from rtrt.tools.demo.world import WORLD_CATEGORIES

    cfg = VFMConfig(**plan.vfm)
    classes = 1 + len(WORLD_CATEGORIES)  # background and the world's categories, as the VFM's patch head
    batch = batch or cfg.batch_size
    m = create_timm_vfm(cfg.arch, cfg.image_size, **cfg.kwargs)
    m.train()
    prefix = int(m.num_prefix_tokens)
    head = torch.nn.Linear(cfg.embed_dim, classes)
    opt = torch.optim.AdamW([*m.parameters(), *head.parameters()], lr=1e-3)
    x = torch.randn(batch, 3, cfg.train_crop, cfg.train_crop)
    y = torch.randint(0, classes, (batch * (cfg.train_crop // 16) ** 2,))

    def step() -> None:
        _update(F.cross_entropy(head(m.forward_features(x)[:, prefix:]).flatten(0, 1), y), opt, m.parameters())
    return step


def profile_step(step: Callable[[], None], warmup: int = 2, timed: int = 5) -> dict:
    """Milliseconds per step (mean of ``timed`` after ``warmup``), and one step's time by kind (%) with
    the matrix products' rate (GFLOP/s, from the profiler's FLOP counts)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(timed):
        step()
    ms = (time.perf_counter() - t) * 1000 / timed
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    shares, mm_us, mm_flops = {}, 0.0, 0.0
    for kind, names in KINDS.items():
        us = sum(e.self_cpu_time_total for e in events if e.key in names)
        shares[kind] = round(100 * us / total, 1)
        if kind == "matmul":
            mm_us, mm_flops = us, sum(e.flops or 0 for e in events if e.key in names)
    shares["other"] = round(100 - sum(shares.values()), 1)
    return {"ms_per_step": round(ms, 1), "share_pct": shares,
            "matmul_gflops": round(mm_flops / mm_us / 1e3, 1) if mm_us and mm_flops else None}


def sgemm_gflops(n: int = 4096, reps: int = 5) -> float:
    """GFLOP/s of an ``n``-cube float32 matrix product on this process's threads (the practical peak)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return round(2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9, 1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rtrt.tools.benchmarks.demo_steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="full", help="the build preset whose sizes to use (default: full)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, every core)")
    p.add_argument("--stage", dest="stages", choices=("stage0b", "stage1", "vfm"), action="append", default=None,
                   help="repeatable (default: all three)")
    p.add_argument("--sgemm-size", type=int, default=4096, help="side of the peak-rate matrix product (default: 4096)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from rtrt.runtime.machine import machine_info
    from rtrt.tools.demo.presets import PRESETS

    args = parse_args(argv)
    if args.preset not in PRESETS:
        print(f"rtrt demo steps: error: unknown preset {args.preset!r} (one of {', '.join(PRESETS)})", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("rtrt demo steps: error: --threads must be 1 or more", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plan = PRESETS[args.preset]
    makers = {"stage0b": stage0b_step, "stage1": stage1_step, "vfm": vfm_step}
    out = {"preset": args.preset, "threads": torch.get_num_threads(), "machine": machine_info(),
           "sgemm_size": args.sgemm_size, "sgemm_gflops": sgemm_gflops(args.sgemm_size), "steps": {}}
    print(f"{args.preset} preset, {out['threads']} threads; {args.sgemm_size}-cube sgemm: {out['sgemm_gflops']} GFLOP/s")
    for name in args.stages or list(makers):
        r = out["steps"][name] = profile_step(makers[name](plan))
        s = r["share_pct"]
        print(f"{name:8s} {r['ms_per_step']:8.1f} ms/step  matmul {s['matmul']:5.1f}% at {r['matmul_gflops']} GFLOP/s, "
              f"attention {s['attention']:5.1f}%, convolution {s['convolution']:5.1f}%, other {s['other']:5.1f}%")
    if args.json:
        from rtrt.runtime.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
