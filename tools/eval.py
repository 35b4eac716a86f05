"""``rtrt eval``: answer CODA-LM-format questions with a bundle and score them, optionally as the 4-way ablation.

    rtrt eval --task general --ablation                         # the demo bundle on the demo world's test split
    rtrt eval --data WORLD --task general --ablation            # the embedded demo bundle on any world
    rtrt eval --bundle B --data CODA --split val --task region --judge openai --judge-url http://host/v1 --judge-model M

Writes, under ``--out``: one CODA-LM-style prediction file per ablation row
(``{row}/{task}_answer.jsonl``), ``scores.json`` with every judge report, and ``scores.md`` with the
score table per evaluation group (vehicle, vru, traffic_sign, traffic_light, traffic_cone, barrier,
miscellaneous, all). The ablation rows are the method's: baseline (no plug-in), + text hints only,
+ visual refinement only, + both. With the keyword judge two more columns aggregate the rare and
the common categories of the procedural world, so its blindness and its cure read at a glance.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from rtrt.runtime.names import BACKENDS, PRECISIONS, REFINE_MASK_CLASSES, VLM_BACKENDS, VLM_PRECISIONS
from rtrt.tools.infer import REFINE_CLASSES_HELP, REFINE_MASK_HELP, refine_mask_arg

__all__ = ["ABLATION_ROWS", "TASK_NAMES", "EvalRow", "check_run_args", "demo_test_world", "run_eval", "parse_args", "main"]

# Short task names on the command line -> CODA-LM task names.
TASK_NAMES = {"general": "general_perception", "region": "region_perception", "suggestion": "driving_suggestion"}


@dataclass(frozen=True)
class EvalRow:
    """One row of the ablation."""

    name: str  # row label in tables and the output folder name
    hints: bool  # detector names in the prompt (text prompt injection)
    refine: bool  # adapter on the visual tokens (visual token enhancement)


ABLATION_ROWS = (
    EvalRow("baseline", False, False),
    EvalRow("text_hints", True, False),
    EvalRow("visual_refine", False, True),
    EvalRow("both", True, True),
)


def _chunks(xs: list, n: int) -> Iterable[list]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


def _rare_common(report, rare: set[str], common: set[str]) -> dict[str, dict[str, float | None]]:
    """Micro recall / precision / F1 over the world's rare and common categories (keyword judge only)."""
    out = {}
    for label, cats in (("rare", rare), ("common", common)):
        tp = fn = fp = 0
        for it in report.items:
            ref = set(it.detail.get("reference", [])) & cats
            pred = set(it.detail.get("predicted", [])) & cats
            tp += len(ref & pred)
            fn += len(ref - pred)
            fp += len(pred - ref)
        r = 100.0 * tp / (tp + fn) if tp + fn else None
        p = 100.0 * tp / (tp + fp) if tp + fp else None
        f = 2 * p * r / (p + r) if p and r else (0.0 if p is not None and r is not None else None)
        out[label] = {"recall": r, "precision": p, "f1": f, "support": float(tp + fn)}
    return out


def run_eval(
    bundle: str | Path,
    data: str | Path,
    task: str,
    out_dir: str | Path,
    *,
    split: str = "test",
    rows: Sequence[EvalRow] = (ABLATION_ROWS[-1],),
    judge=None,
    backend: str = "ort",
    precision: str = "fp32",
    device: str = "cpu",
    vlm_backend: str | None = None,
    vlm_precision: str = "fp32",
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 96,
    progress: bool = True,
    pipeline=None,
    region_hints: str = "box",
) -> dict:
    """Predict and judge; returns ``{"rows": {row: {"groups": ..., "rare_common": ...}}, "table": md}``.

    ``backend``/``precision``/``device``/``vlm_backend``/``vlm_precision`` build the pipeline unless
    ``pipeline`` is given; scores.json records what ran (``Pipeline.describe()``: backend, precision,
    ONNX Runtime providers, VLM backend). ``region_hints`` (region questions): ``"box"`` gives the
    pipeline each question's box and the frame without it (``Pipeline.batch(regions=...)``: the hint is
    the box's class), ``"image"`` only the boxed image (the hints are the whole image's classes, as
    for general questions; the ablation's earlier rows)."""
    from tqdm import tqdm

    if region_hints not in ("box", "image"):
        raise ValueError(f"region_hints must be 'box' or 'image', got {region_hints!r}")
    from rtrt.runtime.bundle import atomic_write_bytes, atomic_write_json
    from rtrt.runtime.errors import InputError
    from rtrt.runtime.image import load_image
    from rtrt.runtime.pipeline import Pipeline
    from rtrt.tools.judge import KeywordJudge, build_items, score_table
    from rtrt.tools.demo.world import COMMON_CATEGORIES, RARE_CATEGORIES
    from rtrt.trainer.coda import (
        TaskRecord,
        draw_region_box,
        iter_annotations,
        read_tasks,
        region_category_names,
        region_frame,
        task_file,
    )

    coda_task = TASK_NAMES.get(task, task)
    data = Path(data)
    split_dir = data / "CODA-LM" / split
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: no CODA-LM split {split!r} under {data}")
    refs = read_tasks(task_file(split_dir / "vqa_anno", coda_task))
    anns = [a for _, a in iter_annotations(split_dir)]
    regions = [r for a in anns for r in a.region_perception]
    region_cats = region_category_names(anns)
    all_cats = [sorted({r.category_name for r in a.region_perception}) for a in anns]
    if limit is not None:
        refs = refs[:limit]
    if not refs:
        raise InputError(f"{split_dir}: no {coda_task} questions")
    judge = judge or KeywordJudge()
    pipe = pipeline or Pipeline.from_bundle(bundle, backend=backend, max_new_tokens=max_new_tokens, precision=precision,
                                            device=device, vlm_backend=vlm_backend, vlm_precision=vlm_precision)
    ran = pipe.describe()

    by_box = coda_task == "region_perception" and region_hints == "box"

    def image_of(i: int, rec: TaskRecord):
        img = load_image(data / rec.image)
        if coda_task == "region_perception" and "images_w_boxes" not in rec.image and i < len(regions):
            img = draw_region_box(img, regions[i].box)
        return img

    def region_of(i: int, rec: TaskRecord):
        """(frame without the box, [x0, y0, x1, y1]) of region question i, for hints from the box (``region_hints="box"``)."""
        if not by_box or i >= len(regions):
            return None, None
        x, y, w, h = (float(v) for v in regions[i].box)
        return load_image(data / region_frame(rec.image)), (x, y, x + w, y + h)

    out = Path(out_dir)
    results: dict = {"task": coda_task, "split": split, "judge": getattr(judge, "name", "?"),
                     "backend": ran["backend"], "precision": ran["precision"], "providers": ran["providers"],
                     "device": ran["device"], "vlm_backend": ran["vlm_backend"], "vlm_precision": ran["vlm_precision"],
                     **({"refine_mask_z": ran["refine_mask_z"]} if ran.get("refine_mask_z") is not None else {}),
                     **({"refine_mask_classes": ran["refine_mask_classes"]}
                        if ran.get("refine_mask_z") is not None and ran.get("refine_mask_classes", "any") != "any" else {}),
                     **({"region_hints": region_hints} if coda_task == "region_perception" else {}),
                     "rows": {}}
    tables = {}
    indexed = list(enumerate(refs))
    total = len(rows) * len(refs)
    bar = tqdm(total=total, desc=f"eval {coda_task}", unit="q", disable=not progress)
    preds_of: dict[str, list[TaskRecord]] = {row.name: [] for row in rows}
    for chunk in _chunks(indexed, batch_size):
        # Each batch of frames is read and shown to the detector once; every row answers it from those
        # results (the detector's output depends only on the frames), so memory stays one batch deep.
        images = [image_of(i, r) for i, r in chunk]
        questions = [r.question for _, r in chunk]
        if by_box:  # the detector sees the frame, the VLM the boxed image as before
            frames, boxes = zip(*(region_of(i, r) for i, r in chunk))
            shown = [f if f is not None else im for f, im in zip(frames, images)]
            extra = {"regions": list(boxes), "region_images": [im if f is not None else None for f, im in zip(frames, images)]}
        else:
            shown, extra = images, {}
        dets = pipe.detect_batch(shown)
        for row in rows:
            answers = pipe.batch(shown, questions, hints=row.hints, refine=row.refine, detections=dets, **extra)
            for (_, rec), res in zip(chunk, answers):
                preds_of[row.name].append(TaskRecord(rec.question_id, rec.image, rec.question, res.answer,
                                                     {"hints": res.hints, "detections": [d.to_dict() for d in res.detections],
                                                      **({"region": res.region.to_dict()} if res.region is not None else {})}))
            bar.update(len(chunk))
            bar.set_postfix(row=row.name)
    for row in rows:
        preds = preds_of[row.name]
        lines = "".join(json.dumps({"question_id": p.question_id, "image": p.image, "question": p.question,
                                    "answer": p.answer, **p.extra}) + "\n" for p in preds)
        atomic_write_bytes(out / row.name / f"{coda_task}_answer.jsonl", lines.encode())
        items = build_items(coda_task, refs, preds, region_cats[: len(refs)] if coda_task == "region_perception" else None,
                            all_cats[: len(refs)] if coda_task != "region_perception" else None)
        report = judge.judge(coda_task, items)
        entry = {"groups": report.groups, "failed": len(getattr(report, "failed", []) or [])}
        if isinstance(judge, KeywordJudge):
            entry["rare_common"] = _rare_common(report, set(RARE_CATEGORIES), set(COMMON_CATEGORIES))
        if row.hints and coda_task != "region_perception":
            entry["hints"] = _hint_quality([p.extra["hints"] for p in preds], all_cats[: len(preds)], pipe.class_names)
        elif row.hints and by_box:  # a region question's hint against its box's category
            entry["hints"] = _hint_quality([p.extra["hints"] for p in preds], [[c] for c in region_cats[: len(preds)]],
                                           pipe.class_names)
        results["rows"][row.name] = entry
    bar.close()
    metrics = ("f1", "recall") if isinstance(judge, KeywordJudge) else ("score",)
    for metric in metrics:
        table_rows = {}
        for name, e in results["rows"].items():
            vals = {g: m.get(metric) for g, m in e["groups"].items()}
            for k, m in e.get("rare_common", {}).items():
                vals[k] = m.get(metric)
            table_rows[name] = vals
        md = score_table({k: {g: v for g, v in vals.items() if g not in ("rare", "common")} for k, vals in table_rows.items()}, "row")
        if any("rare" in v for v in table_rows.values()):
            md += "\n\n| row | rare | common |\n|---|---:|---:|\n" + "\n".join(
                f"| {k} | {_fmt(v.get('rare'))} | {_fmt(v.get('common'))} |" for k, v in table_rows.items())
        tables[metric] = md
    hinted = {k: e["hints"] for k, e in results["rows"].items() if "hints" in e}
    if hinted:
        per = "region" if coda_task == "region_perception" else "image"
        tables["hints"] = f"| row | hint precision | hint recall | hints per {per} |\n|---|---:|---:|---:|\n" + "\n".join(
            f"| {k} | {_fmt(h['precision'])} | {_fmt(h['recall'])} | {h['per_image']:.2f} |" for k, h in hinted.items())
    results["tables"] = tables
    atomic_write_json(out / "scores.json", results)
    hints_title = ("the box's category, for the boxes that hold a detector class" if coda_task == "region_perception"
                   else "the detector's classes each annotation holds")
    text = "\n\n".join((f"### detector hints on {split}, against {hints_title}" if m == "hints"
                         else f"### {coda_task} on {split}, {results['judge']} judge, {m}") + f"\n\n{t}" for m, t in tables.items())
    atomic_write_bytes(out / "scores.md", (text + "\n").encode())
    results["table"] = text
    return results


def _hint_quality(hints: Sequence[Sequence[str]], present: Sequence[Sequence[str]], classes: Sequence[str]) -> dict:
    """Micro precision and recall (0-100) of the hinted class names against the detector's classes
    each image's annotation holds, and the mean number of hints per image."""
    known = set(classes)
    tp = fp = fn = 0
    for h, cats in zip(hints, present):
        h, truth = set(h), set(cats) & known
        tp, fp, fn = tp + len(h & truth), fp + len(h - truth), fn + len(truth - h)
    return {"precision": 100.0 * tp / (tp + fp) if tp + fp else None, "recall": 100.0 * tp / (tp + fn) if tp + fn else None,
            "per_image": (tp + fp) / max(len(hints), 1)}


def check_run_args(limit: int | None, batch_size: int, max_new_tokens: int) -> None:
    """The sizes every question-answering run takes (rtrt eval, the demo probes): one-line InputError when off."""
    from rtrt.runtime.errors import InputError

    if limit is not None and limit < 1:
        raise InputError("--limit must be at least 1")
    if batch_size < 1 or max_new_tokens < 1:
        raise InputError("--batch-size and --max-new-tokens must be at least 1")


def demo_test_world(seed: int = 0, progress: bool = True) -> Path:
    """The demo build's test split (``rtrt world --seed S --pretrain 0 --plugin 0 --val 0 --test N``,
    byte for byte the split the build evaluates), generated on first use under
    ``$XDG_CACHE_HOME/rtrt/`` (``~/.cache/rtrt/``) and reused while its ``world.json`` matches."""
    from dataclasses import asdict

    from rtrt.tools.demo.presets import PRESETS
    from rtrt.tools.demo.world import config_from_args, generate_world
    from rtrt.tools.demo.world import parse_args as world_args

    plan = PRESETS["full"]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rtrt"
    root = base / f"demo-world-test-seed{seed}"
    cfg = config_from_args(world_args(["--out", str(root), *plan.world_argv(seed, {"pretrain": 0, "plugin": 0, "val": 0})]))
    want = json.loads(json.dumps(asdict(cfg)))
    try:
        if json.loads((root / "world.json").read_text())["config"] == want:
            return root
    except (OSError, ValueError, KeyError, TypeError):
        pass
    generate_world(cfg, root, overwrite=True, workers=2, progress=progress)
    return root


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rtrt eval", description="Answer CODA-LM-format questions with a bundle and score them.")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the embedded demo bundle)")
    p.add_argument("--data", default=None,
                   help="dataset root in CODA-LM layout (the procedural world or CODA-LM itself); default: the demo "
                        "world's test split (seed 0, as the demo build), generated on first use into ~/.cache/rtrt/")
    p.add_argument("--split", default="test", help="split folder under CODA-LM/ (default: test)")
    p.add_argument("--task", default="general", choices=sorted(TASK_NAMES), help="question set (default: general)")
    p.add_argument("--ablation", action="store_true", help="run the four rows: baseline, +hints, +refine, +both")
    p.add_argument("--judge", default="keyword", choices=["keyword", "openai"], help="scorer (default: keyword, offline)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (openai judge)")
    p.add_argument("--judge-model", default=None, help="judge model name (openai judge)")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key")
    p.add_argument("--backend", default="ort", choices=BACKENDS, help="detector/adapter backend (default: ort)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="graph precision (int8: the bundle's *.int8.onnx graphs; fp16: TensorRT) (default: fp32)")
    p.add_argument("--device", default="cpu", help="device of the VLM, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--refine-mask-z", type=refine_mask_arg, default="bundle", metavar="{Z,off,bundle}", help=REFINE_MASK_HELP)
    p.add_argument("--refine-mask-classes", default="bundle", choices=(*REFINE_MASK_CLASSES, "bundle"), help=REFINE_CLASSES_HELP)
    p.add_argument("--vlm-backend", default=None, choices=VLM_BACKENDS,
                   help="how the VLM runs: ort = the bundle's exported VLM, torch = transformers "
                        "(default: ort when the bundle carries the exported VLM, else torch)")
    p.add_argument("--vlm-precision", default="fp32", choices=VLM_PRECISIONS,
                   help="the exported VLM's decoder: int8 = weight-only int8 (ort VLM backend; default: fp32)")
    p.add_argument("--region-hints", default="box", choices=["box", "image"],
                   help="region questions: box = the hint is the class the detector sees in the red box, on the frame "
                        "without it; image = the whole boxed image's classes, as for general questions (default: box)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=8, help="images per VLM batch (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length limit (default: 96)")
    p.add_argument("--out", default="eval_out", help="output folder for predictions and scores (default: eval_out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true",
                   help="let third-party libraries print their logs, warnings and progress bars (the rtrt command line silences them)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from rtrt.runtime.errors import InputError
    from rtrt.runtime.assets import default_bundle

    check_run_args(args.limit, args.batch_size, args.max_new_tokens)
    judge = None
    if args.judge == "openai":
        from rtrt.tools.judge import OpenAIJudge, OpenAIJudgeConfig

        if not args.judge_url or not args.judge_model:
            raise InputError("--judge openai needs --judge-url and --judge-model")
        judge = OpenAIJudge(OpenAIJudgeConfig(base_url=args.judge_url, model=args.judge_model,
                                              api_key=os.environ.get(args.judge_key_env)))
    rows = ABLATION_ROWS if args.ablation else (ABLATION_ROWS[-1],)
    from rtrt.runtime.pipeline import Pipeline

    bundle = args.bundle or default_bundle()
    # Loaded before the data (which may be generated, ~30 s): a missing device or precision fails first.
    pipe = Pipeline.from_bundle(bundle, backend=args.backend, max_new_tokens=args.max_new_tokens, precision=args.precision,
                                device=args.device, vlm_backend=args.vlm_backend, vlm_precision=args.vlm_precision,
                                refine_mask_z=args.refine_mask_z, refine_mask_classes=args.refine_mask_classes)
    data = args.data if args.data is not None else demo_test_world(progress=not args.quiet)
    res = run_eval(bundle, data, args.task, args.out, split=args.split, rows=rows, judge=judge, limit=args.limit,
                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=not args.quiet, pipeline=pipe,
                   region_hints=args.region_hints)
    print(res["table"])
    print(f"\npredictions and scores written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
