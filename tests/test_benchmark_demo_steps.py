"""`python -m rtrt.tools.benchmarks.demo_steps`: the demo build's training steps profiled (tiny preset)."""
from __future__ import annotations

import json

from rtrt.tools.benchmarks import demo_steps


def test_each_stage_is_timed_and_split_by_kind(tmp_path, capsys):
    out = tmp_path / "steps.json"
    assert demo_steps.main(["--preset", "tiny", "--threads", "1", "--sgemm-size", "256", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["threads"] == 1 and r["sgemm_gflops"] > 0 and set(r["steps"]) == {"stage0b", "stage1", "vfm"}
    for step in r["steps"].values():
        assert step["ms_per_step"] > 0
        assert abs(sum(step["share_pct"].values()) - 100) < 0.2 and step["share_pct"]["matmul"] > 0
        assert step["matmul_gflops"] is None or step["matmul_gflops"] > 0
    assert r["steps"]["stage1"]["share_pct"]["convolution"] > 0  # the tower's patch embedding
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_unknown_preset_is_one_line(capsys):
    assert demo_steps.main(["--preset", "nosuch"]) == 2
    assert capsys.readouterr().err.strip().startswith("rtrt demo steps: error: unknown preset 'nosuch'")
