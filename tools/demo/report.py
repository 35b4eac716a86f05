"""Measure a demo bundle the way the README reports it, and print the README's tables.

    python -m rtrt.tools.demo.report --out M [--bundle B] [--split NAME=[DIR][:SPLIT] ...] [--world-seed N ...]
                                     [--task general region] [--mask-off] [--probes] [--examples DIR] [--jobs N]
                                     [--check]

Runs, for every ``--split``, ``rtrt eval --ablation`` per task (into ``M/<task>_<NAME>/``; with
``--mask-off`` again with ``--refine-mask-z off`` into ``M/<task>-off_<NAME>/``), with ``--probes``
``python -m rtrt.tools.demo.probe`` (``M/probe_<NAME>.json``), and with ``--examples DIR``
``rtrt infer`` on the examples in four settings (``M/examples_<row>.jsonl``, scored against
``DIR/examples.json``'s references). A measurement whose output exists is not run again (delete it,
or pass ``--redo``), so an interrupted report resumes. ``--jobs N`` (default: the CPUs this process may
use) runs N measurements at a time, each pinned to its share of the CPUs with as many threads. Then ``M/report.md`` gets the tables the
README's demo section prints, from whatever is measured: the four-way ablation per task and split
(rare / common / all-groups F1), the changes against the baseline, the hints' precision / recall,
the F1 of the paper's groups (vehicle, traffic cone, barrier, all) in each setting,
issue 14's targets as pass / miss per split, the probes and the examples' recall / precision.

``--split`` is ``NAME=`` for the build's test split (what ``rtrt eval`` generates without
``--data``), ``NAME=DIR`` for the test split of a world in CODA-LM layout, ``NAME=DIR:SPLIT`` for
another split of it (``val=work/world:val``). ``--world-seed N`` adds ``seedN``: the test split of a
world the build never saw, drawn as the build's (``rtrt world --seed N`` with the full preset's
arguments, 200 images; generated once into the cache ``rtrt eval`` uses). Default: ``test=``.

``--check`` ends with one line counting the targets met and naming every miss, and exits 3 when a
target is missed: a rebuilt demo is judged by one command.

``--tables-only`` writes the tables from an existing ``M`` without measuring anything.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["Split", "PAPER_GROUPS", "parse_split", "seed_split", "measure", "tables", "group_table", "targets", "probe_targets",
           "verdicts", "main"]

from rtrt.runtime.machine import cores
from rtrt.tools.demo.probe import weakest_echo
from rtrt.tools.eval import ABLATION_ROWS

ROWS = tuple(r.name for r in ABLATION_ROWS)  # baseline, text_hints, visual_refine, both
LABELS = {"baseline": "baseline", "text_hints": "+ text hints", "visual_refine": "+ visual refinement", "both": "+ both"}
TASKS = ("general", "region")
EXAMPLE_ROWS = {"base": ["--no-hints", "--no-refine"], "hints": ["--no-refine"], "refine": ["--no-hints"], "both": []}


@dataclass(frozen=True)
class Split:
    name: str
    data: str | None  # None: the build's test split (rtrt eval's default)
    split: str = "test"

    def args(self) -> list[str]:
        return [] if self.data is None else ["--data", self.data, "--split", self.split]


def parse_split(text: str) -> Split:
    """``NAME=``, ``NAME=DIR`` or ``NAME=DIR:SPLIT``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"--split {text!r}: expected NAME=[DIR][:SPLIT] with a plain NAME")
    if not rest:
        return Split(name, None)
    data, _, split = rest.rpartition(":") if ":" in rest else (rest, "", "test")
    return Split(name, data, split or "test")


def seed_split(seed: int, progress: bool = True) -> Split:
    """``seedN``: the test split of the world drawn with ``seed`` as the full build draws its own
    (``rtrt.tools.eval.demo_test_world``; generated on first use, then reused from the cache)."""
    from rtrt.tools.eval import demo_test_world

    return Split(f"seed{seed}", str(demo_test_world(seed, progress=progress)))


def _cpu_groups(slots: int) -> list[list[int] | None]:
    """The CPUs of each of ``slots`` parallel measurements: this process's CPUs dealt out in turn;
    ``None`` for a slot left without a CPU of its own or where affinity is not available (not Linux)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return [None] * slots
    return [cpus[i::slots] or None for i in range(slots)]


class _Job:
    """One measurement command started in the background, stdout to a file beside its log (``out_file``:
    copied there atomically on success), stderr to ``log``. ``cpus``: ``False`` runs it as by hand (every
    CPU, default threads); a list pins it to those CPUs with as many threads (OMP and MKL by their
    variables, ONNX Runtime by the affinity it inherits); ``None`` one thread, not pinned."""

    def __init__(self, label: str, cmd: list[str], out_file: Path | None, log: Path, cpus: list[int] | None | bool):
        self.label, self.out_file, self.log, self.t = label, out_file, log, time.monotonic()
        self.stdout_path = log.with_suffix(".stdout")
        env = None
        if cpus is not False:
            threads = str(len(cpus) if cpus else 1)
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        with open(log, "w") as err, open(self.stdout_path, "w") as so:
            own = None
            if cpus:  # the child inherits the starting thread's affinity: set it around the start, then restore
                own = os.sched_getaffinity(0)
                os.sched_setaffinity(0, cpus)
            try:
                self.proc = subprocess.Popen(cmd, stdout=so, stderr=err, stdin=subprocess.DEVNULL, env=env)
            finally:
                if own is not None:
                    os.sched_setaffinity(0, own)

    def finish(self) -> float:
        """Waits for the command; copies its stdout to ``out_file`` on success; a one-line RuntimeError on failure."""
        self.proc.wait()
        try:
            if self.proc.returncode != 0:
                tail = self.log.read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise RuntimeError(f"{self.label} failed (exit {self.proc.returncode}): {tail[0]} (log: {self.log})")
            if self.out_file is not None:
                from rtrt.runtime.fileio import atomic_write_text

                atomic_write_text(self.out_file, self.stdout_path.read_text())
        finally:
            self.stdout_path.unlink(missing_ok=True)
        return time.monotonic() - self.t

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.stdout_path.unlink(missing_ok=True)


# Rough relative cost of a measurement (2-core AMD EPYC, shipped bundle: region ablation 85-105 s,
# probes 70-85, general ablation 30-35, examples 1): the longest start first, so parallel slots end together.
_COST = {"region": 3.0, "probe": 2.0, "general": 1.0, "examples": 0.0}


def _name(target: Path) -> str:
    """A measurement's name: its folder for an ablation (``<task>_<split>/scores.json``), else its file's stem."""
    return target.parent.name if target.name == "scores.json" else target.stem


def _cost(target: Path) -> float:
    return next((c for k, c in _COST.items() if _name(target).startswith(k)), 1.0)


def _run_all(jobs: list[tuple[str, Path, list[str], bool]], todo: list[int], out: Path, logs: Path, slots: int,
             echo) -> None:
    """Runs ``jobs[i]`` (label, output, command, output is the command's stdout) for ``i`` in ``todo``, at
    most ``slots`` at a time, each in its own share of the CPUs (one slot: the whole machine); echoes
    each as it ends; at the first failure stops the others and raises it (their outputs are not written)."""
    n = len(jobs)
    pending = sorted(todo, key=lambda i: -_cost(jobs[i][1]))  # stable: the listed order among equals
    groups = _cpu_groups(slots) if slots > 1 else [False]
    running: dict[int, tuple[_Job, int]] = {}  # slot -> (job, index)
    try:
        while pending or running:
            for slot in range(len(groups)):
                if slot not in running and pending:
                    i = pending.pop(0)
                    label, target, cmd, stdout = jobs[i]
                    running[slot] = (_Job(label, cmd, target if stdout else None, logs / f"{_name(target)}.log", groups[slot]), i)
            done = next((s for s, (j, _) in running.items() if j.proc.poll() is not None), None)
            if done is None:
                time.sleep(0.2)
                continue
            job, i = running.pop(done)
            secs = job.finish()
            echo(f"[{i + 1}/{n}] {jobs[i][1].relative_to(out)}: {secs:.0f} s")
    finally:
        for job, _ in running.values():
            job.kill()


def measure(out: Path, bundle: str | None, splits: Sequence[Split], tasks: Sequence[str], *, mask_off: bool = False,
            probes: bool = False, examples: str | None = None, limit: int | None = None, backend: str = "ort",
            redo: bool = False, parallel: int = 1, echo=print) -> None:
    """Every measurement the options ask for, each skipped where its output exists (unless ``redo``).

    ``parallel`` > 1: that many measurements at a time, each pinned to its share of the CPUs with as many
    threads (much of the demo's generation is per-token overhead that a second thread does not shorten:
    the shipped bundle's nine-split report took 23.0 min with 2 on the 2-core AMD EPYC, 31.4 min one
    after another on both cores, with the same bytes out); 1: one after another on the whole machine."""
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    py = [sys.executable, "-m"]
    b = ([] if bundle is None else ["--bundle", bundle]) + ["--backend", backend]
    lim = [] if limit is None else ["--limit", str(limit)]
    jobs: list[tuple[str, Path, list[str], bool]] = []  # (label, output, command, output is the command's stdout)
    for sp in splits:
        for task in tasks:
            for off in ((False, True) if mask_off else (False,)):
                d = out / f"{task}{'-off' if off else ''}_{sp.name}"
                jobs.append((f"rtrt eval --task {task} on {sp.name}{' --refine-mask-z off' if off else ''}", d / "scores.json", [*py, "rtrt.tools.cli", "eval", *b, *sp.args(), "--task", task, "--ablation",
                                                 "--out", str(d), "--quiet", *lim,
                                                 *(["--refine-mask-z", "off"] if off else [])], False))
        if probes:
            p = out / f"probe_{sp.name}.json"
            jobs.append((f"probe on {sp.name}", p, [*py, "rtrt.tools.demo.probe", *b, *sp.args(), "--json", str(p), "--quiet", *lim], False))
    if examples is not None:
        for row, flags in EXAMPLE_ROWS.items():
            jobs.append((f"rtrt infer ({row})", out / f"examples_{row}.jsonl", [*py, "rtrt.tools.cli", "infer", *b, "--image", examples, "--json", *flags], True))
    todo = []
    for i, (label, target, cmd, stdout) in enumerate(jobs):
        if target.exists() and not redo:
            echo(f"[{i + 1}/{len(jobs)}] {target.relative_to(out)}: measured already")
        else:
            todo.append(i)
    _run_all(jobs, todo, out, logs, max(1, min(parallel, len(todo))), echo)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _scores(out: Path, task: str, split: str) -> dict | None:
    p = out / f"{task}_{split}" / "scores.json"
    return json.loads(p.read_text())["rows"] if p.exists() else None


def _triple(entry: dict) -> tuple[float | None, float | None, float | None]:
    rc = entry.get("rare_common", {})
    return rc.get("rare", {}).get("f1"), rc.get("common", {}).get("f1"), entry["groups"]["all"]["f1"]


def _change(rows: dict, row: str) -> tuple[float, float, float]:
    """F1 change against the baseline; an undefined F1 ("-": nothing named) counts 0, as the README does."""
    return tuple((a or 0.0) - (b or 0.0) for a, b in zip(_triple(rows[row]), _triple(rows["baseline"])))


def ablation_table(out: Path, task: str, names: Sequence[str]) -> str | None:
    """The README's four-way ablation table of one task (``task`` may be ``general-off`` etc.)."""
    data = {n: _scores(out, task, n) for n in names}
    names = [n for n in names if data[n] is not None]
    if not names:
        return None
    lines = [f"| row | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for row in ROWS:
        lines.append(f"| {LABELS[row]} | " + " | ".join(" / ".join(map(_f, _triple(data[n][row]))) for n in names) + " |")
    for row in ROWS[1:]:
        lines.append(f"| change with {LABELS[row][2:]} | "
                     + " | ".join(" / ".join(f"{v:+.1f}" for v in _change(data[n], row)) for n in names) + " |")
    if any("hints" in data[n]["text_hints"] for n in names):
        cells = []
        for n in names:
            h = data[n]["text_hints"].get("hints")
            cells.append(f"{_f(h['precision'])} / {_f(h['recall'])} ({h['per_image']:.2f})" if h else "-")
        per = "region" if task.startswith("region") else "image"
        lines.append(f"| hint precision / recall (per {per}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The groups of the paper's region table (CODA-LM: Barrier, Cone, Vehicle, All), in the keyword judge's names.
PAPER_GROUPS = ("vehicle", "traffic_cone", "barrier", "all")


def group_table(out: Path, task: str, names: Sequence[str]) -> str | None:
    """F1 of the paper's groups per split: baseline -> text hints / refinement / both ("-": nothing named)."""
    data = {n: _scores(out, task, n) for n in names}
    names = [n for n in names if data[n] is not None]
    if not names:
        return None

    def cell(rows: dict, group: str) -> str:
        f = [rows[r]["groups"].get(group, {}).get("f1") for r in ROWS]
        return f"{_f(f[0])} -> " + " / ".join(map(_f, f[1:]))

    lines = [f"| group | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for g in PAPER_GROUPS:
        lines.append(f"| {g.replace('_', ' ')} | " + " | ".join(cell(data[n], g) for n in names) + " |")
    return "\n".join(lines)


def targets(rows: dict) -> dict[str, tuple[bool, str]]:
    """Issue 14's ablation targets on one split's rows: name -> (met, measured value)."""
    base = rows["baseline"]["rare_common"]
    rr, cr = base.get("rare", {}).get("recall") or 0.0, base.get("common", {}).get("recall") or 0.0
    ref, both = _change(rows, "visual_refine"), _change(rows, "both")
    res = {
        "baseline rare recall <= half of common": (rr <= 0.5 * cr, f"{rr:.1f} vs {cr:.1f}"),
        "refinement alone >= +10 rare F1": (ref[0] >= 10, f"{ref[0]:+.1f}"),
        "both >= +25 rare F1": (both[0] >= 25, f"{both[0]:+.1f}"),
        # A cost bound: common F1 may rise (region hints stop rare boxes being called cars), not fall by more than 2.
        "both: common F1 at most 2 below": (both[1] >= -2, f"{both[1]:+.1f}"),
        "both: all-groups F1 >= +5": (both[2] >= 5, f"{both[2]:+.1f}"),
    }
    h = rows["text_hints"].get("hints")
    if h:
        p, r = h["precision"] or 0.0, h["recall"] or 0.0
        res["hints: precision >= 50 at recall >= 60"] = (p >= 50 and r >= 60, f"{p:.1f} / {r:.1f}")
    return res


def targets_table(out: Path, task: str, names: Sequence[str]) -> str | None:
    data = {n: _scores(out, task, n) for n in names}
    names = [n for n in names if data[n] is not None]
    if not names:
        return None
    return "\n".join(_verdict_rows("target", {n: targets(data[n]) for n in names}))


def _verdict_rows(head: str, per: dict[str, dict[str, tuple[bool | None, str]]]) -> list[str]:
    """A markdown table of target verdicts: a row per target, a column per split."""
    names = list(per)
    lines = [f"| {head} | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for k in dict.fromkeys(k for n in names for k in per[n]):
        lines.append(f"| {k} | " + " | ".join(
            (f"{_verdict(per[n][k][0])} ({per[n][k][1]})" if k in per[n] else "-") for n in names) + " |")
    return lines


def probe_table(out: Path, names: Sequence[str]) -> str | None:
    data = {n: json.loads((out / f"probe_{n}.json").read_text()) for n in names if (out / f"probe_{n}.json").exists()}
    if not data:
        return None
    names = list(data)

    def row(label: str, fn) -> str:
        cells = []
        for n in names:
            try:
                cells.append(fn(data[n]))
            except (KeyError, TypeError, IndexError):
                cells.append("-")
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [f"| probe | {' | '.join(names)} |", "|---|" + "---|" * len(names),
             row("distinct baseline answers", lambda p: str(p["baseline"]["distinct_answers"]))]
    for c in dict.fromkeys(c for n in names for c in data[n].get("common", {})):
        lines.append(row(f"{c.replace('_', ' ')}: named when present minus absent (points)",
                         lambda p, c=c: f"{100 * p['common'][c]['difference']:+.1f}"))
    lines += [
        row("oracle: rare objects named with their name's embedding in their slots",
            lambda p: f"{100 * p['oracle']['share']:.1f}% ({p['oracle']['named']} of {p['oracle']['rare_objects']})"),
        row("region oracle: as is / slots written as stage 0b showed them",
            lambda p: f"{100 * p['region_oracle']['share']:.1f}% / {100 * p['region_oracle']['share_with_name_embedding']:.1f}%"),
        row("hint echo: hinted names repeated", lambda p: f"{100 * p['hint_echo']['share']:.1f}%"),
        row("hint echo's weakest classes (named of hinted)", lambda p: weakest_echo(p["hint_echo"], 2)),
        row("adapter tanh(gate); attention on the object's own row of W",
            lambda p: f"{p['adapter']['tanh_gate'][0]:.3f}; {100 * p['adapter']['attention_on_own_class']:.1f}%"),
        row("detector mean AUROC", lambda p: f"{p['detector']['mean_auroc']:.3f}"),
        row("detector's weakest classes", lambda p: ", ".join(
            f"{k.replace('_', ' ')} {v:.2f}" for k, v in sorted(p["detector"]["auroc"].items(), key=lambda kv: kv[1])[:2])),
        "",
        *_verdict_rows("probe target", {n: probe_targets(data[n]) for n in names}),
    ]
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else "met" if met else "**missed**"


def probe_targets(p: dict) -> dict[str, tuple[bool, str]]:
    """Issue 14's probe targets on one split's probe results: name -> (met or None where it does not apply, value)."""
    n, d = p["baseline"].get("answers"), p["baseline"]["distinct_answers"]
    # The target is for the 200 test images; on fewer answers it does not apply (None).
    res = {"distinct baseline answers >= 50 (of 200)": (d >= 50 if n is None or n >= 200 else None, f"{d} of {n or '?'}")}
    diffs = {c: 100 * v["difference"] for c, v in p["common"].items() if v.get("difference") is not None}
    if diffs:
        worst = min(diffs, key=diffs.get)
        res["every common class >= +30 points"] = (diffs[worst] >= 30, f"{worst.replace('_', ' ')} {diffs[worst]:+.1f}")
    res["oracle names >= 50%"] = (p["oracle"]["share"] >= 0.5, f"{100 * p['oracle']['share']:.1f}%")
    res["detector mean AUROC >= 0.90"] = (p["detector"]["mean_auroc"] >= 0.90, f"{p['detector']['mean_auroc']:.3f}")
    return res


def verdicts(out: Path, names: Sequence[str], tasks: Sequence[str] = TASKS) -> list[tuple[str, bool]]:
    """Every judged target of what ``out`` holds: (``"<task or probes> <split>: <target> (<value>)"``, met);
    a probe target that does not apply (``n/a``) is left out."""
    res = []
    for task in tasks:
        for n in names:
            rows = _scores(out, task, n)
            if rows is not None:
                res += [(f"{task} {n}: {k} ({v})", met) for k, (met, v) in targets(rows).items()]
    for n in names:
        p = out / f"probe_{n}.json"
        if p.exists():
            res += [(f"probes {n}: {k} ({v})", met) for k, (met, v) in probe_targets(json.loads(p.read_text())).items()
                    if met is not None]
    return res


def examples_table(out: Path, examples: str | None) -> str | None:
    if examples is None or not (Path(examples) / "examples.json").exists():
        return None
    from rtrt.tools.judge import find_mentions

    refs = {k: find_mentions(v["reference"]) for k, v in json.loads((Path(examples) / "examples.json").read_text()).items()}
    lines = ["| setting | recall | precision | answers |", "|---|---:|---:|---:|"]
    for row in EXAMPLE_ROWS:
        p = out / f"examples_{row}.jsonl"
        if not p.exists():
            continue
        tp = n_ref = n_got = n = 0
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            got, ref = find_mentions(rec["answer"]), refs.get(Path(rec["image"]).name, set())
            tp, n_ref, n_got, n = tp + len(got & ref), n_ref + len(ref), n_got + len(got), n + 1
        lines.append(f"| {row} | {100 * tp / max(n_ref, 1):.1f} | {100 * tp / max(n_got, 1):.1f} | {n} |")
    return "\n".join(lines) if len(lines) > 2 else None


def tables(out: Path, names: Sequence[str], tasks: Sequence[str] = TASKS, examples: str | None = None) -> str:
    """``report.md``'s text from whatever ``out`` holds."""
    parts = [f"# Demo bundle report ({out})", ""]
    for task in tasks:
        for suffix, title in (("", ""), ("-off", ", `--refine-mask-z off`")):
            t = ablation_table(out, task + suffix, names)
            if t:
                parts += [f"## {task} questions{title}: rare / common / all-groups F1", "", t, ""]
        t = group_table(out, task, names)
        if t:
            parts += [f"## {task} questions, the paper's groups: F1, baseline -> text hints / refinement / both", "", t, ""]
        t = targets_table(out, task, names)
        if t:
            parts += [f"## issue 14's ablation targets, {task} questions", "", t, ""]
    for title, t in (("probes", probe_table(out, names)), ("examples (keyword judge against examples.json)", examples_table(out, examples))):
        if t:
            parts += [f"## {title}", "", t, ""]
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rtrt.tools.demo.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder of the measurements and report.md")
    p.add_argument("--bundle", default=None, help="bundle directory (default: the embedded demo bundle)")
    p.add_argument("--split", dest="splits", type=parse_split, action="append", default=None, metavar="NAME=[DIR][:SPLIT]",
                   help="a split to measure, repeatable: NAME= the build's test split, NAME=DIR a world's test split, "
                        "NAME=DIR:SPLIT another split of it (default: test=)")
    p.add_argument("--world-seed", dest="world_seeds", type=int, action="append", default=[], metavar="N",
                   help="also the test split of a world drawn with seed N as the build draws its own (split seedN; repeatable)")
    p.add_argument("--task", dest="tasks", choices=TASKS, action="append", default=None, help="repeatable (default: general)")
    p.add_argument("--mask-off", action="store_true", help="also every ablation with --refine-mask-z off")
    p.add_argument("--probes", action="store_true", help="also the probes per split")
    p.add_argument("--examples", default=None, help="folder of example images with examples.json: rtrt infer in four settings")
    p.add_argument("--backend", default="ort", choices=("ort", "torch"), help="detector/adapter backend (default: ort)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions / images of each split")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="measurements at a time, each pinned to its share of the CPUs (default: the CPUs this process "
                        "may use; 1: one after another on every CPU)")
    p.add_argument("--redo", action="store_true", help="measure again where outputs exist")
    p.add_argument("--tables-only", action="store_true", help="write report.md from --out without measuring")
    p.add_argument("--check", action="store_true",
                   help="end with one line: the targets met and every miss; exit 3 when one is missed")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    splits = args.splits or ([] if args.world_seeds else [Split("test", None)])
    names = [s.name for s in splits] + [f"seed{n}" for n in args.world_seeds]
    if len(set(names)) != len(names):
        print("rtrt demo report: error: --split names must differ (--world-seed N is named seedN)", file=sys.stderr)
        return 2
    if any(n < 0 for n in args.world_seeds):
        print("rtrt demo report: error: --world-seed must be 0 or more", file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        print("rtrt demo report: error: --jobs must be 1 or more", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.tables_only and not out.is_dir():
        print(f"rtrt demo report: error: --tables-only: no folder {out}", file=sys.stderr)
        return 2
    if not args.tables_only:
        try:
            splits = splits + [seed_split(n) for n in args.world_seeds]
            measure(out, args.bundle, splits, args.tasks or ["general"], mask_off=args.mask_off, probes=args.probes,
                    examples=args.examples, limit=args.limit, backend=args.backend, redo=args.redo,
                    parallel=args.jobs or cores(), echo=lambda m: print(m, file=sys.stderr))
        except RuntimeError as e:
            print(f"rtrt demo report: error: {e}", file=sys.stderr)
            return 1
    text = tables(out, names, TASKS, args.examples)
    from rtrt.runtime.fileio import atomic_write_text

    atomic_write_text(out / "report.md", text)
    print(text)
    if args.check:
        judged = verdicts(out, names, TASKS)
        missed = [label for label, met in judged if not met]
        if not judged:
            print("rtrt demo report: check: nothing measured to judge", file=sys.stderr)
            return 3
        print(f"issue 14's targets: {len(judged) - len(missed)} of {len(judged)} met"
              + (f"; missed: {'; '.join(missed)}" if missed else ""))
        return 3 if missed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
