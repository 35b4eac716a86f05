"""Phase 2, ``rtrt train adapter``: the cross-attention adapter, trained through the frozen VLM.

The VLM's visual tokens V go through the adapter (queries V, keys and values W from the phase-1
bundle) and the refined tokens enter the first decoder layer at the image positions, through the
runtime's own ``VLMFamily.forward`` (the path inference uses, not a copy). Each QA pair of the
CODA-LM task files is one sample: the family's chat template renders the question as at inference
and the reference answer as the assistant turn that follows it.

With ``hints="detector"`` (our addition; the paper trains without) every training prompt carries
the hint sentence of the phase-1 bundle's own detector for that image (calibrated, if the phase-1
bundle is), as ``rtrt infer`` with both remedies puts it, so the adapter learns in the configuration
it runs in; ``hint_share`` < 1 keeps it in a seeded share of the prompts only.

Loss = autoregressive cross-entropy on the answer tokens (prompt and padding ignored)
     + ``w_reconstruction`` * distance between refined and original visual tokens
     [+ ``attn_prior`` * attention prior].

The reconstruction distance (``recon``) is the mean squared difference over every element
(``"absolute"``, the paper), or, per token, the squared distance over the token's own squared norm,
averaged over tokens (``"relative"``, our addition): visual tokens differ in norm by 3x and more (on
the demo VLM background tokens are about 148, tokens on objects 41-67), so an absolute distance lets
the large background tokens set the scale and makes a change to a small object token costly.

The attention prior (``attn_prior > 0``; our addition, off by default) pulls the adapter's
attention over the rows of W toward what the phase-1 detector sees at each patch: at every image
token, KL(softmax(similarity / ``attn_prior_temperature``) || head-averaged attention), where
similarity is the detector's per-patch cosine to each row of W, sampled at the token's cell centre
(computed once per image before training). It needs a VLM with a fixed image-token grid (LLaVA).

Detector-guided attention (``detector_bias``; our addition, off by default, ablated in the README): the
adapter's attention logits over W's rows get + a learned scale times the phase-1 detector's calibrated
z-score of each class at the token's cell (``rtrt.runtime.refine_mask.token_bias``), the input
``class_bias`` the runtime computes the same way. Visual tokens of rare objects are what the VLM is
blind to, so on their own they pick W's row poorly (the demo's adapter: 16% on the object's own row,
chance 7%); the detector, which reads the VFM that has seen every class, says which row, and the
adapter still learns what to write. Region questions (``region_box``; our addition): the adapter's
change only at the cells of the asked box, the detector run on the frame without the red box, and
with ``detector_bias`` every token's bias the box cells' mean z, as ``Pipeline.batch(regions=)`` runs
them; the box is read from the annotation the boxed image was drawn from (``coda.region_box``).
Both need LLaVA's fixed image-token grid.

Only the adapter learns: every VLM parameter has ``requires_grad=False`` and stays bit-identical;
W is a constant here. ``--bf16`` loads the VLM in bfloat16 and runs it under autocast, and
``--grad-checkpointing`` recomputes its decoder layers in backward: with both, a 7B-class VLM
trains the adapter on one 24 GB GPU.

The output is a new bundle (written atomically): the phase-1 files (W, projections, detector,
a carried VFM) plus ``adapter.safetensors``, the ``VLMSpec`` and the provenance of both phases.
Exports of the input bundle are not carried over; export the new bundle again.

    rtrt train adapter --bundle bundles/phase1 --vlm llava-hf/llava-1.5-7b-hf \\
        --tasks data/CODA-LM/Train/vqa_anno --images data --bf16 --grad-checkpointing --out bundles/full
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rtrt.runtime.bundle import VLMSpec, load_bundle, split_pinned, write_bundle
from rtrt.runtime.errors import ImageError, InputError, ModelMismatchError
from rtrt.runtime.exports import Exports
from rtrt.runtime.image import load_image
from rtrt.runtime.modules import CrossAttentionAdapter
from rtrt.runtime.refine_mask import cell_centres, hot_cells, processor_geometry
from rtrt.runtime.refine_mask import sample_cells as _sample_cells

from . import loop

__all__ = ["AdapterTrainConfig", "QAPair", "read_qa_pairs", "answer_token_ids", "append_answers", "reconstruction_loss",
           "llava_cell_centres", "attention_prior", "prior_kl", "train_adapter"]

TASK_NAMES = ("general_perception", "region_perception", "driving_suggestion")
HINT_MODES = ("none", "detector")
RECON_MODES = ("absolute", "relative")


@dataclass
class AdapterTrainConfig:
    """Phase-2 settings; saved as config.json beside every checkpoint and in the bundle's manifest.training."""

    bundle: str  # phase-1 bundle holding W
    vlm: str  # the frozen VLM: local directory or hub id
    tasks: str  # directory of the CODA-LM task files (<task>.jsonl or .json)
    images: str  # dataset root the task files' image paths are relative to
    out: str  # bundle directory to write
    task_names: list[str] = field(default_factory=list)  # task files to use; empty = every one present
    width: int = 512  # adapter attention width
    heads: int = 8  # adapter attention heads
    null_slot: bool = False  # a learned key with a zero value beside W's rows: a token may attend to nothing (not in the paper)
    slot_value: bool = False  # with null_slot: the slot's value is learned too, a write that depends on no class (not in the paper)
    w_reconstruction: float = 1.0  # weight of the reconstruction loss (refined tokens stay near the originals)
    recon: str = "absolute"  # reconstruction distance: "absolute", mean squared difference (the paper); "relative", per token ||refined - V||^2 / ||V||^2, mean
    attn_prior: float = 0.0  # weight of KL(softmax(detector similarity / temperature) || adapter attention) per image token (0: off; LLaVA only)
    w_keep: float = 0.0  # weight of the relative reconstruction over tokens where the calibrated detector finds no rare class (0: off; LLaVA only)
    detector_bias: bool = False  # attention logits + learned scale * the calibrated detector's z per class at each token (not in the paper; LLaVA only)
    region_box: bool = False  # region questions: the change only in the asked box, the detector on the frame (box mean z with detector_bias; LLaVA only)
    refine_mask_z: float | None = None  # train as Pipeline.refine_mask_z infers: the adapter's change only at the cells where a class's calibrated z exceeds it (None: every token; LLaVA only)
    keep_z: float | None = None  # with w_keep: a cell holds a rare class when its z-score exceeds this (None: the detector's z_threshold)
    attn_prior_temperature: float = 0.05  # temperature of the softmax over the detector's per-patch cosines in the attention prior
    hints: str = "none"  # "none": prompts as in the task files (the paper); "detector": with the bundle detector's hint sentence
    hint_share: float = 1.0  # with hints="detector": the share of QA pairs (a seeded draw) whose prompt carries it; the rest train without
    max_answer_tokens: int = 256  # answers are cut to this many tokens
    epochs: int = 10  # passes over the QA pairs (the paper trains 10)
    batch_size: int = 8  # global batch (QA pairs per step over all processes)
    lr: float = 1e-4  # peak AdamW learning rate (cosine decay to lr/10)
    warmup_steps: int = 0  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay of the adapter
    bf16: bool = False  # VLM weights in bfloat16 and its forward under bfloat16 autocast
    grad_checkpointing: bool = False  # recompute the VLM's decoder layers in backward
    cache_visual_tokens: bool = False  # keep each image's visual tokens (frozen tower + projector) after its first step instead of recomputing them every epoch (memory: images x tokens x hidden)
    carry_vlm: bool = False  # copy the VLM directory into the bundle (vlm/) instead of referencing it
    seed: int = 0  # seeds the adapter's initialisation and every epoch's order
    device: str = "auto"  # auto, cpu or cuda
    skip_bad: bool = False  # skip QA pairs whose image is missing or unreadable (reported) instead of failing
    resume: bool = False  # continue from <out>.ckpt/ when it holds a checkpoint of the same settings
    overwrite: bool = False  # replace an existing --out (also needed when --out is --bundle)


RESUME_FREE = ("resume", "overwrite", "device", "cache_visual_tokens")


@dataclass
class QAPair:
    """One training sample."""

    image: str  # image path (the region task's images already show the red box)
    question: str  # question text as in the task file
    answer: str  # reference answer


def read_qa_pairs(tasks: str | os.PathLike, images: str | os.PathLike, names: Sequence[str]) -> tuple[list[QAPair], list[str]]:
    """QA pairs of the chosen task files (all present when ``names`` is empty), and the tasks read."""
    from .coda import read_tasks, task_file

    chosen = list(names)
    if not chosen:
        chosen = [t for t in TASK_NAMES if any((Path(tasks) / f"{t}{s}").is_file() for s in (".jsonl", ".json"))]
        if not chosen:
            raise InputError(f"{tasks}: no CODA-LM task files ({', '.join(TASK_NAMES)})")
    pairs = []
    for name in chosen:
        path = task_file(tasks, name)
        for rec in read_tasks(path):
            if rec.answer is None or not rec.answer.strip():
                raise InputError(f"{path}: question {rec.question_id} has no answer to train on")
            pairs.append(QAPair(str(Path(images) / rec.image), rec.question, rec.answer))
    if not pairs:
        raise InputError(f"{tasks}: the task files hold no QA pairs")
    return pairs, chosen


def answer_token_ids(vlm, question: str, answer: str, max_tokens: int) -> list[int]:
    """Token ids of the assistant turn that answers ``question`` with ``answer``, as the family's chat template writes it.

    The template renders the conversation with and without the answer; the difference (the answer
    and the template's end-of-turn) is the target. An end-of-sequence token is appended when the
    template writes none, so the model learns to stop.
    """
    processor = vlm.processor
    tokenizer = processor.tokenizer
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vlm.user_text(question)}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(
        user + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ModelMismatchError(f"the chat template of {vlm.name} does not continue its prompt with the answer")
    ids = tokenizer(full[len(prompt):].rstrip(), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids[:max_tokens]


def append_answers(batch, answers: Sequence[Sequence[int]], pad_id: int) -> tuple[dict[str, Any], torch.Tensor]:
    """The prompt batch (left-padded) followed by the answers (right-padded), and the labels.

    Labels are -100 on the prompt and the padding, the answer ids elsewhere. Other per-token
    inputs of the processor (e.g. Qwen's ``mm_token_type_ids``) are dropped: the families rebuild
    what they need from ``input_ids``.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, s = ids.shape
    longest = max(len(a) for a in answers)
    ans = torch.full((b, longest), pad_id, dtype=ids.dtype, device=ids.device)
    amask = torch.zeros(b, longest, dtype=mask.dtype, device=mask.device)
    for i, a in enumerate(answers):
        ans[i, :len(a)] = torch.tensor(list(a), dtype=ids.dtype)
        amask[i, :len(a)] = 1
    out = {k: v for k, v in batch.items() if not (torch.is_tensor(v) and tuple(v.shape) == (b, s))}
    out["input_ids"] = torch.cat([ids, ans], dim=1)
    out["attention_mask"] = torch.cat([mask, amask], dim=1)
    labels = torch.full_like(out["input_ids"], -100)
    labels[:, s:] = ans.masked_fill(amask == 0, -100)
    return out, labels


def reconstruction_loss(refined: torch.Tensor, tokens: torch.Tensor, mode: str) -> torch.Tensor:
    """Distance of refined visual tokens [T, D] from the originals: ``absolute``, the mean squared difference
    of every element; ``relative``, each token's squared distance over its own squared norm, mean over tokens."""
    if mode == "absolute":
        return F.mse_loss(refined.float(), tokens.float())
    v = tokens.float()
    return ((refined.float() - v).pow(2).sum(-1) / v.pow(2).sum(-1).clamp(min=1e-12)).mean()


def llava_cell_centres(image_size: tuple[int, int], grid: int, image_processor) -> torch.Tensor:
    """``[grid * grid, 2]``: (x, y) in input-image pixels of the centre of each LLaVA image-token cell, row-major
    (``rtrt.runtime.refine_mask.cell_centres`` through the CLIP processor's resize and centre crop)."""
    return torch.from_numpy(cell_centres(image_size, grid, processor_geometry(image_processor))).float()


def sample_cells(similarity, image_size: tuple[int, int], centres: torch.Tensor) -> torch.Tensor:
    """``[N, C]``: the detector's similarity [C, gh, gw] sampled bilinearly at the N token-cell ``centres``
    (input pixels), as ``rtrt.runtime.refine_mask.sample_cells``."""
    return torch.from_numpy(_sample_cells(similarity, image_size, torch.as_tensor(centres).double().numpy()))


def keep_cells(cells: torch.Tensor, detector, z: float | None = None) -> torch.Tensor:
    """``[N]`` bool: the token cells where the detector's decision, applied to each cell's own similarity
    ``cells`` [N, C], reports no class (the complement of ``rtrt.runtime.refine_mask.hot_cells``)."""
    return torch.from_numpy(~hot_cells(torch.as_tensor(cells).double().numpy(), detector, z))


def masked_reconstruction(refined: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Relative reconstruction (each token's squared distance over its squared norm) averaged over the tokens
    ``keep`` [T] marks; 0 when it marks none."""
    v = tokens.float()
    rel = (refined.float() - v).pow(2).sum(-1) / v.pow(2).sum(-1).clamp(min=1e-12)
    k = keep.to(rel.dtype)
    return (rel * k).sum() / k.sum().clamp(min=1.0)


def attention_prior(similarity, image_size: tuple[int, int], centres: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[N, C]``: softmax over classes of the detector's similarity [C, gh, gw] (over the whole image, as
    the VFM sees it), sampled bilinearly at the N token-cell ``centres`` (input pixels), over ``temperature``."""
    return torch.softmax(sample_cells(similarity, image_size, centres) / temperature, dim=-1)


def prior_kl(target: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(target || attention), both [N, C] distributions over the rows of W."""
    t = target.float()
    return (t * (t.clamp(min=1e-12).log() - attention.float().clamp(min=1e-12).log())).sum(-1).mean()


def _check_images(pairs: list[QAPair], d: loop.Dist, skip_bad: bool) -> tuple[list[QAPair], list[str]]:
    """Decode every image once (each rank a share) before training; bad ones fail the run or are skipped."""
    paths = sorted({p.image for p in pairs})
    bad: dict[str, str] = {}
    for path in paths[d.rank::d.world_size]:
        try:
            load_image(path)
        except ImageError as e:
            bad[path] = str(e)
    if d.distributed:
        import torch.distributed as torch_dist

        gathered: list[dict[str, str]] = [{} for _ in range(d.world_size)]
        torch_dist.all_gather_object(gathered, bad)
        bad = {k: v for g in gathered for k, v in g.items()}
    if bad and not skip_bad:
        first = sorted(bad)[0]
        more = f" (and {len(bad) - 1} more bad images; --skip-bad skips them)" if len(bad) > 1 else " (--skip-bad skips it)"
        raise ImageError(bad[first] + more)
    return [p for p in pairs if p.image not in bad], [bad[k] for k in sorted(bad)]


def train_adapter(cfg: AdapterTrainConfig) -> Path:
    """Run phase 2 as configured (one process or a torchrun rank) and return the written bundle's path."""
    if Path(cfg.out).resolve() == Path(cfg.bundle).resolve() and not cfg.overwrite:
        raise InputError(f"{cfg.out}: --out is the input bundle; pass --overwrite to replace it")
    out = loop.check_output(cfg.out, cfg.overwrite)
    d = loop.setup(cfg.device)
    try:
        return _train(cfg, out, d)
    finally:
        loop.teardown(d)


def _detector_hints(source, pairs: list[QAPair], d: loop.Dist) -> list[list[str]]:
    """The class names the bundle's detector puts into the prompt for each pair's image (each image once),
    through the runtime's own ``Pipeline.detect``."""
    from tqdm import tqdm

    from rtrt.runtime.backends import make_backend
    from rtrt.runtime.pipeline import Pipeline

    m = source.manifest
    if m.detector is None or m.vfm is None:
        raise InputError(f"{source.root}: --hints detector needs a bundle with a detector and its VFM (phase 1 writes both)")
    pipe = Pipeline(source, make_backend("torch", source, device=str(d.device)), device=str(d.device))
    found: dict[str, list[str]] = {}
    for p in tqdm(pairs, desc="detector hints", disable=not d.is_main, leave=False):
        if p.image not in found:
            found[p.image] = [x.name for x in pipe.detect(load_image(p.image)).detections]
    return [found[p.image] for p in pairs]


@dataclass
class DetectorInputs:
    """What the phase-1 detector gives phase 2, per image (each once), through the runtime's own code."""

    cells: dict[str, torch.Tensor]  # [grid * grid, C]: the similarity sampled at each token cell
    grid_slots: slice  # the image's visual tokens the grid covers (LLaVA's "full" strategy puts CLIP's CLS token first)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # [tokens per image, C]: the adapter's class_bias (detector_bias)
    boxes: dict[str, torch.Tensor] = field(default_factory=dict)  # [grid * grid] bool: a region question's box cells (region_box)


def _detector_cells(source, vlm, pairs: list[QAPair], d: loop.Dist, need: str, region_box: bool = False,
                    detector_bias: bool = False) -> DetectorInputs:
    """The bundle detector's similarity sampled at each token cell, [grid * grid, C], of each pair's image
    (each image once), through the runtime's own ``Pipeline.detect``, and the slice of an image's visual
    tokens that the grid covers (LLaVA's "full" strategy puts CLIP's CLS token first). ``need`` names the
    option that asked, for the errors. With ``region_box`` a region question's detector runs on its frame
    (without the red box, as ``Pipeline.batch(regions=)``) and its box's cells are returned too; with
    ``detector_bias`` the adapter's ``class_bias`` of each image (``refine_mask.token_bias``)."""
    from tqdm import tqdm

    from rtrt.runtime.backends import make_backend
    from rtrt.runtime.pipeline import Pipeline
    from rtrt.runtime.refine_mask import box_cells, cells_bias

    from .coda import region_box as read_region_box
    from .coda import region_frame

    m = source.manifest
    if m.detector is None or m.vfm is None:
        raise InputError(f"{source.root}: {need} needs a bundle with a detector and its VFM (phase 1 writes both)")
    per_image = (vlm.image_token_layout() or {}).get("tokens_per_image")
    if vlm.name != "llava" or not per_image:
        raise ModelMismatchError(f"{need} needs LLaVA's fixed image-token grid, not {vlm.name!r}")
    grid = math.isqrt(int(per_image))
    offset = int(per_image) - grid * grid
    if detector_bias and not m.detector.calibrated:
        raise InputError(f"{source.root}: --detector-bias needs a calibrated detector (rtrt calibrate): its z-scores are the bias")
    pipe = Pipeline(source, make_backend("torch", source, device=str(d.device)), device=str(d.device))
    layout = vlm.image_token_layout()
    out = DetectorInputs({}, slice(offset, offset + grid * grid))
    # A frame's detector pass is the same for each of its region questions (the demo's 600 frames
    # carry 2,029 boxes): each frame runs once.
    frames: dict[str, tuple[tuple[int, int], Any]] = {}  # frame -> (image size, detector similarity)
    for p in tqdm(pairs, desc="detector cells", disable=not d.is_main, leave=False):
        if p.image in out.cells:
            continue
        frame = region_frame(p.image) if region_box else p.image
        box = read_region_box(p.image) if frame != p.image else None
        if frame not in frames:
            image = load_image(frame)
            frames[frame] = (image.size, pipe.detect(image).similarity)
        size, similarity = frames[frame]
        centres = llava_cell_centres(size, grid, vlm.processor.image_processor)
        out.cells[p.image] = sample_cells(similarity, size, centres)
        if box is not None:
            out.boxes[p.image] = torch.from_numpy(box_cells(box, size, centres.double().numpy()))
        if detector_bias:  # refine_mask.token_bias from the cells just sampled
            bias = torch.zeros(int(layout["tokens_per_image"]), out.cells[p.image].shape[1])
            bias[out.grid_slots] = torch.from_numpy(
                np.array(cells_bias(out.cells[p.image].numpy(), centres.double().numpy(), size, m.detector, box), dtype=np.float32))
            out.biases[p.image] = bias
    return out


def _train(cfg: AdapterTrainConfig, out: Path, d: loop.Dist) -> Path:
    from rtrt.runtime.vlm import load_vlm

    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.max_answer_tokens < 1:
        raise InputError("--epochs, --batch-size and --max-answer-tokens must be at least 1")
    if cfg.hints not in HINT_MODES:
        raise InputError(f"--hints must be one of {', '.join(HINT_MODES)}, not {cfg.hints!r}")
    if cfg.recon not in RECON_MODES:
        raise InputError(f"--recon must be one of {', '.join(RECON_MODES)}, not {cfg.recon!r}")
    if not 0.0 <= cfg.hint_share <= 1.0:
        raise InputError(f"--hint-share must be from 0 to 1, not {cfg.hint_share:g}")
    if cfg.hint_share < 1.0 and cfg.hints != "detector":
        raise InputError("--hint-share needs --hints detector (without hints no prompt carries one)")
    if cfg.attn_prior < 0 or cfg.attn_prior_temperature <= 0:
        raise InputError("--attn-prior must be >= 0 and --attn-prior-temperature > 0")
    if not math.isfinite(cfg.w_keep) or cfg.w_keep < 0:
        raise InputError("--w-keep must be >= 0")
    if cfg.keep_z is not None and (cfg.w_keep == 0 or not math.isfinite(cfg.keep_z)):
        raise InputError("--keep-z needs --w-keep and a finite value")
    if cfg.refine_mask_z is not None and not math.isfinite(cfg.refine_mask_z):
        raise InputError("--refine-mask-z must be a finite number")
    if cfg.slot_value and not cfg.null_slot:
        raise InputError("--slot-value needs --null-slot (it learns the null slot's value)")
    if cfg.detector_bias and cfg.null_slot:
        raise InputError("--detector-bias and --null-slot cannot be combined (the slot has no detector score)")
    source = load_bundle(cfg.bundle)
    if cfg.keep_z is not None and source.manifest.detector is not None and not source.manifest.detector.calibrated:
        raise InputError(f"{source.root}: --keep-z needs a calibrated detector (rtrt calibrate); without it --w-keep uses the raw threshold")
    if cfg.refine_mask_z is not None and source.manifest.detector is not None and not source.manifest.detector.calibrated:
        raise InputError(f"{source.root}: --refine-mask-z needs a calibrated detector (rtrt calibrate)")
    weight = source.class_embeddings().weight.detach().to(d.device)
    pairs, tasks = read_qa_pairs(cfg.tasks, cfg.images, cfg.task_names)
    pairs, bad = _check_images(pairs, d, cfg.skip_bad)
    for reason in bad:
        d.log(f"skipped: {reason}")
    if not pairs:
        raise InputError(f"{cfg.tasks}: no QA pair left after skipping bad images")

    vlm = load_vlm(cfg.vlm, dtype=torch.bfloat16 if cfg.bf16 else None, device=d.device)
    if vlm.hidden_size != source.manifest.d_llm:
        raise ModelMismatchError(
            f"VLM {cfg.vlm} has hidden size {vlm.hidden_size}, the bundle's W has {source.manifest.d_llm} (train phase 1 for this VLM)"
        )
    if cfg.grad_checkpointing:
        # transformers >= 5.2x names it activation checkpointing; older 5.x only has the gradient_ name.
        enable = getattr(vlm.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            vlm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Checkpointing runs only in training mode; dropout stays off so the frozen VLM computes as at inference.
        vlm.model.train()
        for m in vlm.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()
    if cfg.hints == "detector" and cfg.hint_share == 0.0:
        # No prompt keeps its hint (the draw below would drop every one): the same prompts without
        # running the detector over every image (minutes on the demo's 2,629 QA pairs).
        hint_names = [[] for _ in pairs]
    else:
        hint_names = _detector_hints(source, pairs, d) if cfg.hints == "detector" else None
    if hint_names is not None and 0.0 < cfg.hint_share < 1.0:
        # A seeded share of the pairs keeps its hint, the rest train as without hints, so the adapter
        # learns both configurations inference runs in (refinement alone, and with hints).
        draw = random.Random(cfg.seed)
        hint_names = [h if draw.random() < cfg.hint_share else [] for h in hint_names]
    priors: dict[str, torch.Tensor] = {}
    keeps: dict[str, torch.Tensor] = {}
    hots: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    grid_slots = None
    if cfg.attn_prior > 0 or cfg.w_keep > 0 or cfg.refine_mask_z is not None or cfg.detector_bias or cfg.region_box:
        need = next(n for n, on in (("--attn-prior", cfg.attn_prior > 0), ("--w-keep", cfg.w_keep > 0),
                                    ("--refine-mask-z", cfg.refine_mask_z is not None), ("--detector-bias", cfg.detector_bias),
                                    ("--region-box", True)) if on)
        found = _detector_cells(source, vlm, pairs, d, need, cfg.region_box, cfg.detector_bias)
        cells, grid_slots = found.cells, found.grid_slots
        biases = {k: b.to(d.device) for k, b in found.biases.items()}
        if cfg.region_box:
            d.log(f"--region-box: {len(found.boxes)} region question images refined in their box only")
        if cfg.refine_mask_z is not None or found.boxes:
            def hot(k: str, c: torch.Tensor) -> torch.Tensor:
                if k in found.boxes:
                    return found.boxes[k]
                if cfg.refine_mask_z is None:
                    return torch.ones(c.shape[0], dtype=torch.bool)
                return torch.from_numpy(hot_cells(c.double().numpy(), source.manifest.detector, cfg.refine_mask_z))

            hots = {k: hot(k, c).to(d.device) for k, c in cells.items()}
            share = torch.cat(list(hots.values())).float().mean().item()
            why = " and ".join(n for n, on in (("--refine-mask-z", cfg.refine_mask_z is not None), ("--region-box", bool(found.boxes))) if on)
            d.log(f"the adapter changes {100 * share:.1f}% of the token cells ({why})")
        if cfg.attn_prior > 0:
            priors = {k: torch.softmax(c / cfg.attn_prior_temperature, dim=-1).to(d.device) for k, c in cells.items()}
        if cfg.w_keep > 0:
            keeps = {k: keep_cells(c, source.manifest.detector, cfg.keep_z).to(d.device) for k, c in cells.items()}
            kept = torch.cat(list(keeps.values())).float().mean().item()
            d.log(f"--w-keep: the detector reports no rare class at {100 * kept:.1f}% of the token cells")
    tokenizer = vlm.processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = [answer_token_ids(vlm, p.question, p.answer, cfg.max_answer_tokens) for p in pairs]
    limit = getattr(vlm.model.config.get_text_config(), "max_position_embeddings", None)

    loop.seed_all(cfg.seed)
    adapter = CrossAttentionAdapter(vlm.hidden_size, cfg.width, cfg.heads, cfg.null_slot, cfg.slot_value,
                                    cfg.detector_bias, cfg.region_box).to(d.device)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    files = loop.RunFiles.for_output(out)
    config = loop.config_dict(cfg)
    ckpt = loop.Checkpoint(files.checkpoints, config, RESUME_FREE, defaults=loop.config_defaults(type(cfg)))
    start, history = ckpt.restore(adapter, optimizer, cfg.resume, d)
    metrics = loop.Metrics(files.metrics, d)
    metrics.log(kind="start", phase="adapter", resumed_at=start, world_size=d.world_size, tasks=tasks, config=config)
    net = d.wrap(adapter)

    def token_cells(per_image: dict[str, torch.Tensor], idx: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """[T_total] bool over the batch's visual tokens: each image's per-cell flags at its grid slots, False elsewhere."""
        out = torch.zeros(len(idx), tokens.shape[0] // len(idx), dtype=torch.bool, device=tokens.device)
        out[:, grid_slots] = torch.stack([per_image[pairs[i].image] for i in idx])
        return out.flatten()

    # The frozen tower's output for an image is the same every epoch: with cache_visual_tokens it is kept
    # after the image's first step (on the host). The weights are the same as without where the tower's
    # output for an image does not depend on the rest of its batch (the demo VLM on CPU: byte for byte);
    # the first batch served from the cache is also computed once, and the log says which holds.
    visual_cache: dict[str, torch.Tensor] | None = {} if cfg.cache_visual_tokens else None
    cache_checked = False

    def cached_tokens(batch, idx: list[int]) -> torch.Tensor | None:
        nonlocal cache_checked
        if visual_cache is None:
            return None
        if all(pairs[i].image in visual_cache for i in idx):
            tokens = torch.cat([visual_cache[pairs[i].image] for i in idx]).to(d.device)
            if not cache_checked:
                cache_checked = True
                fresh = vlm.visual_tokens(batch).detach()
                diff = float((fresh.float() - tokens.float()).abs().max())
                d.log("--cache-visual-tokens: the cached tokens equal the tower's in another batch, bit for bit" if diff == 0 else
                      f"--cache-visual-tokens: the tower's output depends on its batch here (max difference {diff:.2e}): "
                      "the cache changes the weights by float rounding")
            return tokens
        tokens = vlm.visual_tokens(batch).detach()
        for i, t in zip(idx, tokens.split(vlm.image_mask(batch).sum(1).tolist())):
            visual_cache.setdefault(pairs[i].image, t.to("cpu", copy=True))
        return tokens

    def step(idx: list[int], global_count: int) -> dict[str, float]:
        batch = vlm.prepare([load_image(pairs[i].image) for i in idx], [pairs[i].question for i in idx],
                            None if hint_names is None else [hint_names[i] for i in idx])
        batch, labels = append_answers(batch, [answers[i] for i in idx], pad_id)
        if limit is not None and labels.shape[1] > limit:
            raise InputError(f"prompt + answer of {labels.shape[1]} tokens exceeds the VLM's {limit} positions; lower --max-answer-tokens")
        # Logits only where an answer token is predicted: the answers start at one column (append_answers).
        labelled = (labels != -100).any(0).nonzero()
        keep = labels.shape[1] - int(labelled.min()) + 1 if len(labelled) else 0
        parts: dict[str, torch.Tensor] = {}

        def transform(tokens: torch.Tensor) -> torch.Tensor:
            bias = torch.cat([biases[pairs[i].image] for i in idx])[None].to(tokens.dtype) if cfg.detector_bias else None
            if cfg.attn_prior > 0:
                refined, attn = net(tokens[None], weight, return_attention=True, class_bias=bias)
                # Head-averaged attention of each image's grid tokens against that image's prior.
                per_image = attn[0].mean(0).unflatten(0, (len(idx), -1))[:, grid_slots]  # [B, grid * grid, C]
                if cfg.null_slot:
                    # The prior says which of W's rows, not how much: it is held against the rows' share
                    # renormalised, and the null slot's share stays free.
                    per_image = per_image / per_image.sum(-1, keepdim=True).clamp(min=1e-12)
                target = torch.stack([priors[pairs[i].image] for i in idx])
                parts["attn_prior"] = prior_kl(target.flatten(0, 1), per_image.flatten(0, 1))
                refined = refined[0]
            else:
                refined = net(tokens[None], weight, class_bias=bias)[0]
            if hots:
                # As the pipeline infers with refine_mask_z: only the grid tokens whose cell the detector fires at change.
                refined = torch.where(token_cells(hots, idx, tokens)[:, None], refined, tokens)
            parts["reconstruction"] = reconstruction_loss(refined, tokens, cfg.recon)
            if cfg.w_keep > 0:
                # The grid tokens whose cell the detector reports no rare class in (the refinement is meant
                # for the rare objects, not the rest); a CLS token ("full" strategy) is left out.
                parts["keep"] = masked_reconstruction(refined, tokens, token_cells(keeps, idx, tokens))
            return refined

        with torch.autocast(device_type=d.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            output = vlm.forward(batch, transform=transform, labels=labels, logits_to_keep=keep,
                                 visual_tokens=cached_tokens(batch, idx))
        ar = output.loss.float()
        loss = ar + cfg.w_reconstruction * parts["reconstruction"]
        if "attn_prior" in parts:
            loss = loss + cfg.attn_prior * parts["attn_prior"]
        if "keep" in parts:
            loss = loss + cfg.w_keep * parts["keep"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "autoregressive": ar.item(), "reconstruction": parts["reconstruction"].item(),
                **({"attn_prior": parts["attn_prior"].item()} if "attn_prior" in parts else {}),
                **({"keep": parts["keep"].item()} if "keep" in parts else {})}

    history = loop.fit(
        d, num_samples=len(pairs), global_batch=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed, optimizer=optimizer,
        lr=cfg.lr, warmup=cfg.warmup_steps, step=step,
        state=lambda: {"model": adapter.state_dict(), "optimizer": optimizer.state_dict()},
        checkpoint=ckpt, metrics=metrics, desc="adapter", start_epoch=start, history=history,
    )

    if visual_cache:
        mb = sum(t.numel() * t.element_size() for t in visual_cache.values()) / 2**20
        d.log(f"--cache-visual-tokens: {len(visual_cache)} images' visual tokens kept, {mb:.0f} MiB")
    if d.is_main:
        m = source.manifest
        keep = ["embeddings.safetensors", "detector.safetensors"] + [k for k in m.files if k.startswith("vfm/")]
        copies = {k: str(source.root / k) for k in keep if k in m.files}
        dirs: dict[str, str] = {}
        ref, revision = split_pinned(cfg.vlm)  # a hub VLM: "org/name" and the commit load_vlm fetched
        if cfg.carry_vlm:
            if revision is not None or not Path(cfg.vlm).is_dir():
                raise InputError(f"--carry-vlm needs a local VLM directory, got {cfg.vlm!r}")
            dirs["vlm"], ref = str(Path(cfg.vlm).resolve()), "vlm"
        elif revision is None and Path(cfg.vlm).is_dir():
            ref = str(Path(cfg.vlm).resolve())
        provenance = {"config": config, "world_size": d.world_size, "history": history, "tasks": tasks,
                      "qa_pairs": len(pairs), "skipped_images": bad, "source_bundle": str(source.root.resolve()),
                      "gate": float(torch.tanh(adapter.gate).item())}
        manifest = replace(
            m,
            vlm=VLMSpec(family=vlm.name, ref=ref, hidden_size=vlm.hidden_size, image_token_layout=vlm.image_token_layout(),
                        revision=revision),
            adapter=adapter.config,
            exports=Exports(),  # the source bundle's graphs hold its old adapter
            training={**m.training, "adapter": provenance},
        )
        tensors = {"adapter.safetensors": {k: v.detach().float().cpu() for k, v in adapter.state_dict().items()}}
        write_bundle(out, manifest, tensors, files=copies, dirs=dirs, overwrite=cfg.overwrite)
        d.log(f"wrote {out} (adapter gate tanh = {provenance['gate']:.4f})")
    d.barrier()
    return out
