"""The demo base VLM: a tiny LLaVA-1.5 pretrained from scratch on the world's pretraining split.

``pretrain_vlm(world, out, cfg)`` learns a byte-level BPE tokenizer from the pretraining text,
builds a standard ``LlavaForConditionalGeneration`` (CLIP vision tower + MLP projector + Llama)
with a ``LlavaProcessor`` (``CLIPImageProcessor``, LLaVA-1.5's chat template), trains it in stages
and saves it with ``save_pretrained``:

0. the language model on text-only prompts with hints (LLaVA starts from a text-pretrained LLM);
0b. the language model on *pseudo-images* (``pseudo_epochs``): the image prompts of stage 2, each
   image slot holding the name embedding of what its patch shows (``_pseudo_image``), so the LLM
   learns to read the image slots before the tower exists (a from-scratch LLaVA did not learn to
   ground on images in the steps a CPU allows);
1. the vision tower alone (LLaVA starts from a CLIP trained on web images): per-patch labels of
   every object drawn in the pretraining images, at the world's natural frequencies (not balanced);
   ``tag_scenes`` adds that many freshly rendered scenes of the same distribution per epoch (a CLIP
   sees far more images than LLaVA's answer data; on the pretraining images alone the tower overfits);
2. projector (2a, the language model frozen), then projector and language model (2b), the tower
   frozen as in LLaVA-1.5 (its patch tokens computed once), on (image, general-perception question)
   -> answer. The projector starts from the stage-1 patch classifier, scaled so that a typical patch
   lands on its stage-0b slot.

Answer style (``answer_style="short"``, the demo's): the categories the reference text names, in
CODA-LM's category order, "Objects that influence the ego car: car, pedestrian, traffic cone."
(``short_answer``). The world's pretraining texts name common objects always and rare ones seldom
(the web's long tail), so the model learns to be blind to rare objects, as large VLMs are.

Region questions (``"region_perception"`` in ``tasks``; off by default): CODA-LM's question about
the object in the red box, on the world's boxed images, answered "The object in the red box is a
traffic cone." (``region_short_answer``). The tower learns to see the box in stage 1 (a second,
binary per-patch head: on or inside the box, ``_box_labels``), the projector starts with one unit
more (that head -> the mean embedding of " red box"), and stage 0b marks the slots inside the box
with that embedding, so the language model learns to name the marked object.

General prompt-following: a share ``hint_prob`` of the prompts starts with the detector's hint
sentence (``rtrt.runtime.vlm.format_hint``: "In this image, there might be objects such as: a,
b.") listing rare objects drawn in the image (``hint_classes="rare"``: the plug-in detector's
classes, the only ones it will ever hint), named by the text or not, and the answer then names
them too, as a prompted writer names what it is pointed at. The model learns to use a hint, as
real LLMs do; without one it stays blind. Because hints never list common objects, the answer's
common objects must still come from the image when a hint is given: an earlier recipe drew hints
from every category (``hint_classes="any"``), and the model learnt to list the hint in place of
what it saw (common recall 71% -> 44% with oracle rare hints).

``evaluate_recall(vlm, world, split)`` measures the blindness through the runtime's own path
(``rtrt.runtime.vlm.load_vlm``, ``prepare``, greedy ``generate``): per-item object mentions
(``rtrt.tools.judge.find_mentions``) of the answer against the reference, micro recall of the
common and of the rare categories, without hints and with oracle hints naming the rare objects
present.

The weights are stored in float16 (half the bytes) while ``config.json`` keeps ``dtype:
float32``, so ``from_pretrained`` upcasts on load and the model runs in float32 on a CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

if TYPE_CHECKING:
    from rtrt.trainer.coda import CodaAnnotation, RegionItem, TaskRecord

__all__ = ["VLMConfig", "Sample", "tag_class_weights", "region_short_answer", "region_sources", "load_samples", "build_vlm", "pretrain_vlm", "realign_vlm", "evaluate_recall", "save_half"]


# The world's splits use seed streams 0-3 and the VFM's scenes 7; stage 1's fresh scenes use this one.
TOWER_SEED_STREAM = 8

SHORT_PREFIX = "Objects that influence the ego car:"
SHORT_NONE = "Nothing in the scene strongly influences the ego car."


def short_answer(answer: str) -> str:
    """The demo VLM's answer style: the categories ``answer`` names, in CODA-LM's category order.

    ``"Objects that influence the ego car: car, pedestrian, traffic cone."`` A fixed order makes the
    answer a set the tiny model predicts item by item; the keyword judge reads it like a long answer.
    """
    from rtrt.tools.judge import find_mentions

    return short_answer_of(find_mentions(answer))


def short_answer_of(categories, hint=(), order: str = "coda") -> str:
    """``short_answer`` of a set of category names.

    ``order``: ``"coda"``, one CODA-LM category order; ``"first"``, the categories also in ``hint`` before the
    rest; ``"last"``, after the rest; each part in CODA-LM's order. ``short_answer_of({"car", "traffic_light",
    "cat"}, ["cat"], "last")`` is ``"Objects that influence the ego car: car, traffic light, cat."``
    """
    from rtrt.runtime.modules import display_name
    from rtrt.trainer.coda import CATEGORIES

    if order not in HINT_ORDERS[:3]:
        raise ValueError(f"order must be 'coda', 'first' or 'last', got {order!r}")
    cats, lead = set(categories), set(hint) if order != "coda" else set()
    hinted = [c for c in CATEGORIES if c in cats and c in lead]
    rest = [c for c in CATEGORIES if c in cats and c not in lead]
    cats = hinted + rest if order == "first" else rest + hinted
    return f"{SHORT_PREFIX} {', '.join(display_name(c) for c in cats)}." if cats else SHORT_NONE


HINT_APART = "There might also be:"
HINT_ORDERS = ("coda", "first", "last", "apart")  # VLMConfig.hint_order (hinted_answer); short_answer_of takes the first three


def hinted_answer(seen, hint=(), order: str = "coda") -> str:
    """The short answer of a sample that names ``seen`` and whose prompt hints ``hint`` (``VLMConfig.hint_order``).

    ``"coda"``, ``"first"``, ``"last"``: ``short_answer_of(seen | hint, hint, order)``. ``"apart"``: the answer
    without the hint (``short_answer_of(seen)``), then the hinted categories it does not name in a sentence
    of their own (``HINT_APART``), so that the list and its end are those of the unhinted answer.
    """
    if order != "apart":
        return short_answer_of(set(seen) | set(hint), hint, order)
    from rtrt.runtime.modules import display_name
    from rtrt.trainer.coda import CATEGORIES

    extra = [c for c in CATEGORIES if c in set(hint) - set(seen)]
    base = short_answer_of(seen)
    return f"{base} {HINT_APART} {', '.join(display_name(c) for c in extra)}." if extra else base


REGION_PREFIX = "The object in the red box is"


def region_short_answer(category: str) -> str:
    """The demo VLM's region answer style: ``"The object in the red box is a traffic cone."`` (the region's category)."""
    from rtrt.runtime.modules import display_name

    name = display_name(category)
    return f"{REGION_PREFIX} {'an' if name[0] in 'aeiou' else 'a'} {name}."


def region_sources(split_dir: str | Path, records: Sequence[TaskRecord]) -> list[tuple[str, RegionItem]]:
    """``(base image, RegionItem)`` of each region-perception record of ``split_dir`` (``CODA-LM/<split>``).

    A region question shows ``<folder>/images_w_boxes/<id>_object_<k>.<ext>``: image ``<folder>/images/<id>.<ext>``
    with the red box of the k-th region of its annotation (``<folder>_<id>.json``) drawn in. The
    record's answer, if any, must be that region's text (a stale task file is refused).
    """
    from rtrt.trainer.coda import image_path_for, iter_annotations, region_frame

    split_dir = Path(split_dir)
    anns: dict[str, CodaAnnotation] = {}
    out = []
    for rec in records:
        base = region_frame(rec.image)
        if base == rec.image:
            raise ValueError(f"{rec.image}: region question {rec.question_id} does not show a boxed image "
                             "(<folder>/images_w_boxes/<id>_object_<k>; world written with --no-boxed-images?)")
        rel = Path(rec.image)
        k = rel.stem.rpartition("_object_")[2]
        if not anns:
            anns = {image_path_for(p.name, rel.suffix): a for p, a in iter_annotations(split_dir)}
        ann = anns.get(base)
        if ann is None or not 1 <= int(k) <= len(ann.region_perception):
            raise ValueError(f"{rec.image}: no region {k} of {base} in {split_dir}")
        region = ann.region_perception[int(k) - 1]
        if rec.answer is not None and rec.answer != region.description_and_explanation:
            raise ValueError(f"{rec.image}: the task file's answer is not region {k}'s text of {base} (stale task file?)")
        out.append((base, region))
    return out


def write_short_tasks(src: str | Path, dst: str | Path, tasks: Sequence[str] = ("general_perception",),
                      images: int = 0) -> list[Path]:
    """``dst/<task>.jsonl`` per task: ``src``'s records with the VLM's short answers; returns the files in ``tasks`` order.

    Phase 2 trains the adapter on the answers the VLM gives (its answer style): general-perception
    ones name what the plug-in split's texts name (``short_answer``), region-perception ones the
    region's category (``region_short_answer``; ``src`` is ``CODA-LM/<split>/vqa_anno``).
    ``images``: only the records of the split's first this many images (CODA-LM's order: the annotation
    files sorted by name; a region question counts as its base image; 0: all), so a
    larger split for phase 1 leaves phase 2's questions as they were (the world draws image ``i`` of a
    split alone, so the first ``n`` images do not depend on the split's size).
    """
    from rtrt.trainer.coda import image_path_for, read_tasks, region_frame, task_file, write_tasks

    if images < 0:
        raise ValueError(f"images must be at least 0, got {images}")
    # The split's first images in CODA-LM's order (its annotation files sorted by name), without extension.
    first = {str(Path(image_path_for(p.name)).with_suffix(""))
             for p in sorted(Path(src).parent.glob("*.json"))[:images]} if images else set()
    outs = []
    for task in tasks:
        recs = read_tasks(task_file(src, task))
        if images:  # a region question's image is its base image with the box drawn in: counted as the base
            recs = [r for r in recs if str(Path(region_frame(r.image)).with_suffix("")) in first]
        if task == "general_perception":
            answers = [short_answer(r.answer or "") for r in recs]
        elif task == "region_perception":
            answers = [region_short_answer(region.category_name) for _, region in region_sources(Path(src).parent, recs)]
        else:
            raise ValueError(f"no short answer style for task {task!r}")
        out = Path(dst) / f"{task}.jsonl"
        write_tasks(out, [dataclasses.replace(r, answer=a) for r, a in zip(recs, answers)])
        outs.append(out)
    return outs


@dataclass
class VLMConfig:
    """Shape and pretraining schedule of the demo VLM; saved as ``demo_vlm.json`` beside it."""

    image_size: int = 256  # square VLM input side; tokens per image = (image_size / patch_size) ** 2
    patch_size: int = 32  # CLIP patch side (ViT-B/32-style: 64 tokens, which a small LM learns to read quickly)
    vision_hidden: int = 160  # CLIP vision tower width
    vision_layers: int = 4  # CLIP vision tower depth
    vision_heads: int = 5  # CLIP attention heads
    text_hidden: int = 256  # Llama width (D_llm: the width of W and of the adapter)
    text_layers: int = 4  # Llama depth
    text_heads: int = 4  # Llama attention heads (and key/value heads)
    text_intermediate: int = 688  # Llama MLP width
    vocab_size: int = 1024  # BPE vocabulary, byte symbols and special tokens included
    name_tokens: str = "none"  # "all": each multi-word category name written after a space (" traffic cone", " garbage bag", ...) becomes one token of its own beside the BPE's (a tiny LLM reading "traffic" then had to pick " light", " sign" or " cone" and could turn a hinted cone into a traffic light); "shared": only the names whose first word starts another category's name too (traffic light, sign and cone); "none": the BPE's tokens only
    tie_embeddings: bool = True  # the LM head shares the input embedding matrix
    max_positions: int = 1024  # Llama context length
    tasks: tuple[str, ...] = ("general_perception",)  # pretraining task files; "region_perception" adds the red-box questions (see below)
    region_per_image: int = 1  # region questions kept per pretrain image (seeded draw; 0: all), each a boxed image more to train on
    region_share: float = 1.0  # share of pretrain images (seeded) whose region questions are kept
    region_hint_prob: float = 0.0  # share of kept region questions (whose image holds a rare object) whose prompt carries a hint of 1 to hint_max of its rare objects; the answer stays the box's category (0: region prompts never carry a hint)
    box_weight: float = 1.0  # stage 1 with region questions: weight of the red-box head's per-patch BCE (patch on or inside the box)
    answer_style: str = "short"  # "short": general-perception answers as ``short_answer``; "full": the reference text
    hint_prob: float = 0.5  # share of general-perception samples (with a hintable object drawn) whose prompt carries a hint
    hint_max: int = 3  # most objects a pretraining hint lists
    hint_classes: str = "rare"  # what a hint lists: "rare" (the plug-in detector's classes) or "any" category
    hint_rare_prob: float = 0.7  # hint_classes "any": chance a hint lists a rare object when one is drawn
    text_epochs: int = 2  # stage 0: epochs of text-only prompts with random hints (0: skip)
    text_hint_prob: float = 0.9  # stage 0: share of text prompts with a hint
    text_answers: str = "named"  # stage 0 answers: "named" (the pretraining text's objects + the hint) or "hint" (the hint's objects only: a text prompt shows nothing else)
    pseudo_epochs: int = 0  # stage 0b: epochs of image prompts whose image slots hold the patch labels' name embeddings (0: skip)
    pseudo_drop: float = 0.2  # stage 0b: share of object patches shown as background (the tower will miss some)
    pseudo_gain: float = 0.25  # stage 0b: a slot holds gain * the mean input embedding of its label's name (as the projector starts)
    pseudo_noise: float = 0.0  # stage 0b: std of Gaussian noise added to every slot, relative to the names' RMS (real tokens are not clean words)
    pseudo_regions: float = 0.0  # stage 0b: share of pretrain images with a rare object in view that get one region question more about one of them (labels only, answer its category, a hint as region_hint_prob): the world's region annotations list rare objects as seldom as its texts name them, so without these the LLM learns that a red box holds a common object (0: none)
    pseudo_hint_hide: float = 0.0  # stage 0b: share of the hinted general samples (seeded) whose hinted categories' patches are all shown as background, so the answer can name them only from the hint, as the runtime's hints name objects its VLM does not see (0: hinted objects keep their slots, and the language model may learn to read a hinted name's last words from the slots instead: a hinted traffic cone then became "traffic light")
    hint_order: str = "coda"  # a hinted answer's order: "coda", one CODA-LM order (a hinted name takes the place of a later category the image shows: the shipped VLM then left out a present traffic light after a hinted cat, stroller or warning sign, and read "traffic" on to a hinted "cone"); "first", the hint's categories first, then the rest; "last", what the answer names beside the hint first, the hint's categories last; each part in CODA-LM's order; "apart", the answer without the hint, then the hinted categories it does not name in a sentence of their own ("There might also be: cat, stone."); on test the common recall that oracle rare hints cost was -3.1 / -6.8 / -4.7 / -2.4 (coda / first / last / apart, README history), so the preset keeps "coda"
    pseudo_answers: str = "named"  # stage 0b answers: "named" (the pretraining text's objects + the hint) or "drawn" (every category with a slot + the hint: the LLM names all it is shown)
    rare_gain: float = 1.0  # stage 2 starts the projector sending rare categories to their names at this fraction of the common ones' gain (1: aligned alike; < 1: weakly, as the web's captions leave them)
    align_slots: float = 0.0  # stage 2a: weight of the projector's distance to stage 0b's slots (names x unit gain), relative to their size, object and background slots half each (0: answers only, as LLaVA)
    projector_quiet: bool = False  # stage 2 starts linear_2's columns beyond the classifier units at zero, so the first visual tokens are the names stage 0b showed (no random extra)
    align_epochs: int = 4  # stage 2a: epochs training the projector alone, the language model frozen (0: skip)
    align_lr: float = 3e-3  # stage 2a: peak learning rate
    tag_epochs: int = 3  # stage 1: epochs of the vision tower's patch-labelling pretraining (0: skip)
    tag_scenes: int = 0  # stage 1: freshly rendered scenes of the world's distribution per epoch, beside the pretrain images (a CLIP sees far more images than LLaVA's answers; 0: the pretrain images only)
    tag_lr: float = 2e-3  # stage 1: peak learning rate
    tag_batch_size: int = 64  # stage 1: images per step
    bg_weight: float = 0.2  # weight of background patches in the patch-label loss (objects cover few patches)
    head_refit: bool = False  # stage 2 starts the projector from a patch classifier (and red-box head) refit on the frozen tower's features with stage 1's loss, not from stage 1's jointly trained heads; stage 2 then runs on the float16-rounded weights with its own generator, so ``realign_vlm`` redoes it on a saved VLM exactly
    refit_balance: float | None = None  # with head_refit: the refit classifier's category weights as ``tag_balance`` (None: ``tag_balance``'s); only stage 2 reads it
    tag_balance: float = 0.0  # stage 1: each category's patch weight (mean object-patch count / its count) ** this, counted on the pretrain images' labels (0: every category weighs 1; 0.5: small objects such as traffic lights, one patch each, weigh more than cars)
    max_answer_tokens: int = 320  # answers are cut to this many tokens (EOS included)
    epochs: int = 3  # passes over the pretraining samples
    batch_size: int = 16  # samples per optimiser step
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up, cosine decay to lr / 20)
    warmup_steps: int = 100  # linear warm-up steps
    weight_decay: float = 0.05  # AdamW weight decay (not on norms and biases)
    max_images: int = 0  # use only the first this many pretraining images (0: all)
    seed: int = 0  # initialisation, hint draws and batch order
    init_range: float = 0.02  # std of the initial weights

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if self.name_tokens not in ("none", "all", "shared"):
            raise ValueError(f"name_tokens must be 'none', 'all' or 'shared', got {self.name_tokens!r}")
        if self.text_answers not in ("named", "hint"):
            raise ValueError(f"text_answers must be 'named' or 'hint', got {self.text_answers!r}")
        if self.pseudo_answers not in ("named", "drawn"):
            raise ValueError(f"pseudo_answers must be 'named' or 'drawn', got {self.pseudo_answers!r}")
        if self.region_per_image < 0 or not 0.0 <= self.region_share <= 1.0 or not 0.0 <= self.region_hint_prob <= 1.0:
            raise ValueError(f"region_per_image must be >= 0 and region_share in [0, 1], got {self.region_per_image}, {self.region_share}")
        if self.hint_order not in HINT_ORDERS:
            raise ValueError(f"hint_order must be 'coda', 'first', 'last' or 'apart', got {self.hint_order!r}")
        if not 0.0 <= self.pseudo_hint_hide <= 1.0:
            raise ValueError(f"pseudo_hint_hide must be in [0, 1], got {self.pseudo_hint_hide}")
        if not 0.0 <= self.pseudo_regions <= 1.0 or (self.pseudo_regions and "region_perception" not in self.tasks):
            raise ValueError(f"pseudo_regions must be in [0, 1] and needs the region_perception task, got {self.pseudo_regions}")
        if self.hint_classes not in ("rare", "any"):
            raise ValueError(f"hint_classes must be 'rare' or 'any', got {self.hint_classes!r}")
        if self.tag_scenes < 0:
            raise ValueError(f"tag_scenes must be >= 0, got {self.tag_scenes}")
        if not 0.0 <= self.tag_balance <= 1.0:
            raise ValueError(f"tag_balance must be from 0 to 1, got {self.tag_balance}")
        if self.refit_balance is not None and not 0.0 <= self.refit_balance <= 1.0:
            raise ValueError(f"refit_balance must be from 0 to 1, got {self.refit_balance}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")


@dataclass
class Sample:
    """One pretraining example."""

    image: str  # path relative to the world root
    question: str  # the task's question
    answer: str  # the reference answer
    hint: list[str] = field(default_factory=list)  # categories named by the prompt's hint ([] for none)
    box: tuple[float, ...] | None = None  # region questions: the red box [x, y, w, h] in image pixels (None: no box)
    base: str = ""  # region questions: the image without the box, whose scene gives the patch labels ("": ``image``)


def _task_dir(world: Path, split: str) -> Path:
    return world / "CODA-LM" / split / "vqa_anno"


def load_samples(world: str | Path, split: str, cfg: VLMConfig) -> list[Sample]:
    """The split's samples of ``cfg.tasks``, hints drawn (seeded) for the general-perception ones.

    A hint (share ``hint_prob`` of the images with a hintable object) lists 1 to ``hint_max``
    categories drawn in the image, named by the text or not: rare ones only (``hint_classes
    "rare"``), or any (``"any"``; a rare one, if any is drawn, with chance ``hint_rare_prob``). With
    the short answer style the answer then names what the hint lists: a prompted writer names what it
    is pointed at. Without a hint the text names rare objects only as seldom as the world's
    pretraining texts do, so the model learns to follow hints and stays blind without them.

    Region-perception samples (``"region_perception"`` in ``cfg.tasks``) show the boxed image, know
    their box and base image (``region_sources``) and answer in the short style with the region's
    category (``region_short_answer``); ``region_per_image`` and ``region_share`` keep a seeded subset
    (each is a boxed image more to train on). A share ``region_hint_prob`` of them carries a hint of
    rare objects drawn in the image, the boxed one or others, as the runtime's detector would give:
    the answer still names only what is in the box.
    """
    from rtrt.tools.judge import find_mentions
    from rtrt.tools.demo.world import RARE_CATEGORIES
    from rtrt.trainer.coda import read_tasks, task_file

    world = Path(world)
    rng = random.Random(cfg.seed)
    rare_set = set(RARE_CATEGORIES)
    samples: list[Sample] = []
    drawn = None
    for task in cfg.tasks:
        records = read_tasks(task_file(_task_dir(world, split), task))
        if task == "region_perception":
            samples += _region_samples(world, split, records, cfg)
            continue
        short = task == "general_perception" and cfg.answer_style == "short"
        if short and drawn is None:
            drawn = {rel: {o.category for o in scene.objects} for rel, scene in _scenes(world, split, {r.image for r in records})}
        for rec in records:
            s = Sample(rec.image, rec.question, rec.answer or "")
            named = set(find_mentions(s.answer))
            # "full" answers cannot follow a hint, so their hints list only what the text names.
            present = sorted(drawn.get(rec.image, named) | named) if short else sorted(named)
            if cfg.hint_classes == "rare":
                present = [c for c in present if c in rare_set]
            if task == "general_perception" and present and rng.random() < cfg.hint_prob:
                k = rng.randint(1, min(cfg.hint_max, len(present)))
                s.hint = rng.sample(present, k)
                rare = [c for c in present if c in rare_set]
                if cfg.hint_classes == "any" and rare and not set(s.hint) & rare_set and rng.random() < cfg.hint_rare_prob:
                    s.hint[rng.randrange(k)] = rng.choice(rare)
            if short:
                s.answer = hinted_answer(named, s.hint, cfg.hint_order)
            samples.append(s)
    if cfg.max_images:
        keep = set(sorted({s.base or s.image for s in samples})[: cfg.max_images])
        samples = [s for s in samples if (s.base or s.image) in keep]
    return samples


def _region_samples(world: Path, split: str, records, cfg: VLMConfig) -> list[Sample]:
    """The kept region-perception samples of ``records`` (see ``load_samples``), in file order."""
    rng = random.Random(cfg.seed + 2)  # its own stream: the general samples' hints do not move
    by_base: dict[str, list[int]] = {}
    sources = region_sources(world / "CODA-LM" / split, records)
    for i, (base, _) in enumerate(sources):
        by_base.setdefault(base, []).append(i)
    keep: set[int] = set()
    for idx in by_base.values():
        if rng.random() < cfg.region_share:
            keep.update(rng.sample(idx, min(len(idx), cfg.region_per_image)) if cfg.region_per_image else idx)
    out = [Sample(rec.image, rec.question,
                  region_short_answer(region.category_name) if cfg.answer_style == "short" else rec.answer or "",
                  box=tuple(region.box), base=base)
           for i, (rec, (base, region)) in enumerate(zip(records, sources)) if i in keep]
    if cfg.region_hint_prob:  # its own stream too: at 0 nothing is drawn and the samples stay as before
        from rtrt.tools.demo.world import RARE_CATEGORIES

        hint_rng = random.Random(cfg.seed + 3)
        drawn = {rel: {o.category for o in scene.objects} for rel, scene in _scenes(world, split, {s.base for s in out})}
        for s in out:
            rare = sorted(drawn[s.base] & set(RARE_CATEGORIES))
            if rare and hint_rng.random() < cfg.region_hint_prob:
                s.hint = hint_rng.sample(rare, hint_rng.randint(1, min(cfg.hint_max, len(rare))))
    return out


def build_vlm(tokenizer, cfg: VLMConfig):
    """A randomly initialised ``LlavaForConditionalGeneration`` and its ``LlavaProcessor``."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    tokens = (cfg.image_size // cfg.patch_size) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
            projection_dim=cfg.vision_hidden, initializer_range=cfg.init_range,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_positions, initializer_range=cfg.init_range,
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        ),
        image_token_id=ids["<image>"],
        image_seq_length=tokens,
        # The last layer's patch features (CLS dropped): with a 4-layer tower, LLaVA-1.5's -2 would
        # leave a whole layer untrained.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=ids["<pad>"],
        initializer_range=cfg.init_range,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
        ),
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=cfg.max_answer_tokens,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
    )
    return model, processor


def _user_text(question: str, hint: Sequence[str]) -> str:
    # The runtime's prompt (``VLMFamily.user_text``): the hint sentence, then the question.
    from rtrt.runtime.vlm import format_hint

    h = format_hint(list(hint))
    return f"{h} {question}" if h else question


def _prompt_ids(processor, question: str, hint: Sequence[str], cache: dict) -> list[int]:
    """Token ids of the chat prompt, made as ``VLMFamily.prepare`` makes them (image tokens expanded)."""
    from PIL import Image

    key = (question, tuple(hint))
    if key not in cache:
        conv = [{"role": "user", "content": [
            {"type": "image", "image": Image.new("RGB", (32, 32))},
            {"type": "text", "text": _user_text(question, hint)},
        ]}]
        batch = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
        cache[key] = list(batch["input_ids"][0])
    return cache[key]


def _answer_ids(tokenizer, answer: str, cfg: VLMConfig) -> list[int]:
    """Token ids of an answer as the VLM is trained to write it: after a space, cut to ``max_answer_tokens``, EOS last."""
    return tokenizer(" " + answer, add_special_tokens=False).input_ids[: cfg.max_answer_tokens - 1] + [tokenizer.eos_token_id]


def _text_prompt_ids(tokenizer, question: str, hint: Sequence[str], cache: dict) -> list[int]:
    """Token ids of a text-only chat prompt (no image), for the language model's stage 0."""
    key = ("text", question, tuple(hint))
    if key not in cache:
        conv = [{"role": "user", "content": [{"type": "text", "text": _user_text(question, hint)}]}]
        cache[key] = list(tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return cache[key]


def text_samples(samples: Sequence[Sample], cfg: VLMConfig) -> list[Sample]:
    """Stage-0 text: each pretraining sample again, without its image, with a hint of random categories
    (rare ones with ``hint_classes="rare"``).

    Without the image the hint is the only source of what the answer adds, so the language model
    learns to use a hint (as a text-pretrained LLM can) before it ever sees an image.
    """
    from rtrt.tools.judge import find_mentions
    from rtrt.tools.demo.world import RARE_CATEGORIES, WORLD_CATEGORIES

    rng = random.Random(cfg.seed + 1)
    pool = list(RARE_CATEGORIES if cfg.hint_classes == "rare" else WORLD_CATEGORIES)
    out = []
    for s in samples:
        # What the text names (an image hint's additions dropped); ``text_answers="hint"``: nothing,
        # a prompt without an image shows only its hint.
        named = find_mentions(s.answer) - set(s.hint) if cfg.text_answers == "named" else set()
        hint = rng.sample(pool, rng.randint(1, cfg.hint_max)) if rng.random() < cfg.text_hint_prob else []
        out.append(Sample(s.image, s.question, hinted_answer(named, hint, cfg.hint_order), hint))
    return out


def _load_pixels(world: Path, paths: Sequence[str], image_processor, desc: str,
                 progress: bool = True) -> tuple[torch.Tensor, dict[str, int]]:
    """uint8 [N, 3, S, S] of every distinct image, resized and cropped by the VLM's image processor."""
    from PIL import Image

    unique = sorted(set(paths))
    index = {p: i for i, p in enumerate(unique)}
    chunks = []
    for i in tqdm(range(0, len(unique), 64), desc=desc, unit="x64 img", file=sys.stderr, leave=False, disable=not progress):
        imgs = [Image.open(world / p).convert("RGB") for p in unique[i : i + 64]]
        px = image_processor(images=imgs, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
        chunks.append(px.to(torch.uint8))
    return torch.cat(chunks), index


def _normaliser(image_processor):
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    def normalise(u8: torch.Tensor) -> torch.Tensor:
        # (u8 / 255 - mean) / std in place on one float copy: the same operations, so the same bits, without
        # three more [B, 3, S, S] float tensors per stage-1 step (a quarter of a second on two cores).
        x = u8.to(torch.float32, copy=True)  # a copy even of a float input: the caller's tensor is never changed
        return x.div_(255.0).sub_(mean).div_(std)

    return normalise


def _batches(lengths: Sequence[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar lengths (sorted within windows of 32 batches) to waste little padding."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    window = batch_size * 32
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i : i + window], key=lambda j: lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[p] for p in perm]


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``peak / 20`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak / 20 + (peak - peak / 20) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _adamw(named_params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # No weight decay on norms, biases and other vectors.
    named = list(named_params)
    decay = [p for _, p in named if p.ndim >= 2]
    rest = [p for _, p in named if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def _scenes(world: Path, split: str, images):
    """``(image path, scene)`` of ``split``'s images in ``images``, each scene sampled again from the world's seed.

    ``sample_scene`` is the first consumer of the per-image generator (``default_rng([seed, split,
    index])``), so the scene comes back exactly; it is checked against its annotation (every
    region box must be an object of the same category).
    """
    from rtrt.tools.demo.world import SPLITS, sample_scene
    from rtrt.trainer.coda import image_path_for, iter_annotations

    from .vfm import _world_config

    wcfg = _world_config(world)
    for path, ann in iter_annotations(world / "CODA-LM" / split):
        rel = image_path_for(path.name, "." + wcfg.image_format)
        if rel not in images:
            continue
        scene = sample_scene(wcfg, np.random.default_rng([wcfg.seed, SPLITS[split], int(Path(rel).stem)]))
        drawn = {(o.category, tuple(float(v) for v in o.box)) for o in scene.objects}
        if any((r.category_name, tuple(r.box)) not in drawn for r in ann.region_perception):
            raise RuntimeError(f"{path}: the regenerated scene does not match its annotation (world generator changed?)")
        yield rel, scene


def _scene_labels(world: Path, images: dict[str, int], size: int, patch: int, sources: dict[str, str] | None = None) -> torch.Tensor:
    """Per-patch labels [N, G, G] of pretrain images: every object drawn, named by the text or not.

    The pretrain scenes are sampled again from the world's per-image seed (``default_rng([seed,
    split, index])``, which ``sample_scene`` consumes first), and each regenerated scene is checked
    against its annotation: every region box must be an object of the same category. 0 is
    background, 1 + i the i-th of ``rtrt.trainer.coda.CATEGORIES``; a patch takes the nearest object
    whose box covers its centre, a box smaller than a patch marks the patch holding its centre.
    Boxes go through the VLM's resize of the shortest side to ``size`` and centre crop.
    ``sources``: image -> the image it was drawn from (a region question's boxed image -> its base
    image), whose labels it takes.
    """
    from .vfm import _world_config

    sources = sources or {}
    rows: dict[str, list[int]] = {}
    for rel, i in images.items():
        rows.setdefault(sources.get(rel, rel), []).append(i)

    wcfg = _world_config(world)
    labels = torch.zeros((len(images), size // patch, size // patch), dtype=torch.long)
    for rel, scene in _scenes(world, "pretrain", rows):
        labels[rows[rel]] = _labels_of(scene, wcfg, size, patch)
    return labels


def _labels_of(scene, wcfg, size: int, patch: int) -> torch.Tensor:
    """Per-patch labels [G, G] of one scene after the VLM's resize of the shortest side to ``size`` and centre crop."""
    from rtrt.trainer.coda import CATEGORIES

    from .vfm import _patch_labels

    scale = size / min(wcfg.width, wcfg.height)
    ox, oy = (wcfg.width * scale - size) / 2, (wcfg.height * scale - size) / 2
    boxes = [(x * scale - ox, y * scale - oy, w * scale, h * scale) for x, y, w, h in (o.box for o in scene.objects)]
    return torch.from_numpy(_patch_labels(scene.objects, size, size, size // patch, CATEGORIES, boxes))


def _render_tower_scenes(world: Path, cfg: VLMConfig, epoch: int, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's fresh scenes of ``epoch``: uint8 pixels [N, 3, S, S] as ``_load_pixels`` gives them, and patch labels [N, G, G].

    Scene ``i`` of epoch ``e`` is the world's scene drawn from ``default_rng([cfg.seed,
    TOWER_SEED_STREAM, e * cfg.tag_scenes + i])`` as the pretrain split draws its images
    (``draw_scene``: natural frequencies, no red box), a seed stream no split uses, encoded as the
    world encodes its images.
    """
    from PIL import Image

    from rtrt.tools.demo.world import _image_bytes, draw_scene

    from .vfm import _world_config

    wcfg = _world_config(world)
    n, chunks, labels = cfg.tag_scenes, [], []
    for start in range(0, n, 64):
        imgs = []
        for i in range(start, min(start + 64, n)):
            rng = np.random.default_rng([cfg.seed, TOWER_SEED_STREAM, epoch * n + i])
            scene, img = draw_scene(wcfg, rng, wcfg.pretrain_name_prob)
            imgs.append(Image.open(io.BytesIO(_image_bytes(img, wcfg))).convert("RGB"))
            labels.append(_labels_of(scene, wcfg, cfg.image_size, cfg.patch_size))
        px = image_processor(images=imgs, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
        chunks.append(px.to(torch.uint8))
    return torch.cat(chunks), torch.stack(labels)


def _box_labels(samples: Sequence[Sample], images: dict[str, int], image_size: tuple[int, int], grid: int,
                image_processor) -> torch.Tensor:
    """Per-patch red-box labels [N, G, G] (float 0/1): 1 where a patch of a boxed image lies on or inside its box.

    The box goes through the processor's resize and crop (``probe.box_slots``: every cell the box
    overlaps); images without a box are all 0. The tower's box head learns these (stage 1), so it
    can tell the language model which object a region question is about.
    """
    from .probe import box_slots

    labels = torch.zeros((len(images), grid * grid))
    for s in samples:
        if s.box is not None:
            labels[images[s.image], box_slots(s.box, image_size, grid, image_processor)] = 1.0
    return labels.view(len(images), grid, grid)


def _patch_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The tower's patch tokens at LLaVA's feature layer, CLS dropped (the "default" strategy)."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def _patch_loss(head, hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), weight=weight, ignore_index=-100)


def _box_loss(box_head, hidden: torch.Tensor, boxes: torch.Tensor, bg_weight: float) -> torch.Tensor:
    """BCE of the red-box head per patch token; patches off the box weigh ``bg_weight``, as background does."""
    target = boxes.flatten(1)
    weight = torch.where(target > 0, 1.0, bg_weight)
    return F.binary_cross_entropy_with_logits(box_head(hidden).squeeze(-1), target, weight=weight)


def tag_class_weights(labels: torch.Tensor | None, classes: int, bg_weight: float, balance: float) -> torch.Tensor:
    """Stage 1's class weights [classes]: background ``bg_weight``; category ``c`` (mean count / count_c) ** ``balance``.

    Counts are the object patches of each category in ``labels`` (the pretrain images' patch labels;
    the fresh scenes follow the same distribution); the mean runs over the categories present, and a
    category with no patch weighs 1. ``balance`` 0 gives every category weight 1.
    """
    weight = torch.ones(classes)
    if balance > 0 and labels is not None:
        counts = torch.bincount(labels.flatten(), minlength=classes)[1:].double()
        seen = counts > 0
        if seen.any():
            mean = counts[seen].mean()
            weight[1:][seen] = (mean / counts[seen]).pow(balance).float()
    weight[0] = bg_weight
    return weight


def _pretrain_vision_tower(model, head, pixels: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, cfg: VLMConfig,
                           normalise, gen: torch.Generator, progress: bool, box_head: torch.nn.Linear | None = None,
                           boxes: torch.Tensor | None = None, fresh=None) -> list[float]:
    """Stage 1, as LLaVA's CLIP is trained before LLaVA: the vision tower learns what the pretraining data labels.

    ``head`` classifies each patch token of the LLaVA feature layer (background or the category of
    the object over it; see ``_scene_labels``), at the world's natural frequencies: the tower sees
    rare objects as web images show them, while the text rarely names them. ``box_head`` (region
    questions): a second, binary head learns ``boxes`` [N, G, G] (``_box_labels``: the patch is on or
    inside the red box), weighted ``cfg.box_weight``, so the tower sees the box. ``fresh(epoch)``
    (``cfg.tag_scenes``): that epoch's freshly rendered ``(pixels, labels)``, trained on beside the
    pretrain images (no red box on them). Returns each epoch's mean loss.
    """
    tower = model.model.vision_tower
    heads = list(head.named_parameters()) + (list(box_head.named_parameters()) if box_head is not None else [])
    opt = _adamw(list(tower.named_parameters()) + heads, cfg.tag_lr, cfg.weight_decay)
    n_own = len(pixels)
    n_all = n_own + (cfg.tag_scenes if fresh is not None else 0)
    total = math.ceil(n_all / cfg.tag_batch_size) * cfg.tag_epochs
    step, epoch_losses = 0, []
    bar = tqdm(total=total, desc="vlm stage 1 (vision tower)", unit="step", file=sys.stderr, disable=not progress)
    for epoch in range(cfg.tag_epochs):
        fx, fy = fresh(epoch) if fresh is not None else (pixels[:0], labels[:0])
        order, losses = torch.randperm(n_all, generator=gen), []
        for i in range(0, len(order), cfg.tag_batch_size):
            idx = order[i : i + cfg.tag_batch_size]
            own, new = idx[idx < n_own], idx[idx >= n_own] - n_own
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg.tag_lr, min(cfg.warmup_steps, total // 10 + 1))
            x, y = torch.cat([pixels[own], fx[new]]), torch.cat([labels[own], fy[new]])
            flip = torch.rand(len(idx), generator=gen) < 0.5  # mirror half the batch (stage 1 only: texts say left/right)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            y = torch.where(flip.view(-1, 1, 1), y.flip(2), y)
            hidden = _patch_tokens(model, normalise(x))
            loss = _patch_loss(head, hidden, y, weight)
            if box_head is not None:
                b = torch.cat([boxes[own], boxes.new_zeros((len(new), *boxes.shape[1:]))])
                b = torch.where(flip.view(-1, 1, 1), b.flip(2), b)
                loss = loss + cfg.box_weight * _box_loss(box_head, hidden, b, cfg.bg_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        epoch_losses.append(float(np.mean(losses)))
    bar.close()
    return epoch_losses


def _forward_with_visual(model, ids: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor, labels: torch.Tensor):
    """The language model's forward with ``visual`` [B, T, D] in the image-token slots of ``ids``.

    With ``visual = projector(_patch_tokens(model, pixel_values))`` it is the stock
    ``model(input_ids, pixel_values, labels)`` (``get_image_features`` with the "default" strategy,
    ``masked_scatter``), written out so the visual tokens are at hand.
    """
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == model.config.image_token_id).unsqueeze(-1), visual.to(embeds.dtype))
    return model(inputs_embeds=embeds, attention_mask=mask, labels=labels)


@torch.no_grad()
def _tower_features(model, pixels: torch.Tensor, normalise, batch: int = 64) -> torch.Tensor:
    """The frozen tower's patch tokens [N, T, D] of every image, computed once."""
    model.model.vision_tower.eval()
    return torch.cat([_patch_tokens(model, normalise(pixels[i : i + batch])) for i in range(0, len(pixels), batch)])


def _marker_ids(tokenizer) -> torch.Tensor:
    """Token ids of " red box": their mean input embedding marks the image slots a region question's box covers."""
    return torch.tensor(tokenizer(" red box", add_special_tokens=False).input_ids)


def _name_table(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [1 + K, L] (padded) and mask of each patch label's word: 0 the pad token, 1 + i the i-th category's name."""
    from rtrt.runtime.modules import display_name
    from rtrt.trainer.coda import CATEGORIES

    rows = [[tokenizer.pad_token_id]] + [tokenizer(" " + display_name(c), add_special_tokens=False).input_ids for c in CATEGORIES]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1.0
    return ids, mask


def _name_embeddings(model, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[1 + K, D] mean input embedding of each label's word (differentiable: the embeddings train)."""
    ids, mask = table
    emb = model.get_input_embeddings()(ids)  # [1 + K, L, D]
    return (emb * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)


def _pseudo_image(model, table, labels: torch.Tensor, gain: float, drop: float, gen: torch.Generator,
                  noise: float = 0.0, marks: tuple[torch.Tensor, torch.Tensor] | None = None,
                  unit_gain: torch.Tensor | None = None) -> torch.Tensor:
    """Visual tokens [B, T, D] made from patch labels [B, T]: gain * the label's name embedding, a share
    ``drop`` of the object patches shown as background, plus Gaussian noise of std ``noise`` times the
    names' RMS (times gain). ``marks``: ``(marker ids, in-box mask [B, T])``: slots on or inside a
    region question's red box also get gain * the marker's mean embedding (``_marker_ids``: " red
    box"), as the initial projector sends the tower's box head there. ``unit_gain`` [1 + K]: each
    label's name scaled by its factor (``rare_gain``; stage 2a's slot targets)."""
    if drop > 0:
        hide = (torch.rand(labels.shape, generator=gen) < drop) & (labels > 0)
        labels = labels.masked_fill(hide, 0)
    names = _name_embeddings(model, table)
    visual = gain * names[labels]
    if unit_gain is not None:
        visual = visual * unit_gain.to(visual.dtype)[labels].unsqueeze(-1)
    if marks is not None:
        marker_ids, inside = marks
        visual = visual + gain * inside.unsqueeze(-1).to(visual.dtype) * model.get_input_embeddings()(marker_ids).mean(0)
    if noise > 0:
        rms = names.detach().pow(2).mean().sqrt()
        visual = visual + (noise * gain * rms) * torch.randn(visual.shape, generator=gen)
    return visual


@torch.no_grad()
def _init_projector_from_head(model, head: torch.nn.Linear, tokenizer=None, gain: float = 0.25, logit: float = 1.0,
                              unit_gain: torch.Tensor | None = None, box_head: torch.nn.Linear | None = None,
                              box_logit: float = 1.0, quiet: bool = False) -> None:
    """Start the projector from the stage-1 patch classifier and, with ``tokenizer``, the words' embeddings.

    LLaVA's alignment stage teaches a fresh projector to map the tower's features into the word
    embedding space. Here it starts there: ``linear_1``'s first rows are the patch classifier (one
    unit per category), and ``linear_2`` sends each category's unit to the mean input embedding of
    the category's name (``gain / logit`` per unit of logit: a patch classified with logit ``logit``
    arrives as ``gain`` times the name's embedding, as stage 0b's pseudo-images show it), so a
    patch showing a dog arrives looking like the word "dog", which the language model has learned
    to read. Both layers are then trained as usual. ``unit_gain`` [k]: a factor per patch class (0
    background, 1 + i the i-th category) on its column (0: not sent to its name). ``quiet``: the
    columns of the other, random ``linear_1`` units start at zero, so they add nothing at first.
    ``box_head`` (region questions): one unit more, the red-box head, sent to the marker (the mean
    embedding of " red box", ``_marker_ids``) at ``gain / box_logit``, as stage 0b marks boxed slots.
    """
    proj = model.model.multi_modal_projector
    k = head.out_features
    units = k + (box_head is not None)
    if units > proj.linear_1.out_features:
        raise ValueError(f"projector width {proj.linear_1.out_features} < {units} patch classifier units")
    proj.linear_1.weight[:k] = head.weight
    proj.linear_1.bias[:k] = head.bias
    if box_head is not None:
        proj.linear_1.weight[k] = box_head.weight[0]
        proj.linear_1.bias[k] = box_head.bias[0]
    if tokenizer is None:
        return
    names = _name_embeddings(model, _name_table(tokenizer))  # row 0: the pad token (background)
    if names.shape[0] != k:
        raise ValueError(f"{k} patch classes but {names.shape[0]} label words")
    cols = (gain / logit) * names.T
    if unit_gain is not None:
        cols = cols * unit_gain.to(cols.dtype)
    if quiet:
        proj.linear_2.weight[:, units:] = 0.0
    proj.linear_2.weight[:, :k] = cols
    if box_head is not None:
        proj.linear_2.weight[:, k] = (gain / box_logit) * model.get_input_embeddings()(_marker_ids(tokenizer)).mean(0)
    proj.linear_2.bias.zero_()


@torch.no_grad()
def _typical_logit(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    """Mean logit the stage-1 head gives an object patch's own category (at least 1)."""
    total, count = 0.0, 0
    for i in range(0, len(features), batch):
        lab = labels[i : i + batch]
        own = head(features[i : i + batch]).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
        total += own[lab > 0].sum().item()
        count += int((lab > 0).sum())
    return max(1.0, total / max(1, count))


@torch.no_grad()
def _typical_box_logit(box_head: torch.nn.Linear, features: torch.Tensor, boxes: torch.Tensor, batch: int = 256) -> float:
    """Mean logit the stage-1 box head gives a patch on or inside the red box (at least 1)."""
    total, count = 0.0, 0
    for i in range(0, len(features), batch):
        inside = boxes[i : i + batch].flatten(1) > 0
        total += box_head(features[i : i + batch]).squeeze(-1)[inside].sum().item()
        count += int(inside.sum())
    return max(1.0, total / max(1, count))


def _train_answers(model, seqs, rows, features: torch.Tensor | None, gen, *, epochs: int, batch_size: int, lr: float,
                   cfg: VLMConfig, desc: str, progress: bool, pseudo=None, slot_target=None) -> list[float]:
    """Teacher-forced answer loss over ``seqs`` [(prompt ids, answer ids)], image ``rows[j]`` of ``features``.

    ``features``: the frozen tower's patch tokens per image (``_tower_features``); ``None`` for
    text-only prompts (no image tokens). ``pseudo``: ``(name table, patch labels [N, T], marks)``: the
    image slots hold ``_pseudo_image`` tokens of ``labels[rows[j]]`` instead (``features`` unused);
    ``marks``: ``None`` or ``(marker ids, in-box masks [N, T])`` (region questions' red boxes).
    ``slot_target``: ``(name table, patch labels [N, T], marks, unit gain [1 + K])`` with ``features``:
    adds ``cfg.align_slots`` times the projector's distance to the slots stage 0b showed (each
    label's name times its unit gain, ``_slot_targets``), relative to their size.
    Trains every parameter that requires grad. Returns each epoch's mean answer loss.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = _adamw(named, lr, cfg.weight_decay)
    params = [p for _, p in named]
    pad = model.config.pad_token_id
    lengths = [len(p) + len(a) for p, a in seqs]
    total = math.ceil(len(seqs) / batch_size) * epochs
    warmup = min(cfg.warmup_steps, total // 10 + 1)
    model.train()
    step, losses, epoch_losses = 0, [], []
    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not progress)
    for epoch in range(epochs):
        first = len(losses)
        for batch in _batches(lengths, batch_size, gen):
            width = max(lengths[j] for j in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, j in enumerate(batch):
                p, a = seqs[j]
                ids[r, : len(p) + len(a)] = torch.tensor(p + a)
                labels[r, len(p) : len(p) + len(a)] = torch.tensor(a)
                mask[r, : len(p) + len(a)] = 1
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, lr, warmup)
            if pseudo is not None:
                table, patch_labels, marks = pseudo
                picked = [rows[j] for j in batch]
                visual = _pseudo_image(model, table, patch_labels[picked], cfg.pseudo_gain, cfg.pseudo_drop, gen,
                                       cfg.pseudo_noise, marks and (marks[0], marks[1][picked]))
                result = _forward_with_visual(model, ids, mask, visual, labels)
            elif features is None:
                result = model(input_ids=ids, attention_mask=mask, labels=labels)
            else:
                picked = [rows[j] for j in batch]
                visual = model.model.multi_modal_projector(features[picked])
                result = _forward_with_visual(model, ids, mask, visual, labels)
            loss = result.loss
            if slot_target is not None and features is not None and cfg.align_slots > 0:
                target = _slot_targets(model, slot_target, picked, cfg.pseudo_gain)
                loss = loss + cfg.align_slots * _slot_loss(visual, target, slot_target[1][picked])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(result.loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-20:]):.3f}")
        epoch_losses.append(float(np.mean(losses[first:])))
    bar.close()
    return epoch_losses


def pseudo_region_samples(world: str | Path, samples: Sequence[Sample], index: dict[str, int], patch_labels: torch.Tensor,
                          image_processor, cfg: VLMConfig) -> tuple[list[Sample], torch.Tensor, torch.Tensor]:
    """Stage 0b's extra region questions (``cfg.pseudo_regions``): ``(samples, patch labels [M, G, G], box labels [M, G, G])``.

    For a seeded share ``pseudo_regions`` of the pretrain images (the general samples' images) with a
    rare object in view (its category on at least one patch of its box), one region question about
    one such object, drawn uniformly: the red box is the object's box (as the world's region
    annotations give it), the answer its category (``region_short_answer``), a hint as in
    ``_region_samples`` (share ``region_hint_prob``: 1 to ``hint_max`` of the image's rare objects in
    view, the boxed one or others). Stage 0b reads labels only, so these need no boxed image: each
    comes with its own rows of patch labels (its image's) and red-box labels, apart from the real
    samples' rows. The world's region annotations list rare objects as seldom as its texts name them
    (551 of 10,727 pretrain regions in the 0.9-rare-prob world, 111 of 1,832 kept region questions);
    with these the language model also learns to name a rare object in a red box: it knows every
    class, and what it misses later it misses because its eyes do not show it.
    """
    from rtrt.trainer.coda import CATEGORIES, REGION_QUESTION
    from rtrt.tools.demo.world import RARE_CATEGORIES

    from .probe import box_slots
    from .vfm import _world_config

    world = Path(world)
    wcfg = _world_config(world)
    grid = cfg.image_size // cfg.patch_size
    rng = random.Random(cfg.seed + 4)  # a stream of its own: the other samples do not move
    bases = {s.image for s in samples if s.box is None}
    out, labels, boxes = [], [], []
    for rel, scene in sorted(_scenes(world, "pretrain", bases), key=lambda t: t[0]):
        lab = patch_labels[index[rel]].flatten()
        seen = []
        for o in scene.objects:
            if o.category in RARE_CATEGORIES:
                slots = box_slots(o.box, (wcfg.width, wcfg.height), grid, image_processor)
                if slots and bool((lab[slots] == 1 + CATEGORIES.index(o.category)).any()):
                    seen.append((o, slots))
        if not seen or rng.random() >= cfg.pseudo_regions:
            continue
        o, slots = seen[rng.randrange(len(seen))]
        s = Sample(rel, REGION_QUESTION, region_short_answer(o.category), box=tuple(float(v) for v in o.box), base=rel)
        if cfg.region_hint_prob and rng.random() < cfg.region_hint_prob:
            rare = sorted({x.category for x, _ in seen})
            s.hint = rng.sample(rare, rng.randint(1, min(cfg.hint_max, len(rare))))
        box = torch.zeros(grid * grid)
        box[slots] = 1.0
        out.append(s)
        labels.append(lab.view(grid, grid))
        boxes.append(box.view(grid, grid))
    if not out:
        return [], patch_labels.new_zeros((0, grid, grid)), torch.zeros((0, grid, grid))
    return out, torch.stack(labels), torch.stack(boxes)


def hide_hinted(samples: Sequence[Sample], rows: Sequence[int], patch_labels: torch.Tensor, share: float, seed: int,
                boxes: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
    """Stage 0b's hidden hints (``cfg.pseudo_hint_hide``): ``(rows, patch labels, box labels)`` where a
    seeded share ``share`` of the general samples with a hint get a row of their own, their image's
    labels with every hinted category's patches set to background (0). Their answers (``_drawn_seqs``:
    the drawn categories + the hint) still name the hinted objects, which the language model then can
    read only from the hint: the runtime's hints name what its VLM misses. Region questions and
    unhinted samples keep their rows; ``boxes`` get all-zero rows beside the new ones."""
    from rtrt.trainer.coda import CATEGORIES

    rng = random.Random(seed + 5)  # a stream of its own: the other draws do not move
    rows, extra = list(rows), []
    n = len(patch_labels)
    for j, s in enumerate(samples):
        if s.box is not None or not s.hint or rng.random() >= share:
            continue
        lab = patch_labels[rows[j]].clone()
        for c in s.hint:
            lab[lab == 1 + CATEGORIES.index(c)] = 0
        rows[j] = n + len(extra)
        extra.append(lab)
    if not extra:
        return rows, patch_labels, boxes
    labels = torch.cat([patch_labels, torch.stack(extra)])
    if boxes is not None:
        boxes = torch.cat([boxes, boxes.new_zeros((len(extra), *boxes.shape[1:]))])
    return rows, labels, boxes


def _drawn_seqs(samples: Sequence[Sample], rows: Sequence[int], patch_labels: torch.Tensor, tokenizer, processor,
                cfg: VLMConfig, cache: dict) -> list[tuple[list[int], list[int]]]:
    """Stage-0b sequences whose answers name every category with a slot in the pseudo-image, plus the hint.

    The language model learns to name all it is shown, rare objects included (``pseudo_answers="drawn"``):
    it knows every class; what it will miss later, it misses because its eyes do not show it.
    Region questions keep their answer (the boxed object's category).
    """
    from rtrt.trainer.coda import CATEGORIES

    out = []
    for s, r in zip(samples, rows):
        drawn = {CATEGORIES[int(v) - 1] for v in patch_labels[r].unique().tolist() if v > 0}
        answer = s.answer if s.box is not None else hinted_answer(drawn, s.hint, cfg.hint_order)
        out.append((_prompt_ids(processor, s.question, s.hint, cache), _answer_ids(tokenizer, answer, cfg)))
    return out


def _slot_loss(visual: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Squared distance of the visual tokens to their targets over the targets' mean squared norm, the
    background slots (label 0) and the object slots weighing half each (objects cover ~2% of the slots:
    unweighted, the projector learns to show background everywhere)."""
    err = (visual - target).pow(2).sum(-1) / target.pow(2).sum(-1).mean().clamp_min(1e-12)
    obj = labels > 0
    if not obj.any() or obj.all():
        return err.mean()
    return 0.5 * err[obj].mean() + 0.5 * err[~obj].mean()


@torch.no_grad()
def _slot_targets(model, slot_target, picked: Sequence[int], gain: float) -> torch.Tensor:
    """[B, T, D] the slots stage 0b showed for images ``picked``, each name scaled by its unit gain (``rare_gain``)."""
    table, patch_labels, marks, unit_gain = slot_target
    return _pseudo_image(model, table, patch_labels[picked], gain, 0.0, torch.Generator(), 0.0,
                         marks and (marks[0], marks[1][picked]), unit_gain)


def save_half(model, processor, out: Path) -> None:
    """``save_pretrained`` with float16 tensors; config.json keeps float32 so loading upcasts."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    for f in sorted(out.glob("*.safetensors")):
        state = load_file(str(f))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(f), metadata={"format": "pt"})


@torch.no_grad()
def _round_to_half(model) -> None:
    """Round every parameter to float16 and back (the values ``save_half`` writes and loading upcasts)."""
    for p in model.parameters():
        p.copy_(p.half().float())


def _refit_linear(features: torch.Tensor, out: int, loss_fn, seed: int, steps: int = 300, lr: float = 1e-2) -> torch.nn.Linear:
    """A linear layer [D -> ``out``] fit on frozen patch tokens ``features`` [N, T, D] by ``loss_fn(logits [N*T, out])``:
    full-batch Adam on standardised features from a seeded start, folded back to act on raw ones."""
    x = features.flatten(0, 1).float()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], out)
    torch.nn.init.normal_(lin.weight, std=0.01, generator=gen)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.Adam(lin.parameters(), lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(lin(z)).backward()
            opt.step()
    head = torch.nn.Linear(x.shape[1], out)
    with torch.no_grad():
        head.weight.copy_(lin.weight / sd)
        head.bias.copy_(lin.bias - (lin.weight * (mu / sd)).sum(-1))
    return head


def _refit_head(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, seed: int) -> torch.nn.Linear:
    """A linear patch classifier fit on frozen patch tokens ``features`` [N, T, D] to ``labels`` [N, T] with
    class weights ``weight`` (stage 1's loss).

    The fit is convex: where stage 1's jointly trained head may end with a small category that never
    wins (measured: pedestrian, cyclist and traffic sign at 0-1% of their patches in one build, 44-62%
    in another, with towers equally separable), the refit head depends only on the tower.
    """
    y = labels.flatten()
    return _refit_linear(features, len(weight), lambda logits: F.cross_entropy(logits, y, weight=weight), seed)


def _refit_box_head(features: torch.Tensor, boxes: torch.Tensor, bg_weight: float, seed: int) -> torch.nn.Linear:
    """The red-box head refit as ``_refit_head`` refits the patch classifier (``_box_loss``'s BCE)."""
    t = boxes.flatten().float()
    w = torch.where(t > 0, 1.0, bg_weight)
    return _refit_linear(features, 1, lambda logits: F.binary_cross_entropy_with_logits(logits.squeeze(-1), t, weight=w), seed)


def _stage2(model, tokenizer, seqs, rows, pixels, normalise, patch_labels, boxes, head, box_head, gen, cfg: VLMConfig,
            progress: bool) -> tuple[list[float], list[float], float]:
    """Stage 2 on a model whose tower (and, from stage 2a, language model) stay frozen.

    ``head`` / ``box_head``: stage 1's heads; with ``cfg.head_refit`` they are refit on the frozen
    tower's features (``_refit_head``), the projector's other ``linear_1`` rows are drawn afresh and
    the stage draws from its own generator (seed ``cfg.seed + 2``), so stage 2 depends only on the
    saved weights, the world and ``cfg``. Returns (stage 2a losses, stage 2b losses, seconds).
    """
    from rtrt.trainer.coda import CATEGORIES
    from rtrt.tools.demo.world import RARE_CATEGORIES

    # Stage 2 (LLaVA-1.5's alignment and instruction tuning in one): the tower frozen, its patch
    # tokens computed once; the projector (started from the stage-1 patch classifier) and the
    # language model learn to answer.
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    t2 = time.time()
    features = _tower_features(model, pixels, normalise)
    unit_gain = torch.tensor([1.0] + [cfg.rare_gain if c in RARE_CATEGORIES else 1.0 for c in CATEGORIES])
    if cfg.head_refit:
        gen = torch.Generator().manual_seed(cfg.seed + 2)
    if cfg.head_refit and cfg.tag_epochs:
        balance = cfg.tag_balance if cfg.refit_balance is None else cfg.refit_balance
        weight = tag_class_weights(patch_labels, 1 + len(CATEGORIES), cfg.bg_weight, balance)
        head = _refit_head(features, patch_labels.flatten(1), weight, cfg.seed + 2)
        if box_head is not None:
            box_head = _refit_box_head(features, boxes.flatten(1), cfg.bg_weight, cfg.seed + 2)
        proj = model.model.multi_modal_projector
        with torch.no_grad():
            for lin in (proj.linear_1, proj.linear_2):
                lin.weight.normal_(0.0, cfg.init_range, generator=gen)
                lin.bias.zero_()
    if cfg.tag_epochs:
        logit = _typical_logit(head, features, patch_labels.flatten(1)) if cfg.pseudo_epochs else 1.0
        box_logit = _typical_box_logit(box_head, features, boxes) if box_head is not None and cfg.pseudo_epochs else 1.0
        _init_projector_from_head(model, head, tokenizer if cfg.text_epochs or cfg.pseudo_epochs else None,
                                  gain=cfg.pseudo_gain, logit=logit, unit_gain=unit_gain, box_head=box_head, box_logit=box_logit,
                                  quiet=cfg.projector_quiet)
    align_losses = []
    if cfg.align_epochs:
        # Stage 2a (LLaVA's feature alignment): the projector alone, the language model frozen, so
        # the only way to a lower loss is visual tokens the language model already reads.
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
        slot_target = None
        if cfg.align_slots and patch_labels is not None:
            slot_target = (_name_table(tokenizer), patch_labels.flatten(1),
                           None if boxes is None else (_marker_ids(tokenizer), boxes.flatten(1) > 0), unit_gain)
        align_losses = _train_answers(model, seqs, rows, features, gen, epochs=cfg.align_epochs, batch_size=cfg.batch_size,
                                      lr=cfg.align_lr, cfg=cfg, desc="vlm stage 2a (projector)", progress=progress,
                                      slot_target=slot_target)
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    # Stage 2b (LLaVA's instruction tuning): projector and language model.
    epoch_losses = _train_answers(
        model, seqs, rows, features, gen,
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, cfg=cfg, desc="vlm stage 2b (answers)",
        progress=progress,
    ) if cfg.epochs else []
    t_answers = time.time() - t2
    return align_losses, epoch_losses, t_answers


def _stage2_and_save(model, processor, out: Path, *args):
    """``_stage2(model, processor.tokenizer, *args)``, then the model in eval mode saved to ``out`` (``save_half``)."""
    result = _stage2(model, processor.tokenizer, *args)
    model.eval()
    model.requires_grad_(True)
    save_half(model, processor, out)
    return result


def _image_inputs(world: Path, samples: Sequence[Sample], processor, cfg: VLMConfig, progress: bool):
    """The pretraining images (uint8 pixels, their index, the normaliser) and the samples' token ids
    (prompt, answer); ``cache`` holds the prompts' ids for the later stages."""
    pixels, index = _load_pixels(world, [s.image for s in samples], processor.image_processor, "vlm images", progress)
    normalise = _normaliser(processor.image_processor)
    cache: dict = {}
    seqs = [(_prompt_ids(processor, s.question, s.hint, cache), _answer_ids(processor.tokenizer, s.answer, cfg)) for s in samples]
    return pixels, index, normalise, cache, seqs


def _label_inputs(world: Path, samples: Sequence[Sample], index: dict[str, int], processor, cfg: VLMConfig):
    """Each image's patch labels (stages 0b-2; ``None`` when neither runs), each sample's image row, and
    for region questions which patches of each boxed image lie on or inside its red box (else ``None``)."""
    patch_labels = _scene_labels(world, index, cfg.image_size, cfg.patch_size,
                                 {s.image: s.base for s in samples if s.base}) if cfg.tag_epochs or cfg.pseudo_epochs else None
    rows = [index[smp.image] for smp in samples]
    boxes = None
    if "region_perception" in cfg.tasks:
        from .vfm import _world_config

        wcfg = _world_config(world)
        boxes = _box_labels(samples, index, (wcfg.width, wcfg.height), cfg.image_size // cfg.patch_size, processor.image_processor)
    return patch_labels, rows, boxes


def pretrain_vlm(world: str | Path, out: str | Path, cfg: VLMConfig, progress: bool = True) -> dict:
    """Learn the tokenizer, build and pretrain the VLM on ``world``'s pretrain split, save it to ``out``.

    Returns a report (sizes, losses, seconds); it is also written to ``out/demo_vlm.json``.
    """
    from rtrt.trainer.coda import CATEGORIES
    from rtrt.tools.demo.world import COMMON_CATEGORIES, RARE_CATEGORIES

    from .tokenizer import name_words, train_tokenizer

    world, out = Path(world), Path(out)
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    samples = load_samples(world, "pretrain", cfg)
    if not samples:
        raise ValueError(f"{world}: no pretraining samples")
    # The chat template's words belong to the text a tokenizer is learned from, as on the web.
    corpus = [f"USER: {q} ASSISTANT:" for q in sorted({s.question for s in samples})]
    corpus += [_user_text("", s.hint) for s in samples if s.hint] + [s.answer for s in samples]
    words = name_words((*COMMON_CATEGORIES, *RARE_CATEGORIES), shared_only=cfg.name_tokens == "shared") \
        if cfg.name_tokens != "none" else ()  # the world's categories
    tokenizer = train_tokenizer(corpus, cfg.vocab_size, word_tokens=words)
    model, processor = build_vlm(tokenizer, cfg)
    pixels, index, normalise, cache, seqs = _image_inputs(world, samples, processor, cfg, progress)
    t_data = time.time() - t0

    gen = torch.Generator().manual_seed(cfg.seed)
    # Stage 0 (LLaVA starts from a text-pretrained LLM): the language model on text-only prompts.
    t0b = time.time()
    text_losses = []
    if cfg.text_epochs:
        texts = text_samples([s for s in samples if s.box is None], cfg)  # a text prompt shows no red box
        text_seqs = [(_text_prompt_ids(tokenizer, s.question, s.hint, cache), _answer_ids(tokenizer, s.answer, cfg))
                     for s in texts]
        model.model.vision_tower.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(False)
        text_losses = _train_answers(model, text_seqs, None, None, gen, epochs=cfg.text_epochs, batch_size=cfg.batch_size,
                                     lr=cfg.lr, cfg=cfg, desc="vlm stage 0 (text)", progress=progress)
        model.requires_grad_(True)
    patch_labels, rows, boxes = _label_inputs(world, samples, index, processor, cfg)
    pseudo_losses = []
    pseudo_regions = 0
    if cfg.pseudo_epochs:
        # Stage 0b: the language model learns to read the image slots before the tower exists. Each
        # slot holds the name embedding of what its patch shows (``_pseudo_image``), the prompts and
        # answers are stage 2's, so the answer's common objects must be read from the slots and the
        # hint's rare ones from the hint; rare objects in the slots go unnamed as the text leaves them.
        model.model.vision_tower.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(False)
        samples0b, rows0b, labels0b, boxes0b, seqs0b = samples, rows, patch_labels, boxes, seqs
        if cfg.pseudo_regions:
            extra, extra_labels, extra_boxes = pseudo_region_samples(world, samples, index, patch_labels,
                                                                     processor.image_processor, cfg)
            n = len(patch_labels)
            samples0b = [*samples, *extra]
            pseudo_regions = len(extra)
            rows0b = [*rows, *range(n, n + len(extra))]
            labels0b = torch.cat([patch_labels, extra_labels])
            boxes0b = torch.cat([boxes, extra_boxes])
            seqs0b = seqs + [(_prompt_ids(processor, s.question, s.hint, cache), _answer_ids(tokenizer, s.answer, cfg))
                             for s in extra]
        if cfg.pseudo_hint_hide:
            rows0b, labels0b, boxes0b = hide_hinted(samples0b, rows0b, labels0b, cfg.pseudo_hint_hide, cfg.seed, boxes0b)
        pseudo_seqs = seqs0b if cfg.pseudo_answers == "named" else _drawn_seqs(samples0b, rows0b, labels0b, tokenizer, processor, cfg, cache)
        pseudo_losses = _train_answers(model, pseudo_seqs, rows0b, None, gen, epochs=cfg.pseudo_epochs, batch_size=cfg.batch_size,
                                       lr=cfg.lr, cfg=cfg, desc="vlm stage 0b (pseudo-images)", progress=progress,
                                       pseudo=(_name_table(tokenizer), labels0b.flatten(1),
                                               None if boxes0b is None else (_marker_ids(tokenizer), boxes0b.flatten(1) > 0)))
        model.requires_grad_(True)
    t_text = time.time() - t0b
    t1 = time.time()
    head = torch.nn.Linear(cfg.vision_hidden, 1 + len(CATEGORIES))
    class_weight = tag_class_weights(patch_labels, 1 + len(CATEGORIES), cfg.bg_weight, cfg.tag_balance)
    box_head = torch.nn.Linear(cfg.vision_hidden, 1) if boxes is not None else None  # region questions: the red box
    tag_losses = []
    if cfg.tag_epochs:
        fresh = functools.partial(_render_tower_scenes, world, cfg, image_processor=processor.image_processor) if cfg.tag_scenes else None
        tag_losses = _pretrain_vision_tower(model, head, pixels, patch_labels, class_weight, cfg, normalise, gen, progress,
                                            box_head, boxes, fresh)
    t_tag = time.time() - t1

    if cfg.head_refit:
        # Stage 2 from the state that ships: the frozen tower and language model at float16 (what
        # ``save_half`` writes), so ``realign_vlm`` on the saved VLM redoes exactly this stage 2.
        _round_to_half(model)
    align_losses, epoch_losses, t_answers = _stage2_and_save(model, processor, out, seqs, rows, pixels, normalise, patch_labels,
                                                             boxes, head, box_head, gen, cfg, progress)
    report = {
        "config": dataclasses.asdict(cfg),
        "samples": len(seqs),
        "region_samples": sum(s.box is not None for s in samples),
        "pseudo_region_samples": pseudo_regions,
        "images": len(index),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "tokens_per_image": (cfg.image_size // cfg.patch_size) ** 2,
        "stage0_epoch_losses": text_losses,
        "stage0b_epoch_losses": pseudo_losses,
        "stage1_epoch_losses": tag_losses,
        "stage2a_epoch_losses": align_losses,
        "epoch_losses": epoch_losses,
        "seconds_data": round(t_data, 1),
        "seconds_stage0": round(t_text, 1),
        "seconds_stage1": round(t_tag, 1),
        "seconds_stage2": round(t_answers, 1),
        "seconds": round(time.time() - t0, 1),
    }
    (out / "demo_vlm.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# The fields only stage 2 (with the language model frozen: ``epochs=0``) reads: ``realign_vlm`` may change them.
STAGE2_FIELDS = frozenset({"head_refit", "refit_balance", "align_epochs", "align_lr", "align_slots", "projector_quiet", "rare_gain"})


def realign_vlm(src: str | Path, world: str | Path, out: str | Path, cfg: VLMConfig, progress: bool = True) -> dict:
    """Redo stage 2 on the VLM saved in ``src`` and save the result to ``out``.

    ``src`` is a VLM that ``pretrain_vlm(world, ..., cfg)`` built with the same stages 0-1 (its
    config may differ only in ``STAGE2_FIELDS``; its tokenizer, language model and vision tower are
    kept, its projector is rebuilt). ``cfg.head_refit`` and ``cfg.epochs == 0`` are required: with them, stage 2 depends only on those saved weights, the world and ``cfg``, so the
    result equals what ``pretrain_vlm`` with ``cfg`` writes (tested on the tiny preset), in the time of
    stage 2 alone. Returns ``src``'s report with stage 2's losses and seconds replaced.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from rtrt.trainer.coda import CATEGORIES

    if not cfg.head_refit:
        raise ValueError("realign_vlm needs head_refit=True (only then is stage 2 a function of the saved VLM)")
    if cfg.epochs:
        raise ValueError(f"realign_vlm needs epochs=0 (stage 2b trains the language model, which the saved VLM holds after it), got {cfg.epochs}")
    src, world, out = Path(src), Path(world), Path(out)
    t0 = time.time()
    old = json.loads((src / "demo_vlm.json").read_text())
    saved = {**dataclasses.asdict(VLMConfig()), **old.get("config", {})}
    saved["tasks"] = tuple(saved["tasks"])
    differ = sorted(k for k, v in dataclasses.asdict(cfg).items() if saved.get(k) != v and k not in STAGE2_FIELDS)
    if differ:
        raise ValueError(f"{src} was pretrained with other stages 0-1 than cfg: {', '.join(differ)} differ")
    model = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(src)
    samples = load_samples(world, "pretrain", cfg)
    if not samples:
        raise ValueError(f"{world}: no pretraining samples")
    pixels, index, normalise, _, seqs = _image_inputs(world, samples, processor, cfg, progress)
    patch_labels, rows, boxes = _label_inputs(world, samples, index, processor, cfg)
    head = torch.nn.Linear(cfg.vision_hidden, 1 + len(CATEGORIES))  # replaced by the refit
    box_head = torch.nn.Linear(cfg.vision_hidden, 1) if boxes is not None else None
    model.requires_grad_(True)
    model.train()
    _round_to_half(model)
    align_losses, epoch_losses, t_answers = _stage2_and_save(model, processor, out, seqs, rows, pixels, normalise, patch_labels,
                                                             boxes, head, box_head, None, cfg, progress)
    # Stage 2 changes only the weights: the config and the processor's files are src's, byte for byte
    # (saving the loaded objects again would add loading-time keys such as the sub-configs' dtype).
    kept = sorted(f.name for f in src.iterdir() if f.is_file() and f.name not in ("model.safetensors", "demo_vlm.json"))
    written = sorted(f.name for f in out.iterdir() if f.is_file() and f.name != "model.safetensors")
    if written != kept:
        raise RuntimeError(f"realign_vlm wrote {written}, the saved VLM has {kept}")
    for name in kept:
        shutil.copyfile(src / name, out / name)
    report = {**old, "config": dataclasses.asdict(cfg), "stage2a_epoch_losses": align_losses, "epoch_losses": epoch_losses,
              "seconds_stage2": round(t_answers, 1), "realigned_from": str(src), "seconds_realign": round(time.time() - t0, 1)}
    (out / "demo_vlm.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def evaluate_recall(
    vlm: str | Path,
    world: str | Path,
    split: str = "test",
    hints: str = "none",
    limit: int = 0,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> dict:
    """Micro recall (0-100) of common and rare categories in the VLM's general-perception answers.

    ``hints``: ``"none"``, or ``"rare"`` (oracle hints: the rare categories the reference names).
    Loads through ``rtrt.runtime.vlm.load_vlm`` and answers with greedy ``generate``.
    """
    from PIL import Image

    from rtrt.runtime.vlm import load_vlm
    from rtrt.tools.judge import find_mentions
    from rtrt.tools.demo.world import COMMON_CATEGORIES, RARE_CATEGORIES
    from rtrt.trainer.coda import read_tasks, task_file

    if hints not in ("none", "rare"):
        raise ValueError(f"hints must be 'none' or 'rare', got {hints!r}")
    world = Path(world)
    family = load_vlm(vlm, dtype=torch.float32)
    records = read_tasks(task_file(_task_dir(world, split), "general_perception"))
    if limit:
        records = records[:limit]
    max_new = max_new_tokens or family.model.generation_config.max_new_tokens or 320
    common, rare = set(COMMON_CATEGORIES), set(RARE_CATEGORIES)
    hit = {"common": 0, "rare": 0}
    tot = {"common": 0, "rare": 0}
    false_mentions = {"common": 0, "rare": 0}
    examples = []
    bar = tqdm(total=len(records), desc=f"vlm eval {split} hints={hints}", unit="img", file=sys.stderr, disable=not progress)
    for i in range(0, len(records), batch_size):
        recs = records[i : i + batch_size]
        refs = [find_mentions(r.answer or "") for r in recs]
        hint_lists = [sorted(ref & rare) for ref in refs] if hints == "rare" else None
        images = [Image.open(world / r.image).convert("RGB") for r in recs]
        batch = family.prepare(images, [r.question for r in recs], hint_lists)
        answers = family.decode(family.generate(batch, max_new_tokens=max_new))
        for rec, ref, ans in zip(recs, refs, answers):
            pred = find_mentions(ans)
            for kind, cats in (("common", common), ("rare", rare)):
                tot[kind] += len(ref & cats)
                hit[kind] += len(ref & pred & cats)
                false_mentions[kind] += len((pred - ref) & cats)
            if len(examples) < 3:
                examples.append({"image": rec.image, "reference": rec.answer, "answer": ans.strip()})
        bar.update(len(recs))
    bar.close()
    recall = {k: (100.0 * hit[k] / tot[k] if tot[k] else None) for k in hit}
    return {
        "split": split, "hints": hints, "items": len(records), "recall": recall, "support": tot,
        "false_mentions": false_mentions, "examples": examples,
    }
