"""``rtrt analyze attention``: where the VLM looks when it names an object, without and with visual refinement.

    rtrt analyze attention --out attention_out                    # the demo bundle on the demo world's test split
    rtrt analyze attention --bundle B --data WORLD --split val --limit 50 --out OUT

The paper's motivating analysis (issue 14, item 6). For each image of a CODA-LM-format split the
bundle's VLM (transformers, eager attention) answers the general-perception question without hints,
once as it is (``baseline``) and once with the bundle's adapter refining its visual tokens
(``refined``, the pipeline's own refinement); then one teacher-forced forward over prompt + that
answer (the family's ``forward``, the ``inputs_embeds`` path ``generate`` takes) returns every
decoder layer's attention. ``--answers reference`` teacher-forces the split's reference answer
instead, so both conditions read the same tokens and only the visual tokens differ.

The queries are the answer's object-name tokens: the tokens that overlap a CODA-LM category's
display name (``traffic cone``, also plural) in the answer text, "ego car" excepted (it is the
camera's car). With ``--query predict`` the query of each name token is the position before it,
the one whose output predicted the name. Per query token and layer the attention, averaged over
heads, splits into four shares that sum to 1: image tokens whose patch overlaps a box of a class
the bundle covers (``rare``), of any other object (``common``; a patch with both is rare), the
other image tokens (``background``) and every other position (``text``). Per patch relative to
uniform is share / (patches in the group / all image patches): 1 is what a token that spread all
its attention evenly over the image would give each patch; values are averaged over name tokens
(and so over heads), each group over the tokens whose image has such patches.

Objects: a world written by ``rtrt world`` (``world.json`` beside its splits) annotates at most
``max_regions`` objects per image, so every drawn object is recovered by sampling the scene again
from the world's seed, checked against the annotated regions (any mismatch, or other data: the
annotated regions only; the JSON says which). Patches follow LLaVA's layout: a ``grid x grid`` row-
major grid over the processor's resized and centre-cropped image, CLS dropped by the "default"
feature strategy (``rtrt.tools.demo.probe.box_slots``); other families are refused.

Writes ``attention.json`` (per layer, per condition, and every image's answers), ``attention.md``
(the tables) and ``attention.png`` (relative attention per layer) into ``--out``, each atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

__all__ = [
    "GROUPS", "CONDITIONS", "QUERIES", "ANSWERS", "ImageAttention", "object_name_spans", "token_spans", "name_queries",
    "patch_groups", "group_shares", "aggregate", "middle_layers", "world_objects", "eager_attention", "image_attention",
    "run_attention", "report_markdown", "plot_png", "write_report", "parse_args", "main",
]

GROUPS = ("rare", "common", "background", "text")  # the four shares of a query's attention, in array order
RARE, COMMON, BACKGROUND, TEXT = range(4)
CONDITIONS = ("baseline", "refined")  # adapter off, adapter on (hints off in both)
QUERIES = ("name", "predict")  # a name token's own attention row, or the row that predicted it
ANSWERS = ("generated", "reference")  # what is teacher-forced: the VLM's own answer, or the split's reference
FILES = ("attention.json", "attention.md", "attention.png")


@dataclass
class ImageAttention:
    """One image under one condition: the answer read and its name tokens' attention."""

    answer: str  # the teacher-forced answer's text
    names: list[str]  # the category of each query token, in answer order
    shares: np.ndarray  # [layers, queries, 4] head-averaged attention on GROUPS; each [l, q] sums to 1
    fractions: np.ndarray  # [3] the image's rare, common and background patches over all its patches


# ---------------------------------------------------------------------------------------------- names
@lru_cache(maxsize=1)
def _name_matcher() -> tuple[re.Pattern, dict[str, str]]:
    from rtrt.runtime.names import display_name
    from rtrt.trainer.coda import CATEGORIES

    form_to_cat: dict[str, str] = {}
    for cat in CATEGORIES:
        name = display_name(cat).lower()
        form_to_cat[name] = cat
        form_to_cat[name + ("es" if name.endswith(("s", "x", "ch", "sh")) else "s")] = cat
    # Longest first, so "garbage bags" is not read as "garbage"; "ego car" is the camera's own car.
    alts = sorted(form_to_cat, key=lambda f: (-len(f), f))
    pattern = r"(?<![\w])(?<!ego )(?:" + "|".join(re.escape(f).replace(r"\ ", r" ") for f in alts) + r")(?![\w])"
    return re.compile(pattern), form_to_cat


def object_name_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, category)`` of each category display name in ``text`` (case and hyphens ignored)."""
    matcher, form_to_cat = _name_matcher()
    norm = re.sub(r"[-_/]", " ", text.lower())  # same length as text, so spans index it
    return [(m.start(), m.end(), form_to_cat[m.group(0)]) for m in matcher.finditer(norm)]


def token_spans(ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[tuple[int, int]]:
    """Character span of each token in ``decode(ids)``: where its prefix's decoded text grows the answer.

    Decoding prefixes rather than re-encoding the text keeps the VLM's own tokens; a token that
    adds nothing (a special token) gets an empty span.
    """
    full = decode(list(ids))
    spans, end = [], 0
    for k in range(len(ids)):
        grown = max(end, len(os.path.commonprefix([decode(list(ids[: k + 1])), full])))
        spans.append((end, grown))
        end = grown
    return spans


def name_queries(ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[tuple[int, str]]:
    """``(token index, category)`` of every token of ``ids`` that overlaps an object name of its text."""
    names = object_name_spans(decode(list(ids)))
    out = []
    for k, (s, e) in enumerate(token_spans(ids, decode)):
        hit = next((cat for ns, ne, cat in names if s < ne and e > ns), None)
        if hit is not None:
            out.append((k, hit))
    return out


# ---------------------------------------------------------------------------------------------- patches
def patch_groups(objects: Sequence[tuple[str, Sequence[float]]], rare_classes: set[str], image_size: tuple[int, int],
                 grid: int, processor) -> np.ndarray:
    """Group code (RARE, COMMON, BACKGROUND) of each of the ``grid * grid`` patches, row-major.

    ``objects``: ``(category, box [x, y, w, h])`` in input-image pixels; a patch a rare object's box
    touches is rare, else common when another object's box touches it.
    """
    from rtrt.tools.demo.probe import box_slots

    codes = np.full(grid * grid, BACKGROUND, dtype=np.int64)
    for rare in (False, True):  # rare last, so it wins where boxes meet
        for cat, box in objects:
            if (cat in rare_classes) == rare:
                codes[box_slots(box, image_size, grid, processor)] = RARE if rare else COMMON
    return codes


def group_shares(rows: np.ndarray, image_positions: Sequence[int], codes: np.ndarray) -> np.ndarray:
    """[layers, queries, 4]: each head-averaged attention row's mass on GROUPS.

    ``rows`` [layers, queries, S]: attention of each query over the S positions; ``image_positions``
    [P]: the sequence positions of the image's patch tokens, in patch order; ``codes`` [P] their group.
    """
    rows = np.asarray(rows, dtype=np.float64)
    image_positions = np.asarray(image_positions, dtype=np.int64)
    codes = np.asarray(codes)
    if image_positions.shape != codes.shape:
        from rtrt.runtime.errors import InputError

        raise InputError(f"{len(image_positions)} image positions for {len(codes)} patch groups")
    text = np.ones(rows.shape[-1], dtype=bool)
    text[image_positions] = False
    out = np.empty(rows.shape[:2] + (len(GROUPS),))
    for g in (RARE, COMMON, BACKGROUND):
        out[..., g] = rows[..., image_positions[codes == g]].sum(-1)
    out[..., TEXT] = rows[..., text].sum(-1)
    return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def aggregate(items: Sequence[ImageAttention], layers: int, names: Callable[[str], bool] | None = None) -> list[dict]:
    """Per layer: mean shares over the query tokens, and per-patch attention relative to uniform
    (share / patch fraction) averaged over the query tokens whose image has patches of that group.
    ``names``: only the query tokens whose category it accepts (every token when None)."""
    out = []
    for layer in range(layers):
        share = {g: [] for g in GROUPS}
        rel = {g: [] for g in GROUPS[:TEXT]}
        for it in items:
            keep = np.array([names is None or names(n) for n in it.names], dtype=bool)
            s = it.shares[layer][keep]  # [Q kept, 4]
            for g, name in enumerate(GROUPS):
                share[name] += s[:, g].tolist()
                if g != TEXT and it.fractions[g] > 0:
                    rel[name] += (s[:, g] / it.fractions[g]).tolist()
        out.append({"layer": layer, "relative": {g: _mean(v) for g, v in rel.items()},
                    "share": {g: _mean(v) for g, v in share.items()},
                    "queries": {g: len(v) for g, v in rel.items()}})
    return out


def middle_layers(n: int) -> list[int]:
    """The middle half of ``n`` decoder layers (every layer when there are fewer than 4)."""
    return list(range(n // 4, n - n // 4))


# ---------------------------------------------------------------------------------------------- data
def world_objects(data: Path, split: str, annotation_paths: Sequence[Path],
                  annotations) -> tuple[list[list[tuple[str, tuple]]], str]:
    """Every object of each image, and where they came from: ``"scene"`` (re-sampled ``rtrt world`` scenes,
    each holding every annotated region) or ``"annotations"`` (the annotated regions)."""
    from rtrt.tools.demo.world import SPLITS, WorldConfig, sample_scene

    regions = [[(r.category_name, tuple(r.box)) for r in a.region_perception] for a in annotations]
    try:
        meta = json.loads((Path(data) / "world.json").read_text())
        cfg = WorldConfig(**meta["config"]) if meta.get("format") == "rtrt-world" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        cfg = None
    if cfg is None or split not in SPLITS:
        return regions, "annotations"
    scenes = []
    for path, regs in zip(annotation_paths, regions):
        image_id = Path(path).stem.partition("_")[2]
        if not image_id.isdigit():
            return regions, "annotations"
        scene = sample_scene(cfg, np.random.default_rng([cfg.seed, SPLITS[split], int(image_id)]))
        objs = [(o.category, tuple(float(v) for v in o.box)) for o in scene.objects]
        if any(r not in objs for r in regs):
            return regions, "annotations"
        scenes.append(objs)
    return scenes, "scene"


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Eager attention (the implementation that computes its weights) while inside; the model's own after."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _attentions(vlm, batch, transform):
    """Every decoder layer's attention [1, heads, S, S] of one teacher-forced forward."""
    text = vlm.model.config.get_text_config()
    before = getattr(text, "output_attentions", False)
    text.output_attentions = True
    try:
        return vlm.forward(batch, transform).attentions
    finally:
        text.output_attentions = before


def image_attention(vlm, image, question: str, codes: np.ndarray, *, transform=None, answer_ids: Sequence[int] | None = None,
                    max_new_tokens: int = 96, query: str = "name") -> ImageAttention:
    """One image under one condition: answer (or read ``answer_ids``), teacher-force it, split its name tokens' attention.

    Run inside ``eager_attention(vlm.model)`` and ``torch.inference_mode()``.
    """
    from rtrt.runtime.errors import InputError, ModelMismatchError
    from rtrt.trainer.adapter import append_answers

    tokenizer = vlm.processor.tokenizer
    batch = vlm.prepare([image], [question], None)
    if answer_ids is None:
        answer_ids = vlm.generate(batch, transform=transform, max_new_tokens=max_new_tokens)[0].tolist()
    ids = list(answer_ids)
    if not ids:
        raise InputError("an empty answer has no tokens to analyse")

    def decode(x: list[int]) -> str:
        return tokenizer.decode(x, skip_special_tokens=True)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    full, _ = append_answers(batch, [ids], pad)
    prompt = int(batch["input_ids"].shape[1])
    image_positions = vlm.image_mask(full)[0].nonzero().flatten().tolist()
    if len(image_positions) != len(codes):
        raise ModelMismatchError(f"{len(image_positions)} image tokens in the prompt, the patch grid has {len(codes)}")
    queries = name_queries(ids, decode)
    positions = [prompt + k - (query == "predict") for k, _ in queries]
    attentions = _attentions(vlm, full, transform)
    rows = np.stack([a[0][:, positions, :].float().mean(0).cpu().numpy() for a in attentions])  # [L, Q, S]
    shares = group_shares(rows, image_positions, codes)
    fractions = np.array([(codes == g).mean() for g in (RARE, COMMON, BACKGROUND)])
    return ImageAttention(decode(ids).strip(), [c for _, c in queries], shares, fractions)


def run_attention(pipe, data: str | Path, *, split: str = "test", limit: int | None = None, max_new_tokens: int = 96,
                  query: str = "name", answers: str = "generated", progress: bool = True) -> dict:
    """The analysis over one split (see the module docstring); returns the JSON object ``write_report`` writes."""
    import torch
    from tqdm import tqdm

    from rtrt.runtime.errors import BundleError, InputError, ModelMismatchError
    from rtrt.runtime.image import load_image
    from rtrt.trainer.adapter import answer_token_ids
    from rtrt.trainer.coda import iter_annotations, read_tasks, task_file

    if query not in QUERIES or answers not in ANSWERS:
        raise InputError(f"query must be one of {QUERIES} and answers one of {ANSWERS}")
    data = Path(data)
    split_dir = data / "CODA-LM" / split
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: no CODA-LM split {split!r} under {data}")
    refs = read_tasks(task_file(split_dir / "vqa_anno", "general_perception"))
    found = list(iter_annotations(split_dir))
    refs = refs[:limit] if limit is not None else refs
    if not refs:
        raise InputError(f"{split_dir}: no general_perception questions")
    if len(found) < len(refs):
        raise InputError(f"{split_dir}: {len(refs)} questions but {len(found)} annotations")
    if answers == "reference" and any(not (r.answer or "").strip() for r in refs):
        raise InputError(f"{split_dir}: --answers reference needs a reference answer for every question")
    vlm = pipe.vlm
    if vlm is None or pipe.vlm_backend != "torch":
        raise InputError("the attention analysis needs the pipeline's transformers VLM (vlm_backend='torch')")
    if not getattr(pipe.backend, "has_adapter", False):
        raise BundleError(f"{pipe.bundle.root}: bundle has no adapter to refine with")
    tokens = (vlm.image_token_layout() or {}).get("tokens_per_image")
    grid = math.isqrt(int(tokens or 0))
    if vlm.name != "llava" or not tokens or grid * grid != int(tokens):
        raise ModelMismatchError(f"the attention analysis needs LLaVA's square patch grid without CLS, not {vlm.name!r} "
                                 f"with {tokens} tokens per image")
    paths = [p for p, _ in found[: len(refs)]]
    objects, objects_from = world_objects(data, split, paths, [a for _, a in found[: len(refs)]])
    rare_classes = set(pipe.class_names)
    W = torch.from_numpy(pipe.W).to(pipe.device)

    def refiner(image):
        # The pipeline's refinement: the bundle's adapter, W as keys and values, on every visual token
        # or (Pipeline.refine_mask_z) only where the detector fires.
        mask = pipe.refine_mask(image)
        bias = pipe.class_bias(image)  # an adapter trained with detector_bias reads the detector's z-scores

        def refine(v: "torch.Tensor") -> "torch.Tensor":
            cb = None if bias is None else torch.from_numpy(bias).to(device=v.device, dtype=v.dtype)[None]
            out = pipe.backend.refine(v[None], W.to(v.dtype)) if cb is None else pipe.backend.refine(v[None], W.to(v.dtype), class_bias=cb)
            out = torch.as_tensor(out)[0].to(device=v.device, dtype=v.dtype)
            if mask is None:
                return out
            return torch.where(torch.from_numpy(mask > 0).to(v.device)[:, None], out, v)
        return refine

    items: dict[str, list[ImageAttention]] = {c: [] for c in CONDITIONS}
    per_image = []
    layers = int(vlm.model.config.get_text_config().num_hidden_layers)
    bar = tqdm(total=len(refs), desc="attention", unit="img", disable=not progress)
    with eager_attention(vlm.model), torch.inference_mode():
        for ref, objs in zip(refs, objects):
            image = load_image(data / ref.image)
            codes = patch_groups(objs, rare_classes, image.size, grid, vlm.processor.image_processor)
            ids = answer_token_ids(vlm, ref.question, ref.answer, max_new_tokens) if answers == "reference" else None
            entry = {"image": ref.image}
            refine = refiner(image)
            for cond in CONDITIONS:
                it = image_attention(vlm, image, ref.question, codes, transform=refine if cond == "refined" else None,
                                     answer_ids=ids, max_new_tokens=max_new_tokens, query=query)
                items[cond].append(it)
                entry[cond] = {"answer": it.answer, "names": list(dict.fromkeys(it.names)), "name_tokens": len(it.names)}
            entry["patches"] = {g: int((codes == i).sum()) for i, g in enumerate(GROUPS[:TEXT])}
            per_image.append(entry)
            bar.update(1)
    bar.close()
    middle = middle_layers(layers)
    conditions = {}
    for cond in CONDITIONS:
        per_layer = aggregate(items[cond], layers)
        names = [n for it in items[cond] for n in it.names]
        conditions[cond] = {
            "name_tokens": len(names),
            "rare_name_tokens": sum(n in rare_classes for n in names),
            "images_with_names": sum(bool(it.names) for it in items[cond]),
            "layers": per_layer,
            "middle": {g: _mean([e["relative"][g] for e in (per_layer[i] for i in middle) if e["relative"][g] is not None])
                       for g in GROUPS[:TEXT]},
            # The same over the tokens that name a class the bundle covers: does a rare name look at rare patches?
            "rare_name_layers": aggregate(items[cond], layers, lambda n: n in rare_classes),
        }
    heads = int(vlm.model.config.get_text_config().num_attention_heads)
    return {
        "split": split, "images": len(refs), "answers": answers, "query": query, "objects_from": objects_from,
        "vlm": {"family": vlm.name, "layers": layers, "heads": heads, "grid": grid},
        "patches": {g: float(np.mean([e["patches"][g] for e in per_image])) for g in GROUPS[:TEXT]},
        "middle_layers": middle, "conditions": conditions, "per_image": per_image,
        "refine_mask_z": pipe.refine_mask_z,  # None: every visual token refined
        "refine_mask_classes": pipe.refine_mask_classes,  # any | reported | unhinted: whose cells that mask keeps
    }


# ---------------------------------------------------------------------------------------------- report
def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report_markdown(res: dict) -> str:
    """The tables, per layer, baseline vs refined: attention per patch relative to uniform, the four shares, and
    (when the answers name any) the rare-class name tokens' attention per patch relative to uniform."""
    b, r = res["conditions"]["baseline"], res["conditions"]["refined"]
    header = "| layer | " + " | ".join(f"{g} {c}" for g in GROUPS[:TEXT] for c in CONDITIONS) + " |"
    lines = [
        f"Attention of the answer's object-name tokens ({res['query']} rows, {res['answers']} answers) on "
        f"{res['images']} {res['split']} images; {b['name_tokens']} name tokens baseline ({b['rare_name_tokens']} of rare "
        f"classes), {r['name_tokens']} refined ({r['rare_name_tokens']} rare); objects from the {res['objects_from']}; "
        + ("every visual token refined." if res.get("refine_mask_z") is None else
           f"tokens refined where a class's detector z-score exceeds {res['refine_mask_z']:g} (--refine-mask-z)"
           + (", of the classes the detector reports (--refine-mask-classes reported)."
              if res.get("refine_mask_classes") == "reported" else ".")),  # unhinted: every class here (no hints)
        "",
        "Per patch, relative to uniform (1 = the image's attention spread evenly over its patches):",
        "",
        header,
        "|---|---|---|---|---|---|---|",
    ]
    for eb, er in zip(b["layers"], r["layers"]):
        cells = [_f(e["relative"][g]) for g in GROUPS[:TEXT] for e in (eb, er)]
        lines.append(f"| {eb['layer']} | " + " | ".join(cells) + " |")
    mid = res["middle_layers"]
    middle = " | ".join(_f(c["middle"][g]) for g in GROUPS[:TEXT] for c in (b, r))
    lines.append(f"| middle ({mid[0]}-{mid[-1]}) | {middle} |")
    lines += ["", "Shares of the attention (rare + common + background + text = 1):", "",
              "| layer | " + " | ".join(f"{g} {c}" for g in GROUPS for c in CONDITIONS) + " |",
              "|---|" + "---|" * (2 * len(GROUPS))]
    for eb, er in zip(b["layers"], r["layers"]):
        lines.append(f"| {eb['layer']} | " + " | ".join(_f(e["share"][g]) for g in GROUPS for e in (eb, er)) + " |")
    if b["rare_name_tokens"] or r["rare_name_tokens"]:
        lines += ["", f"Only the tokens naming a rare class ({b['rare_name_tokens']} baseline, {r['rare_name_tokens']} refined), "
                      "per patch relative to uniform:", "", header, "|---|---|---|---|---|---|---|"]
        for eb, er in zip(b["rare_name_layers"], r["rare_name_layers"]):
            lines.append(f"| {eb['layer']} | " + " | ".join(_f(e["relative"][g]) for g in GROUPS[:TEXT] for e in (eb, er)) + " |")
    return "\n".join(lines) + "\n"


_COLOURS = {"rare": (214, 39, 40), "common": (31, 119, 180), "background": (120, 120, 120)}


def _dashed(draw, a: tuple[float, float], b: tuple[float, float], colour, width: int, dash: float = 9, gap: float = 6) -> None:
    length = math.hypot(b[0] - a[0], b[1] - a[1])
    t = 0.0
    while t < length:
        t1 = min(length, t + dash)
        draw.line([(a[0] + (b[0] - a[0]) * t / length, a[1] + (b[1] - a[1]) * t / length),
                   (a[0] + (b[0] - a[0]) * t1 / length, a[1] + (b[1] - a[1]) * t1 / length)], fill=colour, width=width)
        t = t1 + gap


def plot_png(res: dict) -> bytes:
    """A line plot (PNG bytes): per layer, each group's attention per patch relative to uniform;
    baseline dashed, refined solid. Pillow only."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    width, height = 820, 460
    left, right, top, bottom = 80, 230, 56, 64
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=13)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    layers = res["vlm"]["layers"]
    series = {(g, c): [e["relative"][g] for e in res["conditions"][c]["layers"]] for g in GROUPS[:TEXT] for c in CONDITIONS}
    known = [v for vs in series.values() for v in vs if v is not None]
    top_value = max(known, default=1.0) * 1.12 or 1.0
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def xy(layer: int, v: float) -> tuple[float, float]:
        x = (x0 + x1) / 2 if layers == 1 else x0 + 20 + (x1 - x0 - 40) * layer / (layers - 1)
        return x, y0 - (y0 - y1) * v / top_value

    step = 10 ** math.floor(math.log10(top_value / 4))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if top_value / (step * m) <= 6)
    tick = 0.0
    while tick <= top_value:
        y = xy(0, tick)[1]
        d.line([(x0, y), (x1, y)], fill=(232, 232, 232))
        label = f"{tick:g}"
        d.text((x0 - 8 - d.textlength(label, font=small), y - 7), label, fill="black", font=small)
        tick = round(tick + step, 10)
    if top_value > 1.0:  # uniform
        y = xy(0, 1.0)[1]
        _dashed(d, (x0, y), (x1, y), (170, 170, 170), 1, 3, 4)
    every = max(1, math.ceil(layers / 16))
    for layer in range(0, layers, every):
        x = xy(layer, 0)[0]
        d.line([(x, y0), (x, y0 + 5)], fill="black")
        d.text((x - d.textlength(str(layer), font=small) / 2, y0 + 8), str(layer), fill="black", font=small)
    d.line([(x0, y1), (x0, y0), (x1, y0)], fill="black", width=1)
    for (g, c), values in series.items():
        points = [xy(i, v) for i, v in enumerate(values) if v is not None]
        for a, b in zip(points, points[1:]):
            if c == "refined":
                d.line([a, b], fill=_COLOURS[g], width=3)
            else:
                _dashed(d, a, b, _COLOURS[g], 2)
        for x, y in points:
            rad = 4 if c == "refined" else 3
            d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=_COLOURS[g] if c == "refined" else "white",
                      outline=_COLOURS[g], width=2)
    title = f"Object-name tokens' attention per image patch, relative to uniform ({res['images']} {res['split']} images)"
    d.text((left, 18), title, fill="black", font=font)
    label = "decoder layer"
    d.text(((x0 + x1 - d.textlength(label, font=font)) / 2, y0 + 30), label, fill="black", font=font)
    ylabel = "attention per patch / uniform"
    tw = int(d.textlength(ylabel, font=font)) + 4
    text_img = Image.new("RGB", (tw, 20), "white")
    ImageDraw.Draw(text_img).text((2, 1), ylabel, fill="black", font=font)
    rotated = text_img.rotate(90, expand=True)
    img.paste(rotated, (14, int((y0 + y1) / 2 - rotated.height / 2)))
    lx, ly = x1 + 24, y1 + 4
    for g in GROUPS[:TEXT]:
        for c in CONDITIONS:
            if c == "refined":
                d.line([(lx, ly + 8), (lx + 34, ly + 8)], fill=_COLOURS[g], width=3)
            else:
                _dashed(d, (lx, ly + 8), (lx + 34, ly + 8), _COLOURS[g], 2, 7, 4)
            d.text((lx + 42, ly), f"{g} {c}", fill="black", font=small)
            ly += 24
        ly += 8
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_report(res: dict, out_dir: str | Path) -> list[Path]:
    """``attention.json``, ``attention.md`` and ``attention.png`` in ``out_dir`` (created), each written atomically."""
    from rtrt.runtime.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f for f in FILES]
    atomic_write_json(paths[0], res)
    atomic_write_text(paths[1], report_markdown(res))
    atomic_write_bytes(paths[2], plot_png(res))
    return paths


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from rtrt.runtime.names import REFINE_MASK_CLASSES
    from rtrt.tools.infer import REFINE_CLASSES_HELP, REFINE_MASK_HELP, refine_mask_arg

    p = argparse.ArgumentParser(prog="rtrt analyze", description="Analyses of how the VLM sees, with and without the plug-in.")
    sub = p.add_subparsers(dest="analysis", required=True, metavar="{attention}")
    a = sub.add_parser("attention", help="per decoder layer, the attention of the answer's object names on rare, common and "
                                          "background patches, baseline vs refined",
                       description="Per decoder layer, the attention the answer's object-name tokens put on rare-object, "
                                   "common-object and background patches, without and with the adapter.")
    a.add_argument("--bundle", default=None, help="bundle directory (default: the embedded demo bundle)")
    a.add_argument("--data", default=None,
                   help="dataset root in CODA-LM layout (default: the demo world's test split, as rtrt eval)")
    a.add_argument("--split", default="test", help="split folder under CODA-LM/ (default: test)")
    a.add_argument("--limit", type=int, default=None, help="only the first N images")
    a.add_argument("--out", required=True, help="output folder for attention.json, attention.md and attention.png (created)")
    a.add_argument("--answers", default="generated", choices=ANSWERS,
                   help="teacher-force the VLM's own answer under each condition (default) or the split's reference answer")
    a.add_argument("--query", default="name", choices=QUERIES,
                   help="the name tokens' own attention rows (default) or the rows that predicted them (one position earlier)")
    a.add_argument("--max-new-tokens", type=int, default=96, help="answer length limit, also for reference answers (default: 96)")
    a.add_argument("--device", default="cpu", help="device of the VLM, e.g. cpu or cuda:0 (default: cpu)")
    a.add_argument("--refine-mask-z", type=refine_mask_arg, default="bundle", metavar="{Z,off,bundle}", help=REFINE_MASK_HELP)
    a.add_argument("--refine-mask-classes", default="bundle", choices=(*REFINE_MASK_CLASSES, "bundle"), help=REFINE_CLASSES_HELP)
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument("--verbose", action="store_true",
                   help="let third-party libraries print their logs, warnings and progress bars (the rtrt command line silences them)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from rtrt.runtime.assets import default_bundle
    from rtrt.runtime.pipeline import Pipeline
    from rtrt.tools.eval import check_run_args, demo_test_world

    check_run_args(args.limit, 1, args.max_new_tokens)
    pipe = Pipeline.from_bundle(args.bundle or default_bundle(), backend="torch", vlm_backend="torch", device=args.device,
                                max_new_tokens=args.max_new_tokens, refine_mask_z=args.refine_mask_z,
                                refine_mask_classes=args.refine_mask_classes)
    data = args.data if args.data is not None else demo_test_world(progress=not args.quiet)
    res = run_attention(pipe, data, split=args.split, limit=args.limit, max_new_tokens=args.max_new_tokens,
                        query=args.query, answers=args.answers, progress=not args.quiet)
    res["bundle"] = str(args.bundle or default_bundle())
    res["data"] = str(data)
    paths = write_report(res, args.out)
    print(report_markdown(res), end="")
    print(f"\nwritten to {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
