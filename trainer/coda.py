"""The CODA-LM data layer: annotation files, task JSONL files and the evaluation-group table.

CODA-LM (Li et al., "Automated Evaluation of Large Vision-Language Models on Self-driving
Corner Cases") ships one JSON file per image::

    {"general_perception": {"vehicles": [{"description": ..., "explanation": ...}], ...,
                            "description and explanation": <summary>},
     "region_perception": {"1": {"description and explanation": ..., "box": [x, y, w, h],
                                 "category_name": "traffic_cone"}, ...},
     "driving_suggestion": <str>}

named ``{image_dir}_{image_id}.json`` (the image is ``{image_dir}/images/{image_id}.jpg``
under the dataset root), and three task files of JSON lines with ``question_id``, ``image``,
``question`` and ``answer``. Region questions show the image with the region's box drawn in
red, width 2. Region scores are reported per evaluation group (vehicle, vru, ...); the
category -> group table lives here and only here (``EVAL_GROUPS``, ``category_group``).

The procedural world (``rtrt.tools.demo.world``) writes this same format with the writers below, so
one reader and one evaluator serve both the world and the real CODA-LM. Every format problem
raises ``CodaFormatError`` with a one-line message that names the file.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image

from rtrt.runtime.errors import RtrtError
from rtrt.runtime.image import draw_region
from rtrt.runtime.pipeline import REGION_QUESTION  # CODA-LM's region question, which the runtime asks too
from rtrt.runtime.fileio import atomic_write_bytes, atomic_write_text

__all__ = [
    "CodaFormatError",
    "EVAL_GROUPS",
    "GROUP_ORDER",
    "CATEGORIES",
    "category_group",
    "GENERAL_KEYS",
    "GENERAL_KEY_OF_GROUP",
    "SUMMARY_KEY",
    "GENERAL_QUESTION",
    "REGION_QUESTION",
    "SUGGESTION_QUESTION",
    "TASKS",
    "TASK_QUESTIONS",
    "PerceptionItem",
    "RegionItem",
    "CodaAnnotation",
    "TaskRecord",
    "annotation_from_json",
    "annotation_to_json",
    "load_annotation",
    "iter_annotations",
    "save_annotation",
    "read_tasks",
    "write_tasks",
    "task_file",
    "region_category_names",
    "image_path_for",
    "draw_region_box",
    "region_frame",
    "region_box",
    "atomic_write_bytes",
    "atomic_write_text",
]


class CodaFormatError(RtrtError, ValueError):
    """A CODA-LM file or value is malformed; the message is one line and names the file.

    An ``RtrtError`` (so the CLI prints it as one line, exit code 2) and a ``ValueError``.
    ``rtrt.runtime.errors`` imports nothing heavy, so the data layer stays fast to start.
    """


# --- The evaluation-group table (CODA-LM's region grouping), the one place it is written. ---
EVAL_GROUPS: dict[str, tuple[str, ...]] = {
    "vehicle": ("car", "truck", "tram", "tricycle", "bus", "trailer", "construction_vehicle", "recreational_vehicle"),
    "vru": ("pedestrian", "cyclist", "bicycle", "moped", "motorcycle", "stroller", "wheelchair", "cart"),
    "traffic_sign": ("warning_sign", "traffic_sign"),
    "traffic_light": ("traffic_light",),
    "traffic_cone": ("traffic_cone",),
    "barrier": ("barrier", "bollard"),
    "miscellaneous": (
        "dog", "cat", "sentry_box", "traffic_box", "traffic_island", "debris", "suitcase", "dustbin",
        "concrete_block", "machinery", "chair", "phone_booth", "basket", "cardboard", "carton", "garbage",
        "garbage_bag", "plastic_bag", "stone", "tire", "misc",
    ),
}
GROUP_ORDER: tuple[str, ...] = tuple(EVAL_GROUPS)
_GROUP_OF: dict[str, str] = {c: g for g, cats in EVAL_GROUPS.items() for c in cats}
# Every CODA-LM category_name, in table order.
CATEGORIES: tuple[str, ...] = tuple(_GROUP_OF)

# general_perception keys, in CODA-LM's order; the i-th key holds the objects of the i-th group.
GENERAL_KEYS: tuple[str, ...] = (
    "vehicles", "vulnerable_road_users", "traffic signs", "traffic lights", "traffic cones", "barriers", "other objects",
)
GENERAL_KEY_OF_GROUP: dict[str, str] = dict(zip(GROUP_ORDER, GENERAL_KEYS))
SUMMARY_KEY = "description and explanation"

# Question texts exactly as CODA-LM's task files carry them (including its grammar), so a model
# sees the same prompt on the world and on the real benchmark.
GENERAL_QUESTION = (
    "There is an image of traffic captured from the perspective of the ego car. Please focus on objects that "
    "have a great influence on ego car driving behavior in the scene, describe these objects and the reasons "
    "why they influence ego car driving."
)
SUGGESTION_QUESTION = (
    "There is an image of traffic captured from the perspective of the ego car. Please provide driving "
    "suggestions for the ego car based on the current scene."
)
TASKS: tuple[str, ...] = ("general_perception", "region_perception", "driving_suggestion")
TASK_QUESTIONS: dict[str, str] = dict(zip(TASKS, (GENERAL_QUESTION, REGION_QUESTION, SUGGESTION_QUESTION)))


def category_group(name: str) -> str:
    """The evaluation group of a CODA-LM category_name (``"bollard"`` -> ``"barrier"``)."""
    try:
        return _GROUP_OF[name]
    except (KeyError, TypeError):
        raise CodaFormatError(f"unknown CODA-LM category {name!r}; known: {', '.join(CATEGORIES)}") from None


@dataclass
class PerceptionItem:
    """One object of ``general_perception``."""

    description: str  # what the object is and where it is
    explanation: str  # why it influences the ego car


@dataclass
class RegionItem:
    """One entry of ``region_perception``."""

    description_and_explanation: str  # the region question's reference answer
    box: tuple[float, float, float, float]  # [x, y, w, h] in pixels, top-left corner origin
    category_name: str  # a CODA-LM category (see ``CATEGORIES``)

    def __post_init__(self) -> None:
        self.box = tuple(float(v) for v in self.box)  # type: ignore[assignment]


@dataclass
class CodaAnnotation:
    """One image's CODA-LM annotation."""

    # GENERAL_KEYS -> objects of that kind; every key is present (an empty list when none)
    general_perception: dict[str, list[PerceptionItem]] = field(default_factory=lambda: {k: [] for k in GENERAL_KEYS})
    general_summary: str = ""  # general_perception["description and explanation"]: the general task's answer
    region_perception: list[RegionItem] = field(default_factory=list)  # written as "1", "2", ... in this order
    driving_suggestion: str = ""  # the suggestion task's answer


@dataclass
class TaskRecord:
    """One line of a task JSONL file."""

    question_id: int  # 0, 1, ... per task file, in annotation-file order
    image: str  # image path relative to the dataset root
    question: str  # the question text (``TASK_QUESTIONS``)
    answer: str | None = None  # reference (or predicted) answer; CODA-LM's test split has none
    extra: dict[str, Any] = field(default_factory=dict)  # any other keys (e.g. ``label_name``), kept as read


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _fail(source: str, what: str) -> CodaFormatError:
    return CodaFormatError(_one_line(f"{source}: {what}"))


def _require_str(value: Any, source: str, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(source, f"{where} must be a string, got {type(value).__name__}")
    return value


def _check_box(box: Any, source: str, where: str, image_size: tuple[int, int] | None) -> tuple[float, ...]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise _fail(source, f"{where} box must be [x, y, w, h], got {box!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise _fail(source, f"{where} box has a non-numeric or non-finite value: {box!r}")
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise _fail(source, f"{where} box {list(box)!r} has zero area")
    if x < 0 or y < 0:
        raise _fail(source, f"{where} box {list(box)!r} starts outside the image")
    if image_size is not None:
        iw, ih = image_size
        if x + w > iw or y + h > ih:
            raise _fail(source, f"{where} box {list(box)!r} is outside the {iw}x{ih} image")
    return (x, y, w, h)


def annotation_from_json(
    data: Any, source: str = "<annotation>", image_size: tuple[int, int] | None = None, check_categories: bool = True
) -> CodaAnnotation:
    """Validate a parsed CODA-LM annotation dict and convert it.

    ``image_size`` (width, height), when known, lets boxes be checked against the image;
    ``check_categories`` rejects category names outside ``CATEGORIES``.
    """
    if not isinstance(data, dict):
        raise _fail(source, f"top level must be an object, got {type(data).__name__}")
    for key in ("general_perception", "region_perception", "driving_suggestion"):
        if key not in data:
            raise _fail(source, f"missing key {key!r}")
    gp = data["general_perception"]
    if not isinstance(gp, dict):
        raise _fail(source, "general_perception must be an object")
    general: dict[str, list[PerceptionItem]] = {}
    for key in GENERAL_KEYS:
        items = gp.get(key, [])
        if not isinstance(items, list):
            raise _fail(source, f"general_perception[{key!r}] must be a list")
        parsed = []
        for i, item in enumerate(items):
            where = f"general_perception[{key!r}][{i}]"
            if not isinstance(item, dict):
                raise _fail(source, f"{where} must be an object")
            parsed.append(
                PerceptionItem(
                    _require_str(item.get("description", ""), source, f"{where}.description"),
                    _require_str(item.get("explanation", ""), source, f"{where}.explanation"),
                )
            )
        general[key] = parsed
    unknown = sorted(set(gp) - set(GENERAL_KEYS) - {SUMMARY_KEY})
    if unknown:
        raise _fail(source, f"general_perception has unknown keys {unknown}")
    summary = _require_str(gp.get(SUMMARY_KEY, ""), source, f"general_perception[{SUMMARY_KEY!r}]")

    rp = data["region_perception"]
    if not isinstance(rp, dict):
        raise _fail(source, "region_perception must be an object keyed '1', '2', ...")
    regions = []
    for key, entry in rp.items():
        where = f"region {key}"
        if not isinstance(entry, dict):
            raise _fail(source, f"{where} must be an object")
        for req in (SUMMARY_KEY, "box", "category_name"):
            if req not in entry:
                raise _fail(source, f"{where} is missing {req!r}")
        name = _require_str(entry["category_name"], source, f"{where} category_name")
        if check_categories and name not in _GROUP_OF:
            raise _fail(source, f"{where} has unknown category {name!r}")
        box = _check_box(entry["box"], source, where, image_size)
        regions.append(RegionItem(_require_str(entry[SUMMARY_KEY], source, f"{where} text"), box, name))  # type: ignore[arg-type]
    suggestion = _require_str(data["driving_suggestion"], source, "driving_suggestion")
    return CodaAnnotation(general, summary, regions, suggestion)


def annotation_to_json(ann: CodaAnnotation) -> dict[str, Any]:
    """The CODA-LM JSON object of an annotation (keys in CODA-LM's order)."""
    gp: dict[str, Any] = {
        k: [{"description": it.description, "explanation": it.explanation} for it in ann.general_perception.get(k, [])]
        for k in GENERAL_KEYS
    }
    gp[SUMMARY_KEY] = ann.general_summary
    rp = {
        str(i + 1): {SUMMARY_KEY: r.description_and_explanation, "box": [float(v) for v in r.box], "category_name": r.category_name}
        for i, r in enumerate(ann.region_perception)
    }
    return {"general_perception": gp, "region_perception": rp, "driving_suggestion": ann.driving_suggestion}


def _read_json_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CodaFormatError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise _fail(str(path), f"not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_annotation(
    path: str | os.PathLike, image_size: tuple[int, int] | None = None, check_categories: bool = True
) -> CodaAnnotation:
    """Read and validate one CODA-LM annotation file (see ``annotation_from_json``)."""
    path = Path(path)
    text = _read_json_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(str(path), f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    return annotation_from_json(data, str(path), image_size, check_categories)


def iter_annotations(
    directory: str | os.PathLike, image_size: tuple[int, int] | None = None, check_categories: bool = True
) -> Iterator[tuple[Path, CodaAnnotation]]:
    """``(path, annotation)`` for every ``*.json`` directly in ``directory``, sorted by file name.

    Sorted order is CODA-LM's question order: the i-th file gives general/suggestion question i,
    and its regions, in order, the next region question ids.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CodaFormatError(f"{directory}: annotation directory not found")
    for path in sorted(p for p in directory.iterdir() if p.suffix == ".json" and p.is_file()):
        yield path, load_annotation(path, image_size, check_categories)


def save_annotation(path: str | os.PathLike, ann: CodaAnnotation, image_size: tuple[int, int] | None = None) -> None:
    """Validate an annotation and write it atomically as CODA-LM JSON (UTF-8, indent 2).

    The same checks as the reader run first, so a file this writes always reads back.
    """
    data = annotation_to_json(ann)
    annotation_from_json(data, str(path), image_size)
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def read_tasks(path: str | os.PathLike, strict: bool = True) -> list[TaskRecord]:
    """Read a task file of JSON lines (CODA-LM names them ``.json`` or ``.jsonl``); blank lines skipped.

    ``strict=False`` accepts lines without ``image`` or ``question`` (read as ""), as model
    prediction files often are.
    """
    path = Path(path)
    text = _read_json_text(path)
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(str(path), f"line {lineno}: malformed JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise _fail(str(path), f"line {lineno}: expected an object")
        for req in ("question_id", "image", "question") if strict else ("question_id",):
            if req not in obj:
                raise _fail(str(path), f"line {lineno}: missing {req!r}")
        qid = obj.pop("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)) or not str(qid).lstrip("-").isdigit():
            raise _fail(str(path), f"line {lineno}: question_id must be an integer, got {qid!r}")
        image = _require_str(obj.pop("image", ""), str(path), f"line {lineno}: image")
        question = _require_str(obj.pop("question", ""), str(path), f"line {lineno}: question")
        answer = obj.pop("answer", None)
        if answer is not None:
            answer = _require_str(answer, str(path), f"line {lineno}: answer")
        records.append(TaskRecord(int(qid), image, question, answer, obj))
    return records


def _task_line(rec: TaskRecord) -> str:
    obj: dict[str, Any] = {"question_id": rec.question_id, "image": rec.image, "question": rec.question}
    if rec.answer is not None:
        obj["answer"] = rec.answer
    obj.update(rec.extra)
    return json.dumps(obj, ensure_ascii=False)


def write_tasks(path: str | os.PathLike, records: Iterable[TaskRecord]) -> None:
    """Write task records as JSON lines, atomically (a record without an answer has no ``answer`` key)."""
    atomic_write_text(path, "".join(_task_line(r) + "\n" for r in records))


def task_file(directory: str | os.PathLike, task: str) -> Path:
    """The task file for ``task`` in ``directory``: ``{task}.jsonl``, else CODA-LM's ``{task}.json``."""
    if task not in TASKS:
        raise CodaFormatError(f"unknown CODA-LM task {task!r}; known: {', '.join(TASKS)}")
    directory = Path(directory)
    for suffix in (".jsonl", ".json"):
        p = directory / f"{task}{suffix}"
        if p.is_file():
            return p
    raise CodaFormatError(f"{directory}: no {task}.jsonl or {task}.json")


def region_category_names(annotations: Iterable[CodaAnnotation]) -> list[str]:
    """category_name of every region question, in question-id order (annotations in file order)."""
    return [r.category_name for ann in annotations for r in ann.region_perception]


def image_path_for(annotation_name: str, ext: str = ".jpg") -> str:
    """CODA-LM's image path (relative to the dataset root) for an annotation file name.

    ``"val_0001.json"`` -> ``"val/images/0001.jpg"``: the part before the first ``_`` is the image
    folder, the rest the image id.
    """
    stem = Path(annotation_name).stem
    folder, sep, image_id = stem.partition("_")
    if not sep or not folder or not image_id:
        raise CodaFormatError(f"{annotation_name}: annotation name is not '<folder>_<image id>.json'")
    return f"{folder}/images/{image_id}{ext}"


def region_frame(image: str) -> str:
    """The frame a region question's boxed image was drawn on: ``<folder>/images_w_boxes/<id>_object_<k>.<ext>``
    -> ``<folder>/images/<id>.<ext>`` (CODA-LM's layout); any other path is returned as it is."""
    p = PurePosixPath(image)
    stem, sep, k = p.stem.rpartition("_object_")
    if p.parent.name != "images_w_boxes" or not sep or not k.isdigit():
        return image
    return (p.parent.parent / "images" / f"{stem}{p.suffix}").as_posix()


def region_box(image: str | os.PathLike) -> tuple[float, float, float, float]:
    """A region question's box (x0, y0, x1, y1) in its frame's pixels, read from the annotation the boxed image
    was drawn from: ``<dir>/<folder>/images_w_boxes/<id>_object_<k>.<ext>`` is region k of
    ``<dir>/CODA-LM/<folder>/<folder>_<id>.json`` (CODA-LM's layout, and ``rtrt world``'s: the images of a
    split under the dataset root, its annotations under ``CODA-LM/``) or, failing that, of
    ``<dir>/<folder>/<folder>_<id>.json`` (the annotations beside the images). Raises ``CodaFormatError``
    naming the file when there is none or it has no region k."""
    path = Path(image)
    frame = Path(region_frame(path.as_posix()))
    if frame == path:
        raise CodaFormatError(f"{image}: not a region question's boxed image (<folder>/images_w_boxes/<id>_object_<k>)")
    folder = frame.parent.parent
    name = f"{folder.name}_{frame.stem}.json"
    places = [folder.parent / "CODA-LM" / folder.name / name, folder / name]
    ann_path = next((q for q in places if q.is_file()), None)
    if ann_path is None:
        raise CodaFormatError(f"{image}: its annotation is missing (the region's box is read from {places[0]} or {places[1]})")
    k = int(path.stem.rpartition("_object_")[2])
    regions = load_annotation(ann_path, check_categories=False).region_perception
    if not 1 <= k <= len(regions):
        raise CodaFormatError(f"{image}: {ann_path} has {len(regions)} regions, not a region {k}")
    x, y, w, h = (float(v) for v in regions[k - 1].box)
    return (x, y, x + w, y + h)


def draw_region_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """A copy of ``image`` with ``box`` [x, y, w, h] outlined in red, width 2, as CODA-LM's region questions."""
    x, y, w, h = (float(v) for v in box)
    return draw_region(image, (x, y, x + w, y + h))
