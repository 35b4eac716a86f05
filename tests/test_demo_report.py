"""`python -m rtrt.tools.demo.report`: the README's demo tables from measurements (issue 14's tooling)."""
from __future__ import annotations

import argparse
import json
import sys

import pytest

from rtrt.tools.demo import report
from fixtures.tiny_bundle import tiny_world_and_llava_bundle


def test_parse_split():
    assert report.parse_split("test=") == report.Split("test", None)
    assert report.parse_split("s1=/w/one") == report.Split("s1", "/w/one", "test")
    assert report.parse_split("val=work/world:val") == report.Split("val", "work/world", "val")
    assert report.parse_split("val=work/world:val").args() == ["--data", "work/world", "--split", "val"]
    for bad in ("test", "=x", "a b=x"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=.DIR"):
            report.parse_split(bad)


def _row(rare, common, all_, rare_recall=0.0, common_recall=80.0, hints=None):
    e = {"groups": {"all": {"f1": all_}},
         "rare_common": {"rare": {"f1": rare, "recall": rare_recall}, "common": {"f1": common, "recall": common_recall}}}
    if hints:
        e["hints"] = {"precision": hints[0], "recall": hints[1], "per_image": 1.5}
    return e


def _write_scores(out, name, rows):
    d = out / name
    d.mkdir(parents=True)
    (d / "scores.json").write_text(json.dumps({"rows": rows}))


def test_tables_and_targets_from_measurements(tmp_path):
    # Split a meets every target; split b misses refinement (+9.9), common (-2.5) and hint recall (59.9).
    _write_scores(tmp_path, "general_a", {
        "baseline": _row(None, 80.0, 60.0), "text_hints": _row(50.0, 80.0, 68.0, hints=(55.0, 65.0)),
        "visual_refine": _row(12.0, 79.0, 61.0), "both": _row(55.0, 79.5, 69.0, hints=(55.0, 65.0))})
    _write_scores(tmp_path, "general_b", {
        "baseline": _row(0.0, 80.0, 60.0), "text_hints": _row(50.0, 80.0, 68.0, hints=(55.0, 59.9)),
        "visual_refine": _row(9.9, 79.0, 61.0), "both": _row(55.0, 77.5, 69.0, hints=(55.0, 59.9))})
    t = report.targets(json.loads((tmp_path / "general_a" / "scores.json").read_text())["rows"])
    assert all(met for met, _ in t.values()) and t["refinement alone >= +10 rare F1"][1] == "+12.0"
    t = report.targets(json.loads((tmp_path / "general_b" / "scores.json").read_text())["rows"])
    missed = {k for k, (met, _) in t.items() if not met}
    assert missed == {"refinement alone >= +10 rare F1", "both: common F1 at most 2 below", "hints: precision >= 50 at recall >= 60"}
    # A rise in common F1 is no cost (region hints stop rare boxes being answered as common classes).
    up = {**json.loads((tmp_path / "general_a" / "scores.json").read_text())["rows"], "both": _row(55.0, 86.0, 69.0)}
    assert report.targets(up)["both: common F1 at most 2 below"] == (True, "+6.0")
    md = report.tables(tmp_path, ["a", "b", "absent"])
    assert "| baseline | - / 80.0 / 60.0 | 0.0 / 80.0 / 60.0 |" in md  # "absent" has no column
    assert "| change with visual refinement | +12.0 / -1.0 / +1.0 | +9.9 / -1.0 / +1.0 |" in md
    assert "| hint precision / recall (per image) | 55.0 / 65.0 (1.50) | 55.0 / 59.9 (1.50) |" in md
    assert "| refinement alone >= +10 rare F1 | met (+12.0) | **missed** (+9.9) |" in md
    assert "region" not in md  # nothing measured there


def test_the_paper_groups_per_split(tmp_path):
    # The paper's region table is per group (Barrier, Cone, Vehicle, All): a split where hints and refinement
    # leave the traffic cone unnamed shows it, and a group nothing named prints "-".
    def rows(cone):
        return {r: {"groups": {"vehicle": {"f1": 50.0 + i}, "traffic_cone": {"f1": cone[i]}, "all": {"f1": 40.0 + i}},
                    "rare_common": {}} for i, r in enumerate(report.ROWS)}
    _write_scores(tmp_path, "region_a", rows([0.0, 0.0, 7.7, 7.1]))
    _write_scores(tmp_path, "region_b", rows([None, 80.0, 30.0, 81.0]))
    t = report.group_table(tmp_path, "region", ["a", "b", "absent"])
    assert t.splitlines()[0] == "| group | a | b |"
    assert "| traffic cone | 0.0 -> 0.0 / 7.7 / 7.1 | - -> 80.0 / 30.0 / 81.0 |" in t
    assert "| barrier | - -> - / - / - | - -> - / - / - |" in t  # no barrier measured
    assert "| vehicle | 50.0 -> 51.0 / 52.0 / 53.0 | 50.0 -> 51.0 / 52.0 / 53.0 |" in t
    assert "the paper's groups" in report.tables(tmp_path, ["a", "b"], tasks=("region",))
    assert report.group_table(tmp_path, "general", ["a"]) is None  # nothing measured for that task


def test_hint_echo_weakest_classes_in_the_probe_table(tmp_path):
    p = {"baseline": {"distinct_answers": 60, "answers": 200}, "common": {}, "oracle": {"share": 0.9, "named": 9, "rare_objects": 10},
         "hint_echo": {"share": 0.9, "per_class": {"barrier": {"hinted": 11, "named": 11, "share": 1.0},
                                                   "traffic_cone": {"hinted": 14, "named": 3, "share": 3 / 14},
                                                   "dog": {"hinted": 4, "named": 3, "share": 0.75}}},
         "detector": {"mean_auroc": 0.93, "auroc": {"dog": 0.8}}}
    (tmp_path / "probe_test.json").write_text(json.dumps(p))
    assert "| hint echo's weakest classes (named of hinted) | traffic cone 3 of 14, dog 3 of 4 |" in report.probe_table(tmp_path, ["test"])


def test_probe_targets():
    p = {"baseline": {"distinct_answers": 34, "answers": 100},
         "common": {"car": {"difference": 0.9}, "traffic_light": {"difference": 0.278}},
         "oracle": {"share": 0.93}, "detector": {"mean_auroc": 0.899}}
    t = report.probe_targets(p)
    assert t["distinct baseline answers >= 50 (of 200)"] == (None, "34 of 100")  # not for 100 answers
    assert t["every common class >= +30 points"] == (False, "traffic light +27.8")
    assert t["oracle names >= 50%"][0] and not t["detector mean AUROC >= 0.90"][0]


def test_measure_on_a_tiny_bundle_then_resume(tmp_path):
    _, _, bundle = tiny_world_and_llava_bundle(tmp_path)
    out = tmp_path / "m"
    argv = ["--out", str(out), "--bundle", str(bundle), "--split", f"t={tmp_path / 'world'}", "--limit", "2", "--backend", "torch"]
    assert report.main(argv) == 0
    rows = json.loads((out / "general_t" / "scores.json").read_text())["rows"]
    assert list(rows) == list(report.ROWS)
    md = (out / "report.md").read_text()
    assert "## general questions" in md and "| + both |" in md and "issue 14's ablation targets" in md
    before = (out / "general_t" / "scores.json").stat().st_mtime_ns
    assert report.main(argv) == 0  # measured already: not run again
    assert (out / "general_t" / "scores.json").stat().st_mtime_ns == before

def test_a_failing_measurement_is_one_line(tmp_path, capsys):
    assert report.main(["--out", str(tmp_path / "m"), "--bundle", str(tmp_path / "nosuch"), "--split", "t=", "--limit", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rtrt demo report: error: rtrt eval --task general on t failed (exit ")


def test_check_counts_the_targets_and_names_every_miss(tmp_path, capsys):
    # Split a meets every target, b misses refinement alone; the probes of a miss the AUROC; "n/a" is not judged.
    good = {"baseline": _row(None, 80.0, 60.0), "text_hints": _row(50.0, 80.0, 68.0, hints=(55.0, 65.0)),
            "visual_refine": _row(12.0, 79.0, 61.0), "both": _row(55.0, 79.5, 69.0, hints=(55.0, 65.0))}
    _write_scores(tmp_path, "general_a", good)
    _write_scores(tmp_path, "region_a", good)
    argv = ["--out", str(tmp_path), "--split", "a=/w/a", "--tables-only", "--check"]
    assert report.main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "issue 14's targets: 12 of 12 met"
    _write_scores(tmp_path, "general_b", {**good, "visual_refine": _row(9.9, 79.0, 61.0)})
    (tmp_path / "probe_a.json").write_text(json.dumps({
        "baseline": {"distinct_answers": 34, "answers": 100}, "common": {"car": {"difference": 0.9}},
        "oracle": {"share": 0.93}, "detector": {"mean_auroc": 0.899}}))
    assert report.main([*argv, "--split", "b=/w/b"]) == 3
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == ("issue 14's targets: 19 of 21 met; missed: general b: refinement alone >= +10 rare F1 (+9.9); "
                    "probes a: detector mean AUROC >= 0.90 (0.899)")
    (tmp_path / "empty").mkdir()
    assert report.main(["--out", str(tmp_path / "empty"), "--split", "a=/w/a", "--tables-only", "--check"]) == 3
    assert capsys.readouterr().err.strip() == "rtrt demo report: check: nothing measured to judge"


def test_world_seed_adds_a_world_drawn_as_the_build_draws(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sp = report.seed_split(11, progress=False)
    root = tmp_path / "cache" / "rtrt" / "demo-world-test-seed11"
    assert sp == report.Split("seed11", str(root), "test")
    assert len(list((root / "test" / "images").iterdir())) == 200  # the build's test-split size
    stamp = (root / "world.json").stat().st_mtime_ns
    assert report.seed_split(11, progress=False) == sp and (root / "world.json").stat().st_mtime_ns == stamp  # reused
    # Named seedN beside the other splits; a clash with a --split name is refused in one line.
    _write_scores(tmp_path / "m", "general_seed11", {"baseline": _row(None, 80.0, 60.0), "text_hints": _row(50.0, 80.0, 68.0),
                                                     "visual_refine": _row(12.0, 79.0, 61.0), "both": _row(55.0, 79.5, 69.0)})
    assert report.main(["--out", str(tmp_path / "m"), "--world-seed", "11", "--tables-only"]) == 0
    assert "| row | seed11 |" in capsys.readouterr().out
    assert report.main(["--out", str(tmp_path / "m"), "--split", "seed11=/w", "--world-seed", "11", "--tables-only"]) == 2
    assert capsys.readouterr().err.strip() == "rtrt demo report: error: --split names must differ (--world-seed N is named seedN)"


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_parallel_measurements_run_side_by_side_each_on_its_own_cpu(tmp_path):
    # Each job announces itself, then waits (at most 60 s) for the other's announcement: both can
    # succeed only if they run at the same time. Each prints its CPU affinity and thread variables.
    out, logs = tmp_path / "m", tmp_path / "m" / "logs"
    logs.mkdir(parents=True)
    def job(me, other):
        code = (f"import os, sys, time, json, pathlib; d = pathlib.Path({str(tmp_path)!r}); (d / {me!r}).touch()\n"
                f"t = time.time()\nwhile not (d / {other!r}).exists():\n"
                f"    time.sleep(0.05)\n    if time.time() - t > 60: sys.exit('alone')\n"
                "print(json.dumps([sorted(os.sched_getaffinity(0)), os.environ.get('OMP_NUM_THREADS')]))")
        return (f"job {me}", out / f"probe_{me}.json", _py(code), True)
    jobs = [job("a", "b"), job("b", "a")]
    said = []
    report._run_all(jobs, [0, 1], out, logs, 2, said.append)
    seen = [json.loads((out / f"probe_{n}.json").read_text()) for n in "ab"]
    groups = report._cpu_groups(2)
    if all(groups):  # two CPUs or more: each job pinned to its own share, with as many threads
        assert sorted(map(tuple, (s[0] for s in seen))) == sorted(map(tuple, groups))
        assert all(s[1] == str(len(s[0])) for s in seen)
    else:
        assert [s[1] for s in seen] == ["1", "1"]
    assert {m.split(":")[0] for m in said} == {"[1/2] probe_a.json", "[2/2] probe_b.json"}
    assert not list(logs.glob("*.stdout"))  # the captured stdout moved to its output


def test_one_at_a_time_runs_as_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    out, logs = tmp_path / "m", tmp_path / "m" / "logs"
    logs.mkdir(parents=True)
    jobs = [("env", out / "examples_x.jsonl", _py("import os; print(os.environ['OMP_NUM_THREADS'])"), True)]
    report._run_all(jobs, [0], out, logs, 1, lambda m: None)
    assert (out / "examples_x.jsonl").read_text().strip() == "7"  # the caller's environment, untouched


def test_a_failing_parallel_measurement_stops_the_others(tmp_path):
    out, logs = tmp_path / "m", tmp_path / "m" / "logs"
    logs.mkdir(parents=True)
    slow = ("slow", out / "region_s" / "scores.json", _py("import time; time.sleep(120); print('late')"), True)
    (out / "region_s").mkdir()
    bad = ("rtrt eval --task general on b", out / "general_b" / "scores.json",
           _py("import sys; print('loading', file=sys.stderr); sys.exit('boom: no bundle')"), False)
    with pytest.raises(RuntimeError) as e:
        report._run_all([slow, bad], [0, 1], out, logs, 2, lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("rtrt eval --task general on b failed (exit 1): boom: no bundle (log: ")
    assert not (out / "region_s" / "scores.json").exists()  # the other one stopped, nothing written
    assert not list(logs.glob("*.stdout"))


def test_jobs_must_be_positive(tmp_path, capsys):
    assert report.main(["--out", str(tmp_path / "m"), "--split", "t=", "--jobs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "rtrt demo report: error: --jobs must be 1 or more"
