"""Probes that keep the demo honest (issue 14, item 7): is the base VLM grounded, is its LLM blind or
its eyes, does the adapter write what the LLM reads, does the detector rank.

    python -m rtrt.tools.demo.probe [--bundle B] [--data WORLD] [--split test] [--limit N] [--json OUT]

On the split's general-perception questions (the first ``--limit``), with the frozen VLM through
the pipeline's own path:

1. ``baseline``: how many distinct answers the VLM gives without hints and refinement, and how many
   name one category twice ("car, cat, cat.": ``repeated_categories``);
2. ``common``: per common class of the world, the share of answers naming it when the image holds
   it minus the share when it does not ("naming" is the keyword judge's ``find_mentions``, so it
   means what the score means);
3. ``oracle``: each rare object's class name embedding (the mean of the input-embedding rows of the
   name's tokens, written as the name appears inside a sentence, with its leading space) is written
   into the image-token slots its box overlaps (LLaVA's row-major grid over the processor's resized
   and cropped image); the answer without hints is asked again, and the share of rare objects whose
   class it names is reported. High: the LLM reads its image slots and knows the name. Also with
   ``VLMConfig.pseudo_gain`` times the name's embedding *added* to the object's own tokens, alone and
   with the " red box" marker's (item 6): what a residual refinement must write for general answers;
4. ``adapter``: tanh of its gate (the factor on its residual branch), and on the rare-object slots of
   the baseline visual tokens how often the head-averaged attention's argmax row of W is the
   object's own class (against chance 1 / C); and the cosine of each row of W with its class name's
   embedding (the oracle's vector: is W written in words the LLM reads?);
5. ``detector``: per-class AUROC of its scores (class annotated in the image vs not), and the mean;
6. ``region_oracle`` (where the split has region questions; the first ``--limit`` of those about a
   rare object): how often the answer names the rare object in the red box, without hints, as it
   is and with the box's slots showing it as the demo VLM's stage 0b showed a boxed object
   (``VLMConfig.pseudo_gain`` times its class name's embedding plus the " red box" marker's; the
   name alone would leave the LLM no way to tell which object the question is about). High with
   the embedding: the LLM names a rare object in a red box when its eyes show it. Also with the
   same vectors *added* to the box's own tokens (the name alone; the name and the marker), as a
   residual refinement such as the adapter writes: how much of the oracle an additive remedy can
   reach, and whether it must write the marker too; and what the adapter writes into those boxes
   (its change's size relative to the token, its cosine with the name's and the marker's embeddings).
7. ``hint_echo``: each image with rare objects answered with an oracle hint that names exactly its
   rare classes (no adapter): per rare class, how often the answer repeats the hinted name, and how
   many answers name a category twice. Low for a class: the text remedy cannot work for it, however
   good the detector (a VLM whose answers turn the hint "traffic cone" into "traffic light").

Only LLaVA-family VLMs have the fixed token grid the oracle and adapter probes need.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from rtrt.runtime.names import BACKENDS

__all__ = ["auroc", "box_slots", "repeated_categories", "run_probe", "report_text", "weakest_echo", "parse_args", "main"]


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels`` (Mann-Whitney, ties count half);
    None when every label is the same."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def box_slots(box: Sequence[float], image_size: tuple[int, int], grid: int, processor) -> list[int]:
    """Row-major indices of the ``grid x grid`` image-token cells a box [x, y, w, h] (input pixels) overlaps.

    The CLIP image processor resizes (shortest edge to ``size``, or to height x width) and then
    centre-crops; the grid covers the cropped image, so the box goes through the same two steps.
    """
    width, height = image_size
    size = processor.size
    short = getattr(size, "shortest_edge", None) if not isinstance(size, dict) else size.get("shortest_edge")
    if short:
        scale = short / min(width, height)
        rw, rh = width * scale, height * scale
    else:
        rh = size["height"] if isinstance(size, dict) else size.height
        rw = size["width"] if isinstance(size, dict) else size.width
    sx, sy = rw / width, rh / height
    cw, ch = rw, rh
    if getattr(processor, "do_center_crop", False):
        crop = processor.crop_size
        ch = crop["height"] if isinstance(crop, dict) else crop.height
        cw = crop["width"] if isinstance(crop, dict) else crop.width
    ox, oy = (rw - cw) / 2, (rh - ch) / 2
    x, y, w, h = box
    x0, x1 = (x * sx - ox) * grid / cw, ((x + w) * sx - ox) * grid / cw
    y0, y1 = (y * sy - oy) * grid / ch, ((y + h) * sy - oy) * grid / ch
    cols = range(max(0, math.floor(x0)), min(grid, math.ceil(x1)))
    rows = range(max(0, math.floor(y0)), min(grid, math.ceil(y1)))
    return [r * grid + c for r in rows for c in cols]


def _share(num: int, den: int) -> float | None:
    return num / den if den else None


def repeated_categories(answer: str) -> list[str]:
    """Categories a short answer names more than once ("car, cat, cat." -> ["cat"]), each list item
    judged alone with the keyword judge's matching (the demo VLM answers with a comma-separated list)."""
    from rtrt.tools.judge import find_mentions

    seen: list[str] = []
    for item in answer.split(":", 1)[-1].split(","):
        seen += sorted(find_mentions(item))
    return sorted({c for c in seen if seen.count(c) > 1})


def run_probe(pipe, data: str | Path, *, split: str = "test", limit: int | None = None, batch_size: int = 8,
              progress: bool = True) -> dict:
    """Every probe on one split; returns the JSON object ``main`` writes."""
    import torch
    from tqdm import tqdm

    from rtrt.runtime.errors import InputError, ModelMismatchError
    from rtrt.runtime.image import load_image
    from rtrt.tools.demo.vlm import VLMConfig, _marker_ids
    from rtrt.tools.demo.world import COMMON_CATEGORIES, RARE_CATEGORIES
    from rtrt.tools.judge import find_mentions
    from rtrt.trainer.coda import iter_annotations, read_tasks, task_file
    from rtrt.trainer.name_embeddings import name_embeddings

    data = Path(data)
    split_dir = data / "CODA-LM" / split
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: no CODA-LM split {split!r} under {data}")
    refs = read_tasks(task_file(split_dir / "vqa_anno", "general_perception"))
    anns = [a for _, a in iter_annotations(split_dir)]
    refs = refs[:limit] if limit is not None else refs
    if not refs:
        raise InputError(f"{split_dir}: no general_perception questions")
    if len(anns) < len(refs):
        raise InputError(f"{split_dir}: {len(refs)} questions but {len(anns)} annotations")
    vlm = pipe.vlm
    if vlm is None:
        raise InputError("the probes need a pipeline with its VLM loaded")
    if pipe.vlm_backend != "torch":
        raise InputError(f"the probes write into the VLM's visual tokens: load the pipeline with vlm_backend='torch', not {pipe.vlm_backend!r}")
    tokens_per_image = (vlm.image_token_layout() or {}).get("tokens_per_image")
    if vlm.name != "llava" or not tokens_per_image:
        raise ModelMismatchError(f"the oracle and adapter probes need LLaVA's fixed image-token grid, not {vlm.name!r}")
    grid = int(math.isqrt(int(tokens_per_image)))
    offset = int(tokens_per_image) - grid * grid  # 1 when the "full" strategy keeps CLIP's CLS token first
    image_processor = vlm.processor.image_processor
    names = list(pipe.class_names)
    W = torch.from_numpy(pipe.W)
    adapter = pipe.bundle.adapter().float()
    table = name_embeddings(vlm, RARE_CATEGORIES)  # [R, D] on the CPU, as W
    w_name_cosine = {c: float(torch.nn.functional.cosine_similarity(W[j].float(), table[RARE_CATEGORIES.index(c)], dim=0))
                     for j, c in enumerate(names) if c in RARE_CATEGORIES}
    name_emb = dict(zip(RARE_CATEGORIES, table.to(vlm.device)))
    # What each image holds: its regions (at most the world's max_regions) and what its reference text names.
    present = [sorted({r.category_name for r in a.region_perception} | find_mentions(ref.answer or ""))
               for a, ref in zip(anns, refs)]
    baseline: list[str] = []
    oracle_hits = oracle_total = 0
    added_hits = [0, 0]  # the stage-0b slot vector added to the object's own tokens: the name alone; with the red-box marker
    # Hint echo: each image with rare objects answered with an oracle hint naming exactly its rare classes (no adapter):
    # per class, how often the answer repeats a hinted name (the LLM's side of the text remedy).
    echo = {c: [0, 0] for c in RARE_CATEGORIES}  # class -> [hinted, named]
    echo_repeats = echo_answers = 0
    # The " red box" marker's embedding (stage 0b's boxed objects): the general oracle's and the region oracle's.
    with torch.inference_mode():
        marker = vlm.model.get_input_embeddings()(_marker_ids(vlm.processor.tokenizer).to(vlm.device)).float().mean(0)
    attn_hits = attn_total = 0
    det_scores: list[list[float]] = []
    bar = tqdm(total=len(refs), desc="probe", unit="img", disable=not progress)
    for start in range(0, len(refs), batch_size):
        chunk = list(range(start, min(start + batch_size, len(refs))))
        images = [load_image(data / refs[i].image) for i in chunk]
        questions = [refs[i].question for i in chunk]
        dets = pipe.detect_batch(images)
        det_scores += [[float(s) for s in r.scores] for r in dets]
        baseline += [r.answer for r in pipe.batch(images, questions, hints=False, refine=False, detections=dets)]
        batch = vlm.prepare(images, questions, None)
        with torch.inference_mode():
            V = vlm.visual_tokens(batch).float()
        # Rare objects of each image: (image in chunk, class, slot indices into V).
        rare = []
        for b, i in enumerate(chunk):
            for r in anns[i].region_perception:
                if r.category_name in RARE_CATEGORIES:
                    slots = box_slots(r.box, images[b].size, grid, image_processor)
                    if slots:
                        rare.append((b, r.category_name, [b * tokens_per_image + offset + s for s in slots]))
        # 4. adapter attention on the rare slots, with the adapter's own layers.
        with torch.inference_mode():
            # Head-averaged attention over W's rows (with a null slot, the share it leaves to the rows).
            attn = adapter(V[None], W, return_attention=True, class_bias=_bias(pipe, images))[1][0].mean(0)  # [N, C]
        for _, cat, slots in rare:
            if cat in names:
                attn_hits += int((attn[slots].argmax(-1) == names.index(cat)).sum())
                attn_total += len(slots)
        # 3. oracle: the class names' embeddings in their objects' slots, no hints.
        with_rare = sorted({b for b, _, _ in rare})
        if with_rare:
            sub = vlm.prepare([images[b] for b in with_rare], [questions[b] for b in with_rare], None)
            where = {b: n for n, b in enumerate(with_rare)}

            def write_names(v: torch.Tensor) -> torch.Tensor:
                v = v.clone()
                for b, cat, slots in rare:
                    base = (where[b] - b) * tokens_per_image
                    v[[base + s for s in slots]] = name_emb[cat].to(v.dtype)
                return v

            def add_names(marked: bool):
                def f(v: torch.Tensor) -> torch.Tensor:
                    v = v.clone()
                    for b, cat, slots in rare:
                        idx = [(where[b] - b) * tokens_per_image + s for s in slots]
                        v[idx] = v[idx] + (VLMConfig.pseudo_gain * (name_emb[cat] + (marker if marked else 0))).to(v.dtype)
                    return v
                return f

            with torch.inference_mode():
                out = vlm.generate(sub, transform=write_names, max_new_tokens=pipe.max_new_tokens)
                added = [vlm.decode(vlm.generate(sub, transform=add_names(m), max_new_tokens=pipe.max_new_tokens))
                         for m in (False, True)]
            answers = [a.strip() for a in vlm.decode(out)]
            oracle_hints = [sorted({cat for bb, cat, _ in rare if bb == b}, key=RARE_CATEGORIES.index) for b in with_rare]
            hinted = vlm.prepare([images[b] for b in with_rare], [questions[b] for b in with_rare], oracle_hints)
            with torch.inference_mode():
                hinted_answers = [x.strip() for x in vlm.decode(vlm.generate(hinted, max_new_tokens=pipe.max_new_tokens))]
            for hints_b, answer in zip(oracle_hints, hinted_answers):
                named = find_mentions(answer)
                for cat in hints_b:
                    echo[cat][0] += 1
                    echo[cat][1] += int(cat in named)
                echo_answers += 1
                echo_repeats += bool(repeated_categories(answer))
            for b, cat, _ in rare:
                oracle_total += 1
                oracle_hits += int(cat in find_mentions(answers[where[b]]))
                for j in range(2):
                    added_hits[j] += int(cat in find_mentions(added[j][where[b]]))
        bar.update(len(chunk))
    bar.close()

    mentions = [find_mentions(a) for a in baseline]
    common = {}
    for c in COMMON_CATEGORIES:
        with_c = [c in m for m, p in zip(mentions, present) if c in p]
        without_c = [c in m for m, p in zip(mentions, present) if c not in p]
        p_share, a_share = _share(sum(with_c), len(with_c)), _share(sum(without_c), len(without_c))
        common[c] = {"present": len(with_c), "absent": len(without_c), "named_when_present": p_share,
                     "named_when_absent": a_share,
                     "difference": None if p_share is None or a_share is None else p_share - a_share}
    per_class = {c: auroc([s[j] for s in det_scores], [c in p for p in present]) for j, c in enumerate(names)}
    known = [v for v in per_class.values() if v is not None]
    region = _region_oracle(pipe, vlm, split_dir, grid, offset, int(tokens_per_image), name_emb, marker, limit, batch_size,
                            pipe.max_new_tokens, progress, adapter, W)
    gates = torch.tanh(adapter.gate.detach().float()).flatten().tolist()
    return {
        "split": split,
        "images": len(refs),
        "baseline": {"distinct_answers": len(set(baseline)), "answers": len(baseline),
                     "with_a_repeat": sum(bool(repeated_categories(x)) for x in baseline)},
        "common": common,
        "oracle": {"rare_objects": oracle_total, "named": oracle_hits, "share": _share(oracle_hits, oracle_total),
                   # pseudo_gain x the name's embedding added to the object's own tokens, alone and with the red-box marker's
                   "named_with_name_added": added_hits[0], "share_with_name_added": _share(added_hits[0], oracle_total),
                   "named_with_name_and_marker_added": added_hits[1],
                   "share_with_name_and_marker_added": _share(added_hits[1], oracle_total)},
        "hint_echo": {"answers": echo_answers, "with_a_repeat": echo_repeats,
                      "hinted": sum(h for h, _ in echo.values()), "named": sum(n for _, n in echo.values()),
                      "share": _share(sum(n for _, n in echo.values()), sum(h for h, _ in echo.values())),
                      "per_class": {c: {"hinted": h, "named": n, "share": _share(n, h)} for c, (h, n) in echo.items() if h}},
        "adapter": {"tanh_gate": gates, "rare_patches": attn_total,
                    "attention_on_own_class": _share(attn_hits, attn_total), "chance": 1.0 / len(names),
                    "w_name_cosine": w_name_cosine,
                    "mean_w_name_cosine": sum(w_name_cosine.values()) / len(w_name_cosine) if w_name_cosine else None},
        "detector": {"auroc": per_class, "mean_auroc": sum(known) / len(known) if known else None},
        "region_oracle": region,
    }


def _bias(pipe, images, regions=None):
    """The adapter's ``class_bias`` [1, T, C] for a batch of images (a region question's: from its frame and box),
    as the pipeline computes it; None for an adapter trained without ``detector_bias``."""
    import torch

    regions = regions or [None] * len(images)
    parts = [pipe.class_bias(im, region=r) for im, r in zip(images, regions)]
    return None if parts[0] is None else torch.from_numpy(np.concatenate(parts))[None]


def _region_oracle(pipe, vlm, split_dir: Path, grid: int, offset: int, tokens: int, name_emb: dict, marker, limit: int | None,
                   batch_size: int, max_new_tokens: int, progress: bool, adapter, W) -> dict | None:
    """The oracle test on region questions: how often the frozen VLM names the rare object in the red box,
    as it is and with the box's slots written as stage 0b showed a boxed object (see the module's
    item 6). ``None`` without region questions.
    """
    import torch
    from tqdm import tqdm

    from rtrt.runtime.image import load_image
    from rtrt.tools.demo.vlm import VLMConfig, region_sources
    from rtrt.tools.demo.world import RARE_CATEGORIES
    from rtrt.tools.judge import find_mentions
    from rtrt.trainer.coda import read_tasks, region_frame, task_file

    path = task_file(split_dir / "vqa_anno", "region_perception")
    if not path.is_file():
        return None
    recs = read_tasks(path)
    items = [(r, reg) for r, (_, reg) in zip(recs, region_sources(split_dir, recs)) if reg.category_name in RARE_CATEGORIES]
    items = items[:limit] if limit is not None else items
    # The slots as the demo VLM's stage 0b showed a boxed object: gain * (its name's embedding + the " red box" marker's).
    gain = VLMConfig.pseudo_gain
    name_emb = {c: e.float().to(marker.device) for c, e in name_emb.items()}
    named = total = 0
    hits = [0, 0, 0]  # replaced by name + marker, name added, name + marker added
    change: dict[str, list[float]] = {"relative_norm": [], "cosine_with_name": [], "cosine_with_marker": [],
                                      "oracle_relative_norm": []}  # the additive oracle's write (name + marker), for scale
    cos = torch.nn.functional.cosine_similarity
    bar = tqdm(total=len(items), desc="region oracle", unit="q", disable=not progress)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = [load_image(split_dir.parent.parent / r.image) for r, _ in chunk]
        batch = vlm.prepare(images, [r.question for r, _ in chunk], None)
        slots = [[b * tokens + offset + k for k in box_slots(reg.box, images[b].size, grid, vlm.processor.image_processor)]
                 for b, (_, reg) in enumerate(chunk)]

        def write(replace: bool, marked: bool):
            # replace: the slots become the stage-0b vector; else it is added to the tower's own tokens
            # there (as a residual refinement such as the adapter writes).
            def f(v: torch.Tensor) -> torch.Tensor:
                v = v.clone()
                for b, (_, reg) in enumerate(chunk):
                    if slots[b]:
                        w = (gain * (name_emb[reg.category_name] + (marker if marked else 0))).to(v.dtype)
                        v[slots[b]] = w if replace else v[slots[b]] + w
                return v
            return f

        # What the adapter itself writes into the box (every token refined): its change's size
        # relative to the token and its direction against the name's and the marker's embeddings.
        with torch.inference_mode():
            V = vlm.visual_tokens(batch).float().cpu()
            frames = [load_image(split_dir.parent.parent / region_frame(r.image)) for r, _ in chunk]
            regions = [(x, y, x + w, y + h) for x, y, w, h in (reg.box for _, reg in chunk)]
            d = adapter(V[None], W.float(), class_bias=_bias(pipe, frames, regions))[0] - V
        for b, (_, reg) in enumerate(chunk):
            if slots[b]:
                db, vb = d[slots[b]], V[slots[b]]
                change["relative_norm"].append(float((db.norm(dim=-1) / vb.norm(dim=-1).clamp_min(1e-12)).mean()))
                change["cosine_with_name"].append(float(cos(db, name_emb[reg.category_name].cpu()[None]).mean()))
                change["cosine_with_marker"].append(float(cos(db, marker.cpu()[None]).mean()))
                oracle = (gain * (name_emb[reg.category_name] + marker)).cpu()
                change["oracle_relative_norm"].append(float((oracle.norm() / vb.norm(dim=-1).clamp_min(1e-12)).mean()))
        with torch.inference_mode():
            plain = vlm.decode(vlm.generate(batch, max_new_tokens=max_new_tokens))
            runs = [vlm.decode(vlm.generate(batch, transform=write(*how), max_new_tokens=max_new_tokens))
                    for how in ((True, True), (False, False), (False, True))]
        for k, (_, reg) in enumerate(chunk):
            total += 1
            named += int(reg.category_name in find_mentions(plain[k]))
            for j, answers in enumerate(runs):
                hits[j] += int(reg.category_name in find_mentions(answers[k]))
        bar.update(len(chunk))
    bar.close()
    oracle, added, added_marked = hits
    return {"rare_boxes": total, "named": named, "named_with_name_embedding": oracle,
            "share": _share(named, total), "share_with_name_embedding": _share(oracle, total),
            # Added to the box's own tokens, as a residual refinement writes: the name's embedding alone,
            # and the name's with the red-box marker's.
            "named_with_name_added": added, "share_with_name_added": _share(added, total),
            "named_with_name_and_marker_added": added_marked, "share_with_name_and_marker_added": _share(added_marked, total),
            "adapter_change_in_box": {k: (sum(v) / len(v) if v else None) for k, v in change.items()}}


def weakest_echo(echo: dict, n: int) -> str:
    """The ``n`` classes whose oracle hint is repeated least ("traffic cone 3 of 14, ..."; at equal shares the more hinted first)."""
    weak = sorted(echo["per_class"].items(), key=lambda kv: (kv[1]["share"], -kv[1]["hinted"], kv[0]))[:n]
    return ", ".join(f"{c.replace('_', ' ')} {v['named']} of {v['hinted']}" for c, v in weak)


def _fmt(v: float | None, pct: bool = True) -> str:
    return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")


def report_text(res: dict) -> str:
    """The short report ``main`` prints."""
    lines = [f"probes on {res['images']} {res['split']} images",
             f"baseline: {res['baseline']['distinct_answers']} distinct answers of {res['baseline']['answers']}",
             "common classes, named when present - when absent:"]
    for c, e in res["common"].items():
        diff = "-" if e["difference"] is None else f"{100 * e['difference']:+.1f} points"
        lines.append(f"  {c:14s} {_fmt(e['named_when_present'])} - {_fmt(e['named_when_absent'])} = {diff}")
    o, a, d = res["oracle"], res["adapter"], res["detector"]
    lines.append(f"oracle name embedding in the rare slots: named {o['named']} of {o['rare_objects']} ({_fmt(o['share'])}); "
                 f"added to the object's own tokens: the name {o['named_with_name_added']} ({_fmt(o['share_with_name_added'])}), "
                 f"the name and the red-box marker {o['named_with_name_and_marker_added']} "
                 f"({_fmt(o['share_with_name_and_marker_added'])})")
    e = res.get("hint_echo")
    if e:
        lines.append(f"oracle hints (exactly the image's rare classes, no adapter): {e['named']} of {e['hinted']} hinted names "
                     f"repeated ({_fmt(e['share'])}); answers naming a category twice {e['with_a_repeat']} of {e['answers']}")
        lines.append("  least repeated: " + weakest_echo(e, 3))
    lines.append(f"adapter: tanh(gate) {', '.join(f'{g:.3f}' for g in a['tanh_gate'])}; attention on the own class's row "
                 f"{_fmt(a['attention_on_own_class'])} of {a['rare_patches']} rare patches (chance {_fmt(a['chance'])}); "
                 f"W's cosine with its class names' embeddings: mean {_fmt(a['mean_w_name_cosine'], False)}")
    r = res.get("region_oracle")
    if r:
        lines.append(f"region questions on a rare object: named {r['named']} of {r['rare_boxes']} ({_fmt(r['share'])}); "
                     f"with its name and the red-box marker's embeddings in the box's slots {r['named_with_name_embedding']} "
                     f"({_fmt(r['share_with_name_embedding'])}); added to the box's own tokens: the name "
                     f"{r['named_with_name_added']} ({_fmt(r['share_with_name_added'])}), the name and the marker "
                     f"{r['named_with_name_and_marker_added']} ({_fmt(r['share_with_name_and_marker_added'])})")
        c = r.get("adapter_change_in_box") or {}
        if c.get("relative_norm") is not None:
            lines.append(f"  the adapter's change in those boxes: {_fmt(c['relative_norm'])} of the token's norm, cosine "
                         f"{_fmt(c['cosine_with_name'], False)} with the name, {_fmt(c['cosine_with_marker'], False)} with the marker"
                         + (f" (the additive oracle's write: {_fmt(c['oracle_relative_norm'])})" if c.get("oracle_relative_norm") is not None else ""))
    lines.append("detector AUROC: " + ", ".join(f"{c} {_fmt(v, False)}" for c, v in d["auroc"].items())
                 + f"; mean {_fmt(d['mean_auroc'], False)}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rtrt.tools.demo.probe", description="Probe a bundle's VLM, adapter and detector.")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the embedded demo bundle)")
    p.add_argument("--data", default=None,
                   help="dataset root in CODA-LM layout (default: the demo world's test split, as rtrt eval)")
    p.add_argument("--split", default="test", help="split folder under CODA-LM/ (default: test)")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--batch-size", type=int, default=8, help="images per VLM batch (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length limit (default: 96, as rtrt eval)")
    p.add_argument("--backend", default="ort", choices=BACKENDS, help="detector/adapter backend (default: ort)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from rtrt.runtime.assets import default_bundle
    from rtrt.runtime.fileio import atomic_write_json
    from rtrt.runtime.pipeline import Pipeline
    from rtrt.tools.eval import check_run_args, demo_test_world

    check_run_args(args.limit, args.batch_size, args.max_new_tokens)
    # The oracle and adapter probes write into the VLM's visual tokens: the transformers VLM, whatever the bundle exports.
    pipe = Pipeline.from_bundle(args.bundle or default_bundle(), backend=args.backend, vlm_backend="torch",
                                max_new_tokens=args.max_new_tokens)
    data = args.data if args.data is not None else demo_test_world(progress=not args.quiet)
    res = run_probe(pipe, data, split=args.split, limit=args.limit, batch_size=args.batch_size, progress=not args.quiet)
    print(report_text(res))
    if args.json:
        atomic_write_json(args.json, res)
        print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
