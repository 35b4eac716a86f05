"""CODA-LM judges: an offline keyword judge and an OpenAI-compatible LLM judge, plus score tables.

- ``KeywordJudge`` finds object mentions (with a synonym table per CODA-LM category, plurals
  and simple negation) in a prediction and in its reference, and counts per category whether
  the prediction recalls the reference's objects and whether what it names is really there.
  Scores are recall / precision / F1 on 0-100, per category, per evaluation group and "all".
  It needs no network and is exact, so tests and quick runs can rely on it.
- ``OpenAIJudge`` asks any ``/v1/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp...) to
  rate reference vs prediction at temperature 0, in the style of CODA-LM's judge prompts, and
  parses ``Rating: [[N]]`` (1-10, reported as N x 10). Only the standard library is used
  (``urllib``). Network failures are retried with exponential backoff; an item that still fails,
  or whose reply has no valid rating, is reported with its error and the run goes on.
- ``score_table`` renders scores as a markdown table with one column per evaluation group.

Run (CODA-LM layout; predictions as ``{task}_answer.jsonl``)::

    python -m rtrt.tools.judge --references data/world/CODA-LM/val --predictions preds/ --judge keyword
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from rtrt.trainer.coda import (
    CATEGORIES,
    GROUP_ORDER,
    TASKS,
    CodaFormatError,
    TaskRecord,
    atomic_write_text,
    category_group,
    iter_annotations,
    read_tasks,
    region_category_names,
    task_file,
)

__all__ = [
    "SYNONYMS",
    "SYSTEM_PROMPTS",
    "JudgeItem",
    "ItemScore",
    "JudgeReport",
    "find_mentions",
    "KeywordJudge",
    "OpenAIJudgeConfig",
    "OpenAIJudge",
    "parse_rating",
    "build_items",
    "score_table",
    "parse_args",
    "main",
]

# Names by which a text may refer to each CODA-LM category. Matching is on whole words,
# case-insensitive, hyphens read as spaces, with plurals added automatically; where phrases
# overlap, the longest wins ("warning sign" is a warning_sign, not a traffic_sign).
# Generic words ("vehicle", "object", "obstacle") are deliberately absent: they name no category.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "car": ("car", "sedan", "suv", "hatchback", "van", "taxi", "minivan", "coupe", "jeep"),
    "truck": ("truck", "lorry", "pickup", "pickup truck", "semi truck", "dump truck", "box truck", "tanker"),
    "tram": ("tram", "streetcar", "light rail"),
    "tricycle": ("tricycle", "trike", "three wheeler", "rickshaw", "tuk tuk", "auto rickshaw"),
    "bus": ("bus", "coach", "minibus", "school bus", "shuttle bus"),
    "trailer": ("trailer", "semi trailer"),
    "construction_vehicle": (
        "construction vehicle", "excavator", "bulldozer", "digger", "road roller", "crane truck", "forklift",
        "backhoe", "cement mixer", "concrete mixer",
    ),
    "recreational_vehicle": ("recreational vehicle", "rv", "camper", "camper van", "motorhome", "motor home", "caravan"),
    "pedestrian": ("pedestrian", "person", "people", "man", "woman", "child", "kid", "passerby", "jogger", "walker"),
    "cyclist": ("cyclist", "bicyclist", "biker", "person riding a bicycle", "person riding a bike", "person on a bicycle", "person on a bike"),
    "bicycle": ("bicycle", "bike", "parked bicycle", "parked bike"),
    "moped": ("moped", "scooter", "e scooter", "electric scooter", "motor scooter"),
    "motorcycle": ("motorcycle", "motorbike", "motorcyclist", "motor bike"),
    "stroller": ("stroller", "baby stroller", "pram", "pushchair", "baby carriage", "buggy", "baby buggy"),
    "wheelchair": ("wheelchair", "wheel chair"),
    "cart": ("cart", "shopping cart", "handcart", "hand cart", "pushcart", "trolley"),
    "warning_sign": (
        "warning sign", "caution sign", "road work sign", "roadwork sign", "construction sign", "warning triangle",
        "hazard sign", "detour sign", "road works sign",
    ),
    "traffic_sign": ("traffic sign", "road sign", "street sign", "stop sign", "speed limit sign", "sign", "signboard", "signpost"),
    "traffic_light": ("traffic light", "traffic signal", "stoplight", "stop light", "signal light", "traffic lamp"),
    "traffic_cone": ("traffic cone", "cone", "pylon", "safety cone", "road cone", "construction cone"),
    "barrier": (
        "barrier", "barricade", "roadblock", "road block", "jersey barrier", "guardrail", "guard rail", "fence",
        "road barrier", "water barrier", "water filled barrier",
    ),
    "bollard": ("bollard", "delineator", "traffic post", "warning post", "flexible post", "delineator post"),
    "dog": ("dog", "puppy", "canine", "stray dog"),
    "cat": ("cat", "kitten", "stray cat"),
    "sentry_box": ("sentry box", "guard booth", "security booth", "guard house", "guardhouse", "sentry post", "toll booth"),
    "traffic_box": ("traffic box", "traffic control box", "utility box", "electrical box", "signal box", "control cabinet"),
    "traffic_island": ("traffic island", "median island", "refuge island", "traffic median"),
    "debris": ("debris", "rubble", "fallen cargo", "wreckage", "scattered debris"),
    "suitcase": ("suitcase", "luggage", "baggage"),
    "dustbin": ("dustbin", "trash can", "garbage can", "rubbish bin", "waste bin", "trash bin", "litter bin", "wheelie bin", "bin"),
    "concrete_block": ("concrete block", "cement block", "concrete cube", "concrete slab"),
    "machinery": ("machinery", "machine", "generator", "construction equipment", "equipment"),
    "chair": ("chair", "stool"),
    "phone_booth": ("phone booth", "telephone booth", "phone box", "telephone box"),
    "basket": ("basket",),
    "cardboard": ("cardboard", "cardboard sheet", "piece of cardboard"),
    "carton": ("carton", "cardboard box", "package", "parcel", "crate"),
    "garbage": ("garbage", "trash", "rubbish", "litter", "waste"),
    "garbage_bag": ("garbage bag", "trash bag", "bin bag", "rubbish bag", "refuse sack", "black bag"),
    "plastic_bag": ("plastic bag", "shopping bag", "plastic sheet"),
    "stone": ("stone", "rock", "boulder", "large stone"),
    "tire": ("tire", "tyre", "spare tire", "spare tyre"),
    "misc": ("unknown object", "unidentified object", "foreign object", "miscellaneous object"),
}
# Phrases that contain a synonym but name none (the ego car is not a car in the scene).
_STOP_PHRASES = ("ego car", "ego vehicle", "car park", "bus lane", "bus stop", "cone of vision", "sign of", "signs of")
_NEGATIONS = {"no", "not", "without", "nor", "never"}
_IRREGULAR = {"person": "persons", "man": "men", "woman": "women", "child": "children", "people": "people"}
_UNCOUNTABLE = {"debris", "rubble", "wreckage", "luggage", "baggage", "machinery", "equipment", "garbage", "trash", "rubbish", "litter", "waste", "cardboard", "fallen cargo"}


def _plural(phrase: str) -> str:
    head, _, last = phrase.rpartition(" ")
    if phrase in _UNCOUNTABLE or last in _UNCOUNTABLE:
        return phrase
    if last in _IRREGULAR:
        p = _IRREGULAR[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        p = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


def _normalise(text: str) -> str:
    return re.sub(r"[-_/]", " ", text.lower())


def _build_matcher() -> tuple[re.Pattern, dict[str, str | None]]:
    missing = set(CATEGORIES) - set(SYNONYMS)
    if missing:  # the table must cover every category of the group table
        raise AssertionError(f"SYNONYMS lacks {sorted(missing)}")
    phrase_to_cat: dict[str, str | None] = {}
    for cat, names in SYNONYMS.items():
        for name in names:
            for form in (name, _plural(name)):
                phrase_to_cat[_normalise(form)] = cat
    for stop in _STOP_PHRASES:
        phrase_to_cat[stop] = None
    # Longest first: at one position the regex takes the first alternative that matches.
    alts = sorted(phrase_to_cat, key=lambda p: (-len(p), p))
    pattern = r"\b(?:" + "|".join(r"\s+".join(map(re.escape, p.split())) for p in alts) + r")\b"
    return re.compile(pattern), phrase_to_cat


_MATCHER, _PHRASE_TO_CAT = _build_matcher()


def find_mentions(text: str) -> set[str]:
    """CODA-LM categories that ``text`` names (not negated: "no cones" names none)."""
    norm = _normalise(text or "")
    found: set[str] = set()
    for m in _MATCHER.finditer(norm):
        cat = _PHRASE_TO_CAT.get(" ".join(m.group(0).split()))
        if cat is None:
            continue
        before = norm[max(0, m.start() - 24) : m.start()].split()
        if before and (before[-1] in _NEGATIONS or (len(before) > 1 and before[-2] in _NEGATIONS and before[-1] in {"a", "an", "any", "the"})):
            continue
        found.add(cat)
    return found


@dataclass
class JudgeItem:
    """One question to judge."""

    question_id: int  # the task file's question_id
    reference: str  # reference answer
    prediction: str | None  # model answer; None when the model gave none
    categories: tuple[str, ...] = ()  # annotated CODA-LM categories the item is about (a region's one)


@dataclass
class ItemScore:
    """A judge's verdict on one item."""

    question_id: int  # the item's question_id
    score: float | None  # 0-100; None when the item could not be rated (see ``error``)
    groups: tuple[str, ...] = ()  # evaluation groups the item counts towards (besides "all")
    error: str | None = None  # one line: why there is no score
    detail: dict = field(default_factory=dict)  # judge-specific: mentions, raw reply...


@dataclass
class JudgeReport:
    """A judge's scores for one task."""

    judge: str  # "keyword" or "openai"
    task: str  # a CODA-LM task name
    items: list[ItemScore]  # in input order
    groups: dict[str, dict[str, float | None]]  # group (and "all") -> metric -> 0-100 (None: no data)
    categories: dict[str, dict[str, float | None]] = field(default_factory=dict)  # per category, keyword judge only

    @property
    def failed(self) -> list[ItemScore]:
        return [s for s in self.items if s.error is not None]

    def row(self, metric: str) -> dict[str, float | None]:
        """``{group: value}`` of one metric, for ``score_table``."""
        return {g: m.get(metric) for g, m in self.groups.items()}

    def to_json(self) -> dict:
        return asdict(self)


def _groups_of(categories: Iterable[str]) -> tuple[str, ...]:
    gs = {category_group(c) for c in categories}
    return tuple(g for g in GROUP_ORDER if g in gs)


def _ratio(num: int, den: int) -> float | None:
    return 100.0 * num / den if den else None


def _f1(p: float | None, r: float | None) -> float | None:
    if p is None or r is None:
        return None
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


class KeywordJudge:
    """Recall / precision of object mentions, per category, group and overall (0-100).

    For an item, the reference set R is the item's annotated categories plus those the
    reference text names; the predicted set P is what the prediction names. Per category c
    over all items: TP = items with c in R and P, FN = c in R only, FP = c in P only; recall =
    TP / (TP + FN), precision = TP / (TP + FP), summed over a group's categories for the group
    and over all for "all" (micro averages). The item score is the item's F1 (100 when R and P
    are both empty). A missing prediction counts as an empty one.
    """

    name = "keyword"

    def score_item(self, item: JudgeItem) -> tuple[ItemScore, set[str], set[str]]:
        ref = set(item.categories) | find_mentions(item.reference)
        pred = find_mentions(item.prediction or "")
        tp = len(ref & pred)
        r = _ratio(tp, len(ref))
        p = _ratio(tp, len(pred))
        score = 100.0 if not ref and not pred else (_f1(p, r) or 0.0)
        detail = {"reference": sorted(ref), "predicted": sorted(pred)}
        err = "no prediction" if item.prediction is None else None
        return ItemScore(item.question_id, score, _groups_of(ref | pred), err, detail), ref, pred

    def judge(self, task: str, items: Sequence[JudgeItem]) -> JudgeReport:
        counts = {c: [0, 0, 0] for c in CATEGORIES}  # tp, fn, fp
        scores = []
        for item in items:
            s, ref, pred = self.score_item(item)
            scores.append(s)
            for c in ref | pred:
                counts[c][0 if c in ref and c in pred else 1 if c in ref else 2] += 1

        def metrics(cats: Iterable[str]) -> dict[str, float | None]:
            tp = sum(counts[c][0] for c in cats)
            fn = sum(counts[c][1] for c in cats)
            fp = sum(counts[c][2] for c in cats)
            r, p = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
            return {"recall": r, "precision": p, "f1": _f1(p, r), "support": float(tp + fn)}

        per_cat = {c: metrics([c]) for c in CATEGORIES if any(counts[c])}
        groups = {g: metrics([c for c in CATEGORIES if category_group(c) == g]) for g in GROUP_ORDER}
        groups["all"] = metrics(CATEGORIES)
        return JudgeReport(self.name, task, scores, groups, per_cat)


# --- OpenAI-compatible judge ---------------------------------------------------------------

_RATING_RULE = (
    "Be as objective as possible and do not let the length of the prediction influence you. After a short "
    'explanation, rate the prediction from 1 to 10, strictly in this format: "Rating: [[N]]", e.g. "Rating: [[7]]".'
)
SYSTEM_PROMPTS: dict[str, str] = {
    "general_perception": (
        "You are an impartial judge of an autonomous-driving assistant's scene description. Compare the "
        "prediction with the reference text. Check accuracy (does the prediction identify the objects that "
        "the reference says influence the ego car), hallucination (does it name objects the reference does "
        "not contain) and reasoning (are its reasons for each object's influence on the ego car consistent "
        "with the reference). Match objects by meaning, ignoring small differences in position and colour. "
        + _RATING_RULE
    ),
    "region_perception": (
        "You are an impartial judge of an autonomous-driving assistant's description of one object in a "
        "marked region. Rate how similar and relevant the prediction is to the reference: the object's "
        "identity first, then its description and why it affects the ego car. " + _RATING_RULE
    ),
    "driving_suggestion": (
        "You are an impartial judge of an autonomous-driving assistant's driving suggestion. Compare the "
        "prediction with the reference suggestion: are the recommended actions the same, are they safe, and "
        "do they respond to the same objects in the scene. " + _RATING_RULE
    ),
}
_USER_TEMPLATE = (
    "[The Start of Reference Text]\n{reference}\n[The End of Reference Text]\n\n"
    "[The Start of Prediction Text]\n{prediction}\n[The End of Prediction Text]"
)
_RATING_RE = re.compile(r"rating\s*(?:is)?\s*:?\s*\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", re.IGNORECASE)
_BRACKET_RE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def parse_rating(reply: str) -> float | None:
    """The 1-10 rating in a judge reply (``Rating: [[N]]``, else a lone ``[[N]]``), or None."""
    m = _RATING_RE.findall(reply or "")
    values = m or _BRACKET_RE.findall(reply or "")
    if not values:
        return None
    v = float(values[-1])  # the final verdict, should the explanation quote another rating
    return v if 1.0 <= v <= 10.0 else None


@dataclass
class OpenAIJudgeConfig:
    """How to reach and use an OpenAI-compatible chat endpoint."""

    base_url: str = "https://api.openai.com/v1"  # server root; "/chat/completions" is appended
    model: str = "gpt-4o-2024-05-13"  # CODA-LM's default judge model
    api_key: str | None = field(default=None, repr=False)  # bearer token; None sends no Authorization header
    temperature: float = 0.0  # deterministic judging, as CODA-LM
    max_tokens: int | None = 512  # reply cap; None leaves it to the server
    timeout_s: float = 60.0  # per request
    retries: int = 3  # further attempts after a failed request (network error, timeout, 429, 5xx)
    backoff_s: float = 1.0  # wait before the first retry; doubles each time
    workers: int = 4  # concurrent requests


class _Fatal(Exception):
    """An HTTP answer that retrying cannot fix (400, 401, 404...)."""


class OpenAIJudge:
    """Rates each item with a chat model; failures are per item, never fatal to the run."""

    name = "openai"

    def __init__(self, config: OpenAIJudgeConfig | None = None):
        self.config = config or OpenAIJudgeConfig()

    def messages(self, task: str, reference: str, prediction: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": SYSTEM_PROMPTS[task]},
            {"role": "user", "content": _USER_TEMPLATE.format(reference=reference, prediction=prediction)},
        ]

    def _post(self, body: bytes) -> str:
        cfg = self.config
        headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            headers["Authorization"] = f"Bearer {cfg.api_key}"
        req = urllib.request.Request(cfg.base_url.rstrip("/") + "/chat/completions", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            msg = f"HTTP {e.code} {e.reason}"
            if e.code == 429 or e.code >= 500:
                raise ConnectionError(msg) from None
            raise _Fatal(msg) from None
        try:
            return json.loads(payload)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Fatal("malformed response (no choices[0].message.content)") from None

    def complete(self, messages: list[dict[str, str]]) -> str:
        """One chat completion, retried with exponential backoff; raises RuntimeError (one line) when it gives up."""
        cfg = self.config
        body = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature}
        if cfg.max_tokens is not None:
            body["max_tokens"] = cfg.max_tokens
        data = json.dumps(body).encode("utf-8")
        delay = cfg.backoff_s
        last = ""
        for attempt in range(cfg.retries + 1):
            try:
                return self._post(data)
            except _Fatal as e:
                raise RuntimeError(str(e)) from None
            except (socket.timeout, TimeoutError):
                last = f"timed out after {cfg.timeout_s:g} s"
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = "timed out" if isinstance(reason, (socket.timeout, TimeoutError)) else " ".join(str(reason).split())
            if attempt < cfg.retries:
                time.sleep(delay)
                delay *= 2
        raise RuntimeError(f"{last} ({cfg.retries + 1} attempts)")

    def score_item(self, task: str, item: JudgeItem) -> ItemScore:
        groups = _groups_of(item.categories)
        if item.prediction is None:
            return ItemScore(item.question_id, None, groups, "no prediction")
        try:
            reply = self.complete(self.messages(task, item.reference, item.prediction))
        except RuntimeError as e:
            return ItemScore(item.question_id, None, groups, f"request failed: {e}")
        rating = parse_rating(reply)
        if rating is None:
            snippet = " ".join(reply.split())[:80]
            return ItemScore(item.question_id, None, groups, f"no valid 'Rating: [[1-10]]' in reply: {snippet!r}", {"reply": reply})
        return ItemScore(item.question_id, rating * 10.0, groups, None, {"rating": rating, "reply": reply})

    def judge(self, task: str, items: Sequence[JudgeItem]) -> JudgeReport:
        if task not in SYSTEM_PROMPTS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(SYSTEM_PROMPTS)}")
        workers = max(1, self.config.workers)
        if workers == 1 or len(items) <= 1:
            scores = [self.score_item(task, it) for it in items]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                scores = list(pool.map(lambda it: self.score_item(task, it), items))
        groups: dict[str, dict[str, float | None]] = {}
        for g in (*GROUP_ORDER, "all"):
            vals = [s.score for s in scores if s.score is not None and (g == "all" or g in s.groups)]
            groups[g] = {"score": sum(vals) / len(vals) if vals else None, "n": float(len(vals))}
        groups["all"]["failed"] = float(sum(s.error is not None for s in scores))
        return JudgeReport(self.name, task, scores, groups)


# --- Inputs and tables ---------------------------------------------------------------------


def build_items(
    task: str,
    references: Sequence[TaskRecord],
    predictions: Sequence[TaskRecord],
    region_categories: Sequence[str] | None = None,
    all_categories: Sequence[Sequence[str]] | None = None,
) -> list[JudgeItem]:
    """Pair reference and predicted task records by question_id.

    ``region_categories`` (the region task) gives the i-th region question's category_name
    (``coda.region_category_names``); ``all_categories`` (other tasks) the annotated
    categories of the i-th image. A reference without an answer is an error (CODA-LM's test
    split keeps its answers private).
    """
    preds = {p.question_id: p.answer for p in predictions}
    items = []
    for i, ref in enumerate(references):
        if ref.answer is None:
            raise CodaFormatError(f"question {ref.question_id} of {task} has no reference answer")
        cats: tuple[str, ...] = ()
        if task == "region_perception" and region_categories is not None:
            cats = (region_categories[i],)
        elif all_categories is not None:
            cats = tuple(all_categories[i])
        items.append(JudgeItem(ref.question_id, ref.answer, preds.get(ref.question_id), cats))
    return items


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def score_table(rows: Mapping[str, Mapping[str, float | None]], first_column: str = "") -> str:
    """A markdown table: one row per entry of ``rows``, one column per evaluation group, then "all".

    Values are 0-100 and printed with one decimal; a missing or None value prints "-".
    """
    cols = [*GROUP_ORDER, "all"]
    lines = [
        "| " + " | ".join([first_column, *cols]) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|",
    ]
    for name, vals in rows.items():
        lines.append("| " + " | ".join([name, *(_fmt(vals.get(c)) for c in cols)]) + " |")
    return "\n".join(lines) + "\n"


# --- Command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = OpenAIJudgeConfig()
    p = argparse.ArgumentParser(prog="rtrt judge", description="Score CODA-LM predictions with the keyword or an OpenAI-compatible judge.")
    p.add_argument("--references", required=True, help="CODA-LM split folder: annotation *.json files and vqa_anno/{task}.jsonl")
    p.add_argument("--predictions", required=True, help="folder with {task}_answer.jsonl (question_id and answer per line)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="tasks to score")
    p.add_argument("--judge", choices=("keyword", "openai"), default="keyword", help="keyword (offline) or openai (chat endpoint)")
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", d.base_url), help="OpenAI-compatible API root (env OPENAI_BASE_URL)")
    p.add_argument("--model", default=d.model, help="judge model name")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable that holds the API key")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per request")
    p.add_argument("--retries", type=int, default=d.retries, help="retries per request after a failure")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="reply token cap sent to the server; 0 sends none")
    p.add_argument("--workers", type=int, default=d.workers, help="concurrent requests")
    p.add_argument("--out", default=None, help="write the full reports (per item) as JSON here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.judge == "keyword":
        judge: KeywordJudge | OpenAIJudge = KeywordJudge()
    else:
        cfg = OpenAIJudgeConfig(
            base_url=args.base_url, model=args.model, api_key=os.environ.get(args.api_key_env),
            timeout_s=args.timeout, retries=args.retries, workers=args.workers, max_tokens=args.max_tokens or None,
        )
        judge = OpenAIJudge(cfg)
    try:
        anns = [a for _, a in iter_annotations(args.references)]
        reports = []
        for task in args.tasks:
            refs = read_tasks(task_file(Path(args.references) / "vqa_anno", task))
            preds = read_tasks(Path(args.predictions) / f"{task}_answer.jsonl", strict=False)
            items = build_items(
                task, refs, preds, region_category_names(anns),
                [sorted({r.category_name for r in a.region_perception}) for a in anns],
            )
            reports.append(judge.judge(task, items))
    except CodaFormatError as e:
        print(f"rtrt judge: error: {e}", file=sys.stderr)
        return 2
    metric = "f1" if args.judge == "keyword" else "score"
    print(score_table({r.task: r.row(metric) for r in reports}, f"{args.judge} {metric}"), end="")
    for r in reports:
        for s in r.failed:
            print(f"{r.task} question {s.question_id}: {s.error}", file=sys.stderr)
    if args.out:
        atomic_write_text(args.out, json.dumps([r.to_json() for r in reports], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
