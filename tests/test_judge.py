"""CODA-LM judges: keyword mentions and exact scores, the OpenAI judge against a local server, tables, CLI."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rtrt.tools import judge as J
from rtrt.tools.judge import JudgeItem, KeywordJudge, OpenAIJudge, OpenAIJudgeConfig, find_mentions
from rtrt.trainer import coda


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two traffic cones and an orange pylon block the lane.", {"traffic_cone"}),
        ("A road-work warning sign next to a STOP sign.", {"warning_sign", "traffic_sign"}),
        ("The ego car should keep its lane; the ego vehicle slows.", set()),
        ("There are no dogs and not a cat, but a kitten.", {"cat"}),
        ("Buses, lorries and children.", {"bus", "truck", "pedestrian"}),
        ("A carton and a cartoon caravan.", {"carton", "recreational_vehicle"}),
        ("A person riding a bicycle passes a parked bike.", {"cyclist", "bicycle"}),
        ("A garbage can, a garbage bag and loose garbage.", {"dustbin", "garbage_bag", "garbage"}),
        ("Concrete blocks and a concrete barrier with bollards.", {"concrete_block", "barrier"} | {"bollard"}),
        ("", set()),
    ],
)
def test_find_mentions(text, expected):
    assert find_mentions(text) == expected


def test_synonym_table_covers_every_category_and_names_itself():
    assert set(J.SYNONYMS) == set(coda.CATEGORIES)
    for cat, names in J.SYNONYMS.items():
        assert names, cat
        if cat != "misc":
            assert find_mentions(f"I see a {cat.replace('_', ' ')} here.") == {cat}, cat


def test_keyword_judge_exact_numbers():
    items = [
        JudgeItem(0, "A traffic cone and a car ahead.", "I see a cone and a truck."),  # R {cone, car}, P {cone, truck}
        JudgeItem(1, "A dog on the road.", "A dog and a cat."),  # R {dog}, P {dog, cat}
        JudgeItem(2, "This object is something.", "A pole.", ("bollard",)),  # R {bollard} from the annotation
        JudgeItem(3, "Nothing here.", None),  # no prediction: scored as empty
    ]
    rep = KeywordJudge().judge("general_perception", items)
    assert [round(s.score, 2) for s in rep.items] == [50.0, 66.67, 0.0, 100.0]
    assert rep.items[0].groups == ("vehicle", "traffic_cone") and rep.items[2].groups == ("barrier",)
    assert [s.question_id for s in rep.failed] == [3] and rep.failed[0].error == "no prediction"
    g = rep.groups
    assert g["vehicle"] == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "support": 1.0}
    assert g["traffic_cone"] == {"recall": 100.0, "precision": 100.0, "f1": 100.0, "support": 1.0}
    assert g["miscellaneous"]["recall"] == 100.0 and g["miscellaneous"]["precision"] == 50.0
    assert g["miscellaneous"]["f1"] == pytest.approx(200 / 3)
    assert g["barrier"] == {"recall": 0.0, "precision": None, "f1": None, "support": 1.0}
    assert g["vru"] == {"recall": None, "precision": None, "f1": None, "support": 0.0}
    assert g["all"] == {"recall": 50.0, "precision": 50.0, "f1": 50.0, "support": 4.0}
    assert set(rep.categories) == {"traffic_cone", "car", "truck", "dog", "cat", "bollard"}
    assert rep.categories["truck"]["precision"] == 0.0


def test_parse_rating():
    assert J.parse_rating("Good.\nRating: [[8]]") == 8.0
    assert J.parse_rating("rating is: [[ 7 ]]") == 7.0
    assert J.parse_rating("I weigh [[3]] against [[9]].") == 9.0  # last bracket is the verdict
    assert J.parse_rating("Rating: [[10]] (from a scale [[2]])") == 10.0  # explicit 'Rating:' wins
    for bad in ("Rating: 8", "Rating: [[0]]", "Rating: [[11]]", "Rating: [[eight]]", "", None):
        assert J.parse_rating(bad) is None


def test_score_table():
    text = J.score_table({"region": {"vehicle": 72.25, "all": 50.0}, "general": {}}, "task")
    lines = text.splitlines()
    assert lines[0] == "| task | vehicle | vru | traffic_sign | traffic_light | traffic_cone | barrier | miscellaneous | all |"
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| region | 72.2 | - | - | - | - | - | - | 50.0 |"
    assert lines[3] == "| general | - | - | - | - | - | - | - | - |"


# --- OpenAI-compatible judge against a local server -----------------------------------------


class _Handler(BaseHTTPRequestHandler):
    seen: list = []
    flaky_left = {"n": 1}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        pred = body["messages"][-1]["content"]
        if "SLOW" in pred:
            time.sleep(1.0)
        if "FLAKY" in pred and self.flaky_left["n"] > 0:
            self.flaky_left["n"] -= 1
            self.send_error(503, "busy")
            return
        if "DENIED" in pred:
            self.send_error(401, "bad key")
            return
        reply = {"GOOD": "Accurate. Rating: [[8]]", "BAD": "Fine overall. Rating: [[eleven]]", "FLAKY": "Rating: [[6]]"}
        content = next((v for k, v in reply.items() if k in pred), "Rating: [[5]]")
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass


@pytest.fixture()
def server():
    _Handler.seen = []
    _Handler.flaky_left = {"n": 1}
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_openai_judge_scores_retries_and_reports_failures(server):
    cfg = OpenAIJudgeConfig(base_url=server, model="judge-m", api_key="k-test", timeout_s=0.3, retries=1, backoff_s=0.01, workers=3)
    items = [
        JudgeItem(0, "A cone in the ego lane.", "GOOD answer", ("traffic_cone",)),
        JudgeItem(1, "A dog.", "BAD answer", ("dog",)),
        JudgeItem(2, "A car.", "SLOW answer", ("car",)),
        JudgeItem(3, "A bollard.", "FLAKY answer", ("bollard",)),
        JudgeItem(4, "A bus.", "plain answer", ("bus",)),
        JudgeItem(5, "A tire.", None, ("tire",)),
        JudgeItem(6, "A cat.", "DENIED", ("cat",)),
    ]
    t0 = time.perf_counter()
    rep = OpenAIJudge(cfg).judge("region_perception", items)
    assert time.perf_counter() - t0 < 5
    by_id = {s.question_id: s for s in rep.items}
    assert [s.question_id for s in rep.items] == list(range(7))
    assert by_id[0].score == 80.0 and by_id[0].detail["rating"] == 8.0
    assert by_id[1].score is None and "no valid 'Rating: [[1-10]]'" in by_id[1].error and "eleven" in by_id[1].error
    assert by_id[2].score is None and "timed out" in by_id[2].error and "(2 attempts)" in by_id[2].error
    assert by_id[3].score == 60.0  # 503 once, then answered on the retry
    assert by_id[4].score == 50.0
    assert by_id[5].error == "no prediction"
    assert by_id[6].score is None and "HTTP 401" in by_id[6].error
    assert all("\n" not in s.error for s in rep.failed) and len(rep.failed) == 4
    assert rep.groups["traffic_cone"]["score"] == 80.0 and rep.groups["vehicle"] == {"score": 50.0, "n": 1.0}
    assert rep.groups["all"]["score"] == pytest.approx((80 + 60 + 50) / 3) and rep.groups["all"]["failed"] == 4.0
    path, auth, body = next(s for s in _Handler.seen if "GOOD" in s[2]["messages"][-1]["content"])
    assert path == "/v1/chat/completions" and auth == "Bearer k-test"
    assert body["model"] == "judge-m" and body["temperature"] == 0.0
    assert body["messages"][0]["role"] == "system" and "Rating: [[N]]" in body["messages"][0]["content"]
    user = body["messages"][1]["content"]
    assert "[The Start of Reference Text]\nA cone in the ego lane.\n[The End of Reference Text]" in user
    assert "[The Start of Prediction Text]\nGOOD answer\n[The End of Prediction Text]" in user
    assert sum("DENIED" in s[2]["messages"][-1]["content"] for s in _Handler.seen) == 1  # 401 is not retried


def test_openai_judge_unreachable_server_is_per_item():
    cfg = OpenAIJudgeConfig(base_url="http://127.0.0.1:9/v1", timeout_s=0.5, retries=1, backoff_s=0.01, workers=1)
    rep = OpenAIJudge(cfg).judge("general_perception", [JudgeItem(0, "A car.", "A car.")])
    assert rep.items[0].score is None and rep.items[0].error.startswith("request failed:")
    assert rep.groups["all"] == {"score": None, "n": 0.0, "failed": 1.0}
    with pytest.raises(ValueError, match="unknown task"):
        OpenAIJudge(cfg).judge("vqa", [])


# --- Items and the command line -------------------------------------------------------------


def test_build_items_pairs_by_question_id():
    refs = [coda.TaskRecord(0, "a", "q", "A dog."), coda.TaskRecord(1, "b", "q", "A cone.")]
    preds = [coda.TaskRecord(1, "", "", "cone"), coda.TaskRecord(7, "", "", "stray")]
    items = J.build_items("region_perception", refs, preds, region_categories=["dog", "traffic_cone"])
    assert items == [JudgeItem(0, "A dog.", None, ("dog",)), JudgeItem(1, "A cone.", "cone", ("traffic_cone",))]
    with pytest.raises(coda.CodaFormatError, match="no reference answer"):
        J.build_items("general_perception", [coda.TaskRecord(0, "a", "q")], [])


def test_cli_keyword_on_a_world_split(tmp_path, capsys):
    from rtrt.tools.demo.world import WorldConfig, generate_world

    generate_world(WorldConfig(seed=2, pretrain=0, plugin=0, val=4, test=0, width=96, height=96, rare_prob=1.0), tmp_path / "w", progress=False)
    split = tmp_path / "w" / "CODA-LM" / "val"
    preds = tmp_path / "preds"
    preds.mkdir()
    for task in coda.TASKS:
        recs = coda.read_tasks(coda.task_file(split / "vqa_anno", task))
        with open(preds / f"{task}_answer.jsonl", "w") as f:  # a perfect model: the references themselves
            for r in recs:
                f.write(json.dumps({"question_id": r.question_id, "answer": r.answer}) + "\n")
    out = tmp_path / "scores.json"
    assert J.main(["--references", str(split), "--predictions", str(preds), "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| keyword f1 | vehicle |")
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in table[2:]}
    assert rows["general_perception"] == rows["region_perception"] == "100.0"
    reports = json.loads(out.read_text())
    assert [r["task"] for r in reports] == list(coda.TASKS)
    assert J.main(["--references", str(tmp_path / "nope"), "--predictions", str(preds)]) == 2
    assert "annotation directory not found" in capsys.readouterr().err
