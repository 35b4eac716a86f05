"""Rebuild the demo from nothing: world -> base VLM -> VFM -> phase 1 -> phase 2 -> export -> calibration -> probes -> bundle.

Every stage is seeded (``--seed``) and runs single-process with a fixed thread count, so the same
command on the same software and the same CPU model gives the same bundle (another CPU model
generates the same world but trains other weights: PyTorch's CPU kernels round differently; README,
"Demo"). ``--isa avx2`` runs the build with ATen, MKL and oneDNN pinned to AVX2 kernels
(``ISA_PINS``), what ``python -m rtrt.tools.demo.repro`` compares across CPU models. Timings per
stage are printed and written to ``OUT/build_report.json`` with the measured numbers (VFM probe
accuracy, the base VLM's rare and common recall without and with hints, bundle size, and the probes
of ``rtrt.tools.demo.probe`` on the build's test split).

    python -m rtrt.tools.demo.build --out demo --seed 0            # the shipped demo (65 min on a 2-core Intel Xeon)
    python -m rtrt.tools.demo.build --out /tmp/d --preset small    # a scaled-down end-to-end run (~5 min)

Output: ``OUT/bundle/`` (the demo bundle, VFM and VLM carried inside), ``OUT/examples/*.jpg`` (test
scenes with rare objects) and ``OUT/build_report.json``. Intermediate files (the world, the
checkpoints) go to ``--work`` (default ``OUT.work``); ``--keep-work`` keeps them, and ``--from STAGE``
then reruns only that stage and the ones after it (for example ``--from phase2`` after changing the
phase-2 flags of a preset), reusing the earlier stages' outputs: the work directory records the
seed, thread count and each stage's plan fields (``build_state.json``), and a reused stage whose
fields changed is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from rtrt.tools.demo.presets import MAX_BUNDLE_BYTES, PRESETS

__all__ = ["STAGES", "STAGE_FIELDS", "ISA_PINS", "ISA_ENV", "isa_refusal", "parse_args", "main"]

STAGES = ("world", "vlm", "vfm", "phase1", "phase2", "export")  # in order; "export" also calibrates and probes
# The BuildPlan fields each stage's output depends on (with the seed and the thread count): --from reuses
# a stage only when they are unchanged, so a plan that changes phase 2 reruns from phase 2 alone.
STAGE_FIELDS = {
    "world": ("pretrain", "plugin", "val", "test", "size", "world"),
    "vfm": ("vfm",),
    "vlm": ("vlm", "eval_images"),
    # phase 1 calibrates its bundle when phase 2 trains with the detector's hints, so the calibration belongs to it
    "phase1": ("phase1_epochs", "phase1_detection", "phase1_negatives", "phase1_w_init", "phase1_name_tie", "phase1_ema",
               "calibrate_min_precision", "calibrate_stats"),
    "phase2": ("phase2_epochs", "adapter_width", "phase2_hints", "phase2_hint_share", "phase2_recon", "phase2_reconstruction",
               "phase2_tasks", "phase2_null_slot", "phase2_slot_value", "phase2_keep", "phase2_keep_z",
               "phase2_refine_mask_z", "phase2_attn_prior", "phase2_detector_bias", "phase2_region_box", "phase2_images"),
    "export": ("refine_mask_z", "refine_mask_classes"),
}
STAGE_REPORT = {"vfm": ("vfm", "vfm_probe"), "vlm": ("vlm", "vlm_recall", "blind")}  # report entries a reused stage keeps


# ``--isa VALUE`` -> the environment variables that pin the CPU kernels' instruction set: ATen's dispatch,
# MKL's conditional numerical reproducibility and oneDNN's ISA ceiling (read when torch loads, so a
# pinned build runs in a child process that starts with them). A build records those set in its
# environment, and ``--from`` reuses only stages built under the same ones.
ISA_PINS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
ISA_ENV = tuple(ISA_PINS["avx2"])


def _stage_key(report: dict, stages: Sequence[str]) -> dict:
    """What the outputs of ``stages`` depend on: the seed, the thread count, the pinned ISA (when set) and
    those stages' plan fields (JSON form)."""
    return json.loads(json.dumps({"seed": report["seed"], "threads": report["threads"],
                                  **({"isa_env": report["isa_env"]} if report.get("isa_env") else {}),
                                  **{f: report["plan"][f] for st in stages for f in STAGE_FIELDS[st]}}))


def _realign_problem(state: dict, report: dict) -> str:
    """Why the VLM in a work directory with ``state`` cannot be realigned under ``report``'s plan ("" when it can)."""
    from .vlm import STAGE2_FIELDS, VLMConfig

    vlm = report["plan"]["vlm"]
    if not vlm.get("head_refit") or vlm.get("epochs", VLMConfig.epochs):
        return "the plan's vlm needs head_refit=True and epochs=0"
    if "vlm" not in state.get("done", []) or "vlm" not in state.get("report", {}):
        return "the work directory holds no VLM"
    saved = state.get("key", {}).get("vlm", {})
    now = _stage_key(report, ["vlm"])["vlm"]
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in STAGE2_FIELDS)
    if differ or state["key"].get("seed") != report["seed"] or state["key"].get("threads") != report["threads"]:
        return f"the VLM in the work directory was built with another seed, thread count or stages 0-1 ({', '.join(differ)})"
    return ""


def _seed_everything(seed: int, threads: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    # warn_only: a few CPU kernels have no deterministic variant; they are reported, not fatal.
    torch.use_deterministic_algorithms(True, warn_only=True)


class _Timer:
    """Runs stages, prints and records how long each took."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable, *args, **kwargs):
        print(f"[demo] {name} ...", file=sys.stderr, flush=True)
        t = time.time()
        result = fn(*args, **kwargs)
        self.seconds[name] = round(time.time() - t, 1)
        print(f"[demo] {name} done in {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)
        return result


def _call_main(module: str, argv: list[str]) -> None:
    import importlib

    rc = importlib.import_module(module).main(argv)
    if rc not in (0, None):
        raise RuntimeError(f"{module} {' '.join(argv)} exited with {rc}")


def _rare_classes_with_regions(annotations: Path) -> list[str]:
    """The world's rare categories that have at least one region in ``annotations`` (the rows of W)."""
    from rtrt.tools.demo.world import RARE_CATEGORIES
    from rtrt.trainer.coda import iter_annotations

    seen = {r.category_name for _, ann in iter_annotations(annotations) for r in ann.region_perception}
    return [c for c in RARE_CATEGORIES if c in seen]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _pick_examples(world: Path, out: Path, count: int = 6) -> list[str]:
    """Copy the first test images whose annotation names rare objects (most distinct rare kinds first)."""
    from rtrt.tools.judge import find_mentions
    from rtrt.tools.demo.world import RARE_CATEGORIES
    from rtrt.trainer.coda import read_tasks, task_file

    records = read_tasks(task_file(world / "CODA-LM" / "test" / "vqa_anno", "general_perception"))
    scored = [(-len(find_mentions(r.answer or "") & set(RARE_CATEGORIES)), r.question_id, r) for r in records]
    chosen = [r for n, _, r in sorted(scored, key=lambda t: (t[0], t[1])) if n < 0][:count]
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for k, r in enumerate(chosen):
        name = f"scene_{k + 1}{Path(r.image).suffix}"
        shutil.copyfile(world / r.image, out / name)
        names.append(name)
    (out / "examples.json").write_text(json.dumps(
        {n: {"source": r.image, "reference": r.answer} for n, r in zip(names, chosen)}, indent=2) + "\n")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rtrt.tools.demo.build",
                                description="Rebuild the demo world, models and bundle from nothing with fixed seeds.")
    p.add_argument("--out", required=True, help="output directory (bundle/, examples/, build_report.json)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="sizes: full (the shipped demo), small (~5 min end to end) or tiny (seconds, for tests)")
    p.add_argument("--work", default="", help="directory for the world and intermediates (default: OUT.work)")
    p.add_argument("--keep-work", action="store_true", help="keep --work after a successful build")
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed for determinism)")
    p.add_argument("--stop-after", choices=STAGES, default="export",
                   help="stop after this stage (the bundle is written only by a full run)")
    p.add_argument("--from", dest="start", choices=STAGES, default="world",
                   help="start at this stage, reusing the earlier stages' outputs in --work (kept with --keep-work by a build "
                        "with the same seed, threads and plan fields for those stages; with vlm, a VFM built with the same "
                        "plan is reused too, since it does not read the VLM); default: from nothing")
    p.add_argument("--realign-vlm", action="store_true",
                   help="with --from vlm: keep the VLM in --work (its stages 0-1, built with the same seed, threads and VLM plan "
                        "apart from its stage-2 fields) and redo only its stage 2, minutes instead of an hour; needs the plan's "
                        "vlm head_refit=True and epochs=0, under which the result equals the VLM a build from nothing writes; a VFM in "
                        "--work built with the same plan is reused too (it does not read the VLM)")
    p.add_argument("--isa", choices=tuple(ISA_PINS), default="native",
                   help="avx2: run the build with ATen, MKL and oneDNN pinned to AVX2 kernels (x86-64 only; "
                        f"{' '.join(f'{k}={v}' for k, v in ISA_PINS['avx2'].items())}, set in a child process before "
                        "torch loads); native (default): the kernels the CPU picks, or those these variables pin where "
                        "they are set already (the build records them)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def isa_refusal(isa: str) -> str:
    """Why ``--isa isa`` cannot run on this machine ("" when it can): the pins are x86-64 kernels."""
    import platform

    if ISA_PINS[isa] and platform.machine().lower() not in ("x86_64", "amd64"):
        return f"--isa {isa} pins x86-64 kernels; this machine is {platform.machine()}"
    return ""


def _pinned_child(args: argparse.Namespace, argv: Sequence[str] | None) -> int | None:
    """With ``--isa`` other than native: None when this process already runs under its pins, else the exit
    code of the same command run in a child process that starts with them (2: not an x86-64 machine)."""
    pins = ISA_PINS[args.isa]
    if all(os.environ.get(k) == v for k, v in pins.items()):
        return None
    refusal = isa_refusal(args.isa)
    if refusal:
        print(f"rtrt demo build: error: {refusal}", file=sys.stderr)
        return 2
    import subprocess

    cmd = [sys.executable, "-m", "rtrt.tools.demo.build", *(sys.argv[1:] if argv is None else argv)]
    return subprocess.run(cmd, env={**os.environ, **pins}).returncode


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    child = _pinned_child(args, argv)
    if child is not None:
        return child
    plan = PRESETS[args.preset]
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    _seed_everything(args.seed, args.threads)
    progress = not args.quiet
    timer = _Timer()
    report: dict = {"seed": args.seed, "preset": args.preset, "plan": dataclasses.asdict(plan), "threads": args.threads,
                    "isa_env": {k: os.environ[k] for k in ISA_ENV if os.environ.get(k)}}
    t_start = time.time()
    state_file = work / "build_state.json"  # what the work directory holds: the plan, the stages done, their report
    done: list[str] = []
    reuse_vfm = False
    if args.realign_vlm and args.start != "vlm":
        print("rtrt demo build: error: --realign-vlm goes with --from vlm", file=sys.stderr)
        return 2
    if args.start != "world":
        before = list(STAGES[: STAGES.index(args.start)])
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            print(f"rtrt demo build: error: --from {args.start} needs {state_file} from an earlier build with --keep-work",
                  file=sys.stderr)
            return 2
        saved = state.get("key", {})
        # A plan field newer than the work directory reads as its default (what the stage was built with).
        from rtrt.trainer.loop import config_defaults

        defaults = config_defaults(type(plan))
        if not set(before) <= set(state.get("done", [])) or any(saved.get(k, defaults.get(k, ...)) != v
                                                                 for k, v in _stage_key(report, before).items()) \
                or saved.get("isa_env") != (report["isa_env"] or None):
            print(f"rtrt demo build: error: {work} holds no {', '.join(before)} built with this seed, thread count, "
                  f"pinned ISA ({', '.join(ISA_ENV)}) and plan for those stages; rebuild from the start", file=sys.stderr)
            return 2
        if args.realign_vlm:
            problem = _realign_problem(state, report)
            if problem:
                print(f"rtrt demo build: error: --realign-vlm: {problem}", file=sys.stderr)
                return 2
        if args.start == "vlm":  # --realign-vlm goes with it (checked above)
            # The VFM does not read the VLM: one in --work built with the same plan is reused.
            vlm_state = state
            reuse_vfm = "vfm" in state.get("done", []) and all(
                state["key"].get(k) == v for k, v in _stage_key(report, ["vfm"]).items()) and (work / "vfm").is_dir()
        done = list(before)
        report.update({k: state["report"][k] for stage in before for k in STAGE_REPORT.get(stage, ()) if k in state["report"]})
        timer.seconds.update({k: v for k, v in state["seconds"].items() if k.split()[0] in before})
        report["reused"] = before

    def runs(stage: str) -> bool:
        return STAGES.index(stage) >= STAGES.index(args.start)

    def save(stage: str) -> None:
        from rtrt.runtime.fileio import atomic_write_json

        done.append(stage)
        atomic_write_json(state_file, {"key": _stage_key(report, done), "done": done, "report": report,
                                       "seconds": timer.seconds})

    def finish(stage: str) -> int:
        report["seconds"] = timer.seconds
        report["seconds_total"] = round(time.time() - t_start, 1)
        report["stopped_after"] = stage
        out.mkdir(parents=True, exist_ok=True)
        (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({"seconds": timer.seconds, "total": report["seconds_total"]}, indent=2))
        return 0

    # 1. The world (CODA-LM layout).
    world = work / "world"
    if runs("world"):
        timer.run("world", _call_main, "rtrt.tools.demo.world", [
            "--out", str(world), *plan.world_argv(args.seed), "--workers", str(args.threads), "--overwrite",
            *([] if progress else ["--quiet"]),
        ])
        save("world")
    if args.stop_after == "world":
        return finish("world")

    # 2. The base VLM, pretrained from scratch, and its blindness (before the VFM, which it does not use:
    # --from vfm reruns the VFM and the plug-in without the hour of VLM pretraining).
    from .vlm import VLMConfig, evaluate_recall, pretrain_vlm

    vlm_cfg = VLMConfig(seed=args.seed, **plan.vlm)
    vlm_dir = work / "vlm"
    if runs("vlm") and args.realign_vlm:
        # Stages 0-1 are the saved VLM's (their time is the earlier build's, its stage 2 taken out).
        from .vlm import realign_vlm

        fresh = work / "vlm.realign"
        shutil.rmtree(fresh, ignore_errors=True)
        report["vlm"] = timer.run("vlm stage 2", realign_vlm, vlm_dir, world, fresh, vlm_cfg, progress=progress)
        old = vlm_state["report"]["vlm"]
        timer.seconds["vlm"] = old.get("seconds_stage01_reused", round(vlm_state["seconds"]["vlm"] - old.get("seconds_stage2", 0.0), 1))
        report["vlm"]["seconds_stage01_reused"] = timer.seconds["vlm"]
        stale = work / "vlm.stale"
        shutil.rmtree(stale, ignore_errors=True)
        vlm_dir.rename(stale)
        fresh.rename(vlm_dir)
        shutil.rmtree(stale)
    elif runs("vlm"):
        report["vlm"] = timer.run("vlm", pretrain_vlm, world, vlm_dir, vlm_cfg, progress=progress)
    if runs("vlm"):
        report["vlm_recall"] = {
            mode: timer.run(f"vlm eval hints={mode}", evaluate_recall, vlm_dir, world, "test", hints=mode,
                            limit=plan.eval_images, progress=progress)
            for mode in ("none", "rare")
        }
        r0, r1 = report["vlm_recall"]["none"]["recall"], report["vlm_recall"]["rare"]["recall"]
        report["blind"] = bool(r0["rare"] is not None and r0["common"] and r0["rare"] <= 0.5 * r0["common"])
        print(f"[demo] base VLM recall: common {_pct(r0['common'])} rare {_pct(r0['rare'])} (no hints); "
              f"common {_pct(r1['common'])} rare {_pct(r1['rare'])} (oracle rare hints)", file=sys.stderr)
        save("vlm")
    if args.stop_after == "vlm":
        return finish("vlm")

    # 3. The VFM, trained on balanced scenes, and its linear probe.
    from .vfm import VFMConfig, load_demo_vfm, probe_vfm, train_vfm

    vfm_cfg = VFMConfig(seed=args.seed, workers=args.threads, **plan.vfm)
    if reuse_vfm:
        report.update({k: vlm_state["report"][k] for k in STAGE_REPORT["vfm"] if k in vlm_state["report"]})
        timer.seconds.update({k: v for k, v in vlm_state["seconds"].items() if k.split()[0] == "vfm"})
        report["reused"] = [*report.get("reused", []), "vfm"]
        save("vfm")
    elif runs("vfm"):
        report["vfm"] = timer.run("vfm", train_vfm, world, work / "vfm", vfm_cfg, progress=progress)
    backbone, spec = load_demo_vfm(work / "vfm")
    if runs("vfm") and not reuse_vfm:
        report["vfm_probe"] = timer.run("vfm probe", probe_vfm, backbone, spec, world)
        save("vfm")
    del backbone
    if args.stop_after == "vfm":
        return finish("vfm")

    # 4. Phase 1: W and the detector's projection (rtrt train embeddings).
    from .text_encoder import minilm_ref, write_synonyms

    classes = _rare_classes_with_regions(world / "CODA-LM" / "plugin")
    synonyms = write_synonyms(work / "synonyms.json", classes)
    report["classes"] = classes
    phase1 = work / "bundle_phase1"
    calibrate_args = [] if plan.calibrate_min_precision is None else ["--min-precision", str(plan.calibrate_min_precision)]
    calibrate_args += [] if plan.calibrate_stats == "all" else ["--stats", plan.calibrate_stats]
    if runs("phase1"):
        timer.run("phase1", _call_main, "rtrt.trainer.cli", [
            "embeddings", "--annotations", str(world / "CODA-LM" / "plugin"), "--images", str(world),
            "--vlm", str(vlm_dir), "--synonyms", str(synonyms), "--classes", ",".join(classes), "--vfm-kind", "timm",
            "--vfm", str(work / "vfm" / "vfm.safetensors"), "--vfm-arch", spec.arch, "--vfm-kwargs", json.dumps(spec.kwargs),
            "--image-size", str(spec.image_size), *(["--vfm-reducing-gap", str(spec.reducing_gap)] if spec.reducing_gap else []), "--carry-vfm", "--text-encoder", minilm_ref(), "--no-cache",
            "--epochs", str(plan.phase1_epochs), "--seed", str(args.seed), "--device", "cpu", "--out", str(phase1), "--overwrite",
            "--w-detection", str(plan.phase1_detection), "--negatives-per-image", str(plan.phase1_negatives),
            "--w-init", plan.phase1_w_init, "--w-name-tie", str(plan.phase1_name_tie), "--ema", str(plan.phase1_ema),
        ])
        if plan.phase2_hints == "detector":
            # Phase 2 trains with the detector's hints as users get them: calibrated on val (as step 7 does
            # again on the exported bundle), so its prompts carry no hint where the shipped bundle gives none.
            timer.run("phase1 calibrate", _call_main, "rtrt.tools.calibrate", [
                "--bundle", str(phase1), "--data", str(world), "--split", "val", "--backend", "torch", *calibrate_args])
        save("phase1")
    if args.stop_after == "phase1":
        return finish("phase1")

    # 5. Phase 2: the adapter through the frozen VLM (rtrt train adapter), VLM carried into the bundle.
    phase2 = work / "bundle_phase2"
    from .vlm import write_short_tasks

    tasks = work / "plugin_tasks"  # the plug-in split's answers in the VLM's answer style (its first phase2_images images)
    write_short_tasks(world / "CODA-LM" / "plugin" / "vqa_anno", tasks, plan.phase2_tasks, plan.phase2_images)
    if runs("phase2"):
        timer.run("phase2", _call_main, "rtrt.trainer.cli", [
            "adapter", "--bundle", str(phase1), "--vlm", str(vlm_dir), "--tasks", str(tasks), *[a for t in plan.phase2_tasks for a in ("--task", t)],
            "--images", str(world), "--width", str(plan.adapter_width), "--heads", "8", "--carry-vlm",
            "--max-answer-tokens", "48", "--hints", plan.phase2_hints,
            *(["--hint-share", str(plan.phase2_hint_share)] if plan.phase2_hints == "detector" else []), "--recon", plan.phase2_recon,
            "--w-reconstruction", str(plan.phase2_reconstruction), *(["--null-slot"] if plan.phase2_null_slot else []),
            *(["--slot-value"] if plan.phase2_slot_value else []),
            *(["--w-keep", str(plan.phase2_keep)] if plan.phase2_keep else []),
            *(["--keep-z", str(plan.phase2_keep_z)] if plan.phase2_keep and plan.phase2_keep_z is not None else []),
            *(["--refine-mask-z", str(plan.phase2_refine_mask_z)] if plan.phase2_refine_mask_z is not None else []),
            *(["--attn-prior", str(plan.phase2_attn_prior)] if plan.phase2_attn_prior else []),
            *(["--detector-bias"] if plan.phase2_detector_bias else []), *(["--region-box"] if plan.phase2_region_box else []),
            "--epochs", str(plan.phase2_epochs), "--lr", "1e-3", "--seed", str(args.seed), "--device", "cpu", "--out", str(phase2),
            "--overwrite", "--cache-visual-tokens",  # the frozen tower's output once per image: the same weights, faster
        ])
        save("phase2")
    if args.stop_after == "phase2":
        return finish("phase2")

    # 6. Export (rtrt export) and the shipped output.
    # fp32 graphs (the default) and int8 ones (``--precision int8``), parity checked on the examples,
    # and the whole VLM (``--vlm``: vlm_onnx/, int8 weight-only decoder too) for the torch-free runtime.
    report["examples"] = _pick_examples(world, out / "examples")
    timer.run("export", _call_main, "rtrt.export.cli", ["--bundle", str(phase2), "--backend", "onnx", "--precision", "int8",
                                                        "--images", str(out / "examples"), "--vlm"])
    # 7. Hint calibration (rtrt calibrate): per-class z-scores, threshold and hint count fitted on the
    # world's val split (never on test), so an image gets only the classes that stand out for it.
    # The bundle's refinement mask (plan.refine_mask_z) is set with it: the calibrated z-scores decide it.
    mask = ["--refine-mask-z", "off" if plan.refine_mask_z is None else str(plan.refine_mask_z),
            "--refine-mask-classes", plan.refine_mask_classes]
    timer.run("calibrate", _call_main, "rtrt.tools.calibrate", ["--bundle", str(phase2), "--data", str(world), "--split", "val",
                                                               *calibrate_args, *mask])
    # 8. The probes that keep the demo honest (``python -m rtrt.tools.demo.probe``) on the build's test split, into the report.
    probes = work / "probes.json"
    timer.run("probes", _call_main, "rtrt.tools.demo.probe", ["--bundle", str(phase2), "--data", str(world), "--split", "test",
                                                            "--limit", str(plan.eval_images or plan.test), "--json", str(probes),
                                                            *([] if progress else ["--quiet"])])
    report["probes"] = json.loads(probes.read_text())
    bundle = out / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(phase2, bundle)
    save("export")
    report["bundle_bytes"] = _dir_bytes(bundle)
    if report["bundle_bytes"] > MAX_BUNDLE_BYTES:
        print(f"[demo] warning: bundle is {report['bundle_bytes'] / 2**20:.1f} MiB, over the {MAX_BUNDLE_BYTES / 2**20:.0f} MiB budget", file=sys.stderr)
    rc = finish("export")
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
