"""``rtrt synonyms`` against a small OpenAI-compatible server on 127.0.0.1: replies, rarity, bad replies, timeouts."""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rtrt.runtime.errors import InputError
from rtrt.tools.cli import main as rtrt_main
from rtrt.trainer.synonyms import load_synonyms, parse_variants, variant_counts
from fixtures.train_data import annotations_dir, make_dataset


class Server:
    """A chat-completions endpoint whose reply is chosen by ``mode``."""

    def __init__(self):
        self.mode = "ok"
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                prompt = body["messages"][-1]["content"]
                n = int(re.search(r"List (\d+)", prompt).group(1))
                name = re.search(r"refer to a (.+?) seen", prompt).group(1)
                if outer.mode == "slow":
                    time.sleep(1.5)
                content = {
                    "ok": json.dumps([f"{name} variant {i}" for i in range(n)]),
                    "fenced": "Sure!\n```json\n" + json.dumps([name, f"big {name}", f"small {name}"]) + "\n```",
                    "malformed": "I cannot answer in JSON, sorry.",
                    "slow": json.dumps(["late"]),
                }[outer.mode]
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 8 images x 2 regions over traffic_cone, dog and barrier; debris has none.
    root = make_dataset(tmp_path_factory.mktemp("syn") / "data", n_images=8)
    return annotations_dir(root)


def _args(server, ann, out, *extra):
    return ["synonyms", "--annotations", str(ann), "--url", server.url, "--model", "tiny", "--out", str(out), *extra]


def test_variants_are_written_and_rare_classes_get_more(server, data, tmp_path, monkeypatch):
    server.mode, server.requests = "ok", []
    monkeypatch.setenv("RTRT_TEST_KEY", "sk-test")
    out = tmp_path / "synonyms.json"
    extra = ["--classes", "traffic_cone,dog,debris", "--min-variants", "3", "--max-variants", "9", "--api-key-env", "RTRT_TEST_KEY"]
    assert rtrt_main(_args(server, data, out, *extra)) == 0
    table = load_synonyms(out)
    assert set(table) == {"traffic_cone", "dog", "debris"}
    assert len(table["debris"]) == 9  # no regions: the most variants
    assert 3 <= len(table["traffic_cone"]) < 9 and table["dog"][0] == "dog variant 0"
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sk-test" and r["model"] == "tiny" for r in server.requests)


def test_variant_counts_follow_rarity():
    counts = variant_counts({"car": 1000, "cone": 30, "dog": 1, "debris": 0}, 4, 16)
    assert counts["car"] == 4 and counts["debris"] == 16 and counts["dog"] == 16
    assert 4 < counts["cone"] < 16


def test_reply_in_code_fence_is_parsed_and_deduplicated(server, data, tmp_path):
    server.mode = "fenced"
    out = tmp_path / "synonyms.json"
    assert rtrt_main(_args(server, data, out, "--classes", "traffic_cone")) == 0
    # The class's own name is dropped: phase 1 always uses it anyway.
    assert load_synonyms(out) == {"traffic_cone": ["big traffic cone", "small traffic cone"]}


def test_malformed_reply_is_one_line_error_and_no_file(server, data, tmp_path, capsys):
    server.mode, server.requests = "malformed", []
    out = tmp_path / "synonyms.json"
    assert rtrt_main(_args(server, data, out, "--classes", "dog", "--retries", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rtrt synonyms: error: ") and "no JSON array" in err and "after 2 attempts" in err
    assert len(server.requests) == 2 and not out.exists()
    with pytest.raises(InputError, match="not a chat completion"):
        parse_variants({"error": "overloaded"}, "dog")


def test_timeout_is_one_line_error_and_no_file(server, data, tmp_path, capsys):
    server.mode = "slow"
    out = tmp_path / "synonyms.json"
    t0 = time.perf_counter()
    assert rtrt_main(_args(server, data, out, "--classes", "dog", "--timeout", "0.3", "--retries", "0")) == 2
    assert time.perf_counter() - t0 < 1.4
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no reply within 0.3 s" in err and not out.exists()


def test_unreachable_server_and_existing_output(data, tmp_path, capsys):
    out = tmp_path / "synonyms.json"
    args = ["synonyms", "--annotations", str(data), "--url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(out),
            "--classes", "dog", "--retries", "0", "--timeout", "2"]
    assert rtrt_main(args) == 2
    assert "cannot connect" in capsys.readouterr().err and not out.exists()
    out.write_text("{}")
    assert rtrt_main(args) == 2
    assert "already exists" in capsys.readouterr().err
