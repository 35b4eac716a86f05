"""``rtrt synonyms``: per-class synonyms and short descriptions from an OpenAI-compatible chat endpoint.

The file it writes is what phase 1 reads with ``--synonyms``: one JSON object mapping each class
name to a list of strings (synonyms and short visual descriptions)::

    {"traffic_cone": ["orange cone", "road pylon", ...], "bollard": [...]}

Following the method, classes with fewer annotated regions get more text variants: between
``--min-variants`` (the most frequent class) and ``--max-variants`` (a class with one region or
none), interpolated on a log scale of the region count. Any server that speaks the OpenAI chat
completions API works (vLLM, llama.cpp server, Ollama, a hosted model); the request goes out with
urllib, with a timeout and retries. A malformed reply or a timeout, after the retries, is a
one-line error and no file is written.

    rtrt synonyms --annotations data/CODA-LM/Train --url http://127.0.0.1:8000/v1 \\
        --model qwen2.5-7b-instruct --out synonyms.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

from rtrt.runtime.errors import InputError, run_cli
from rtrt.runtime.fileio import atomic_write_json
from rtrt.runtime.names import display_name

__all__ = ["load_synonyms", "variant_counts", "chat_url", "ask_variants", "parse_variants", "main", "parse_args"]

PROMPT = (
    "List {n} different ways to refer to a {name} seen on or beside a road from a car: synonyms, "
    "everyday names and short visual descriptions of at most eight words each. "
    "Answer with only a JSON array of {n} strings."
)


def load_synonyms(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read and check a synonyms file: a JSON object of class name -> list of non-empty strings."""
    from .coda import category_group

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{p}: synonyms file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: must be a JSON object of class name -> list of strings")
    out: dict[str, list[str]] = {}
    for name, texts in data.items():
        category_group(name)  # unknown category: one-line error naming it
        if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
            raise InputError(f"{p}: {name!r} must map to a list of non-empty strings")
        out[name] = [" ".join(t.split()) for t in texts]
    return out


def variant_counts(region_counts: Mapping[str, int], lo: int, hi: int) -> dict[str, int]:
    """How many variants to ask for per class: ``hi`` for a class with at most one region, ``lo`` for the most frequent."""
    if not 1 <= lo <= hi:
        raise InputError(f"variant counts must satisfy 1 <= min ({lo}) <= max ({hi})")
    top = max([1, *region_counts.values()])
    out = {}
    for name, n in region_counts.items():
        rarity = 1.0 if top <= 1 else 1.0 - math.log(max(n, 1)) / math.log(top)
        out[name] = int(round(lo + (hi - lo) * rarity))
    return out


def chat_url(url: str) -> str:
    """The chat-completions endpoint of a base URL (``http://host/v1``) or the endpoint itself."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def parse_variants(reply: Any, name: str) -> list[str]:
    """The strings of a chat-completions reply whose message content is a JSON array (code fences allowed)."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise InputError(f"class {name!r}: the reply is not a chat completion (no choices[0].message.content)") from None
    if not isinstance(content, str):
        raise InputError(f"class {name!r}: the reply's message content is not text")
    match = re.search(r"\[.*\]", content, flags=re.S)
    try:
        items = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
        raise InputError(f"class {name!r}: the reply holds no JSON array of strings: {content[:80]!r}")
    out, seen = [], {display_name(name).lower()}
    for t in items:
        t = " ".join(t.split())
        if t and t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    if not out:
        raise InputError(f"class {name!r}: the reply holds no new variant")
    return out


def ask_variants(url: str, model: str, name: str, n: int, *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 2, temperature: float = 0.7) -> list[str]:
    """Ask the endpoint for ``n`` variants of class ``name``; retries on timeouts, HTTP and format errors."""
    body = json.dumps({
        "model": model,
        "temperature": temperature,
        "messages": [
            {"role": "system", "content": "You name road objects for a driving dataset. You answer in JSON only."},
            {"role": "user", "content": PROMPT.format(n=n, name=display_name(name))},
        ],
    }).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    endpoint = chat_url(url)
    last = ""
    for _ in range(retries + 1):
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                raw = resp.read()
            return parse_variants(json.loads(raw.decode("utf-8")), name)[:n]
        except (TimeoutError, socket.timeout):
            last = f"no reply within {timeout:g} s"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.reason}"
        except urllib.error.URLError as e:
            reason = e.reason
            last = f"no reply within {timeout:g} s" if isinstance(reason, (TimeoutError, socket.timeout)) else f"cannot connect ({reason})"
        except (UnicodeDecodeError, json.JSONDecodeError):
            last = f"class {name!r}: the reply is not JSON"
        except InputError as e:
            last = str(e)
    raise InputError(f"{endpoint}: {last} (after {retries + 1} attempts)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rtrt synonyms", description=__doc__.split("\n\n")[0])
    p.add_argument("--annotations", required=True, help="directory of CODA-LM annotation files (region counts per class)")
    p.add_argument("--url", required=True, help="OpenAI-compatible base URL (http://host/v1) or its /chat/completions endpoint")
    p.add_argument("--model", required=True, help="model name sent in the request")
    p.add_argument("--out", required=True, help="synonyms JSON file to write")
    p.add_argument("--classes", default="", help="comma-separated classes (default: every category with regions)")
    p.add_argument("--min-variants", type=int, default=4, help="variants for the most frequent class")
    p.add_argument("--max-variants", type=int, default=16, help="variants for a class with at most one region")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply")
    p.add_argument("--retries", type=int, default=2, help="further attempts after a timeout or a malformed reply")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the requests")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key, if the server needs one")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from .coda import category_group, iter_annotations

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it")
    counts: dict[str, int] = {}
    for _, ann in iter_annotations(args.annotations):
        for region in ann.region_perception:
            counts[region.category_name] = counts.get(region.category_name, 0) + 1
    if args.classes:
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
        for name in names:
            category_group(name)
        counts = {name: counts.get(name, 0) for name in names}
    if not counts:
        raise InputError(f"{args.annotations}: no regions and no --classes: nothing to ask for")
    wanted = variant_counts(counts, args.min_variants, args.max_variants)
    key = os.environ.get(args.api_key_env) or None
    result: dict[str, list[str]] = {}
    for name in sorted(wanted):
        result[name] = ask_variants(args.url, args.model, name, wanted[name], api_key=key, timeout=args.timeout,
                                    retries=args.retries, temperature=args.temperature)
        print(f"{name}: {len(result[name])} variants ({counts[name]} regions)", file=sys.stderr)
    atomic_write_json(out, result)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("rtrt synonyms", main))
