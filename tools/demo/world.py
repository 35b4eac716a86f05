"""The procedural rare-object driving world: seeded ego-view road scenes in CODA-LM format.

Each image is a straight road seen from the ego car (sky, perspective road, lane markings,
sidewalks, roadside clutter) with common road users (cars, trucks, buses, pedestrians,
cyclists, traffic lights and signs) and rare CODA-LM corner-case objects (traffic cones,
barriers, bollards, debris, dogs, tires, strollers, concrete blocks...). Objects stand on a
ground plane seen through a pinhole camera, so size and image row follow their distance;
nearer objects hide farther ones, some get a foreground occluder, and pixel noise is added.

Every split is written as CODA-LM lays it out (one annotation JSON per image plus the three
task JSONL files; see ``rtrt.trainer.coda``), with rule-based reference texts:

- ``pretrain``: large; rare objects are drawn but named in the text only with probability
  ``pretrain_name_prob`` (the web's long tail), common ones always;
- ``plugin``: small, rare objects named (the plug-in's training set, like CODA-LM train);
- ``val``, ``test``: rare objects named, for evaluation.

Image ``i`` of split ``s`` draws only from ``numpy.random.default_rng([seed, s, i])``, so the
same seed gives byte-identical files whatever the split sizes or the number of workers.
Output is built in a temporary folder next to ``--out`` and renamed into place at the end.

Run::

    python -m rtrt.tools.demo.world --out data/world --seed 0 --pretrain 2000 --plugin 300
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from tqdm import tqdm

from rtrt.trainer.coda import (
    GENERAL_KEY_OF_GROUP,
    GENERAL_KEYS,
    TASK_QUESTIONS,
    TASKS,
    CodaAnnotation,
    PerceptionItem,
    RegionItem,
    TaskRecord,
    annotation_from_json,
    annotation_to_json,
    atomic_write_bytes,
    atomic_write_text,
    category_group,
    draw_region_box,
    save_annotation,
    write_tasks,
)
from rtrt.runtime.fileio import make_temp_dir, replace_dir

__all__ = [
    "COMMON_CATEGORIES",
    "RARE_CATEGORIES",
    "WORLD_CATEGORIES",
    "SPLITS",
    "WorldConfig",
    "WorldObject",
    "draw_scene",
    "Scene",
    "WorldSummary",
    "sample_scene",
    "render_scene",
    "scene_annotation",
    "generate_world",
    "config_from_args",
    "parse_args",
    "main",
]

COMMON_CATEGORIES: tuple[str, ...] = ("car", "truck", "bus", "pedestrian", "cyclist", "traffic_light", "traffic_sign")
RARE_CATEGORIES: tuple[str, ...] = (
    "traffic_cone", "barrier", "bollard", "warning_sign", "debris", "dog", "cat", "tire", "stroller",
    "concrete_block", "garbage_bag", "stone", "dustbin", "carton",
)
WORLD_CATEGORIES: tuple[str, ...] = COMMON_CATEGORIES + RARE_CATEGORIES
# Split ids enter the per-image seed; never renumber them.
SPLITS: dict[str, int] = {"pretrain": 0, "plugin": 1, "val": 2, "test": 3}
FORMATS = ("jpg", "png")


@dataclass
class WorldConfig:
    """Everything that decides a generated world; saved as ``world.json`` beside it."""

    seed: int = 0  # master seed; image i of split s draws from default_rng([seed, s, i])
    pretrain: int = 2000  # images in the pretrain split (rare objects drawn, seldom named)
    plugin: int = 300  # images in the plug-in training split (rare objects named)
    val: int = 100  # images in the validation split
    test: int = 100  # images in the test split
    width: int = 448  # image width in pixels
    height: int = 448  # image height in pixels
    rare_prob: float = 0.9  # probability that an image holds any rare object (the demo's world; 0.7 before its last rebuild)
    max_rare: int = 3  # most rare placements per image (a row of cones or bollards is one)
    max_common: int = 9  # most common objects per image (the demo's world; 5 before its last rebuild)
    pretrain_name_prob: float = 0.1  # chance a rare object is named in pretrain texts (long tail)
    name_prob: float = 1.0  # chance a rare object is named in plugin/val/test texts
    occlusion_prob: float = 0.25  # chance an object gets a foreground occluder (post or bush)
    noise: float = 4.0  # standard deviation of the per-pixel noise, on the 0-255 scale
    max_regions: int = 4  # most region questions per image (rare objects first, then nearest)
    min_region_frac: float = 0.025  # a region's box needs both sides >= this fraction of the width
    image_format: str = "jpg"  # "jpg" (fast, CODA-LM's format) or "png" (lossless, ~15x slower)
    jpeg_quality: int = 92  # JPEG quality when image_format is "jpg"
    boxed_images: bool = True  # write images_w_boxes/ for region questions, as CODA-LM does
    rare_categories: tuple[str, ...] = RARE_CATEGORIES  # rare kinds that may appear
    rare_scale: float = 1.0  # rare objects' physical size (width, height, footprint) times this; common ones keep theirs
    object_scale: float = 1.6  # every object's physical size times this (on top of rare_scale), rare and common alike: the demo's world draws objects 1.6x life size so that a 16-px patch VFM sees them (1: true to life)
    max_distance: float = 30.0  # metres: no object is placed farther ahead than this (the demo's world: 30; 0: each kind's own range; rare kinds reach 20-30 m, common ones 40-70 m, where a traffic light is under half of a 32-px patch)
    cyclist_width: float = 1.7  # metres (before object_scale): a cyclist's box width; 1.7 (the demo's world) draws it side-on with round wheels, 0.7 foreshortened, narrow as a pedestrian with small wheels

    def __post_init__(self) -> None:
        self.rare_categories = tuple(self.rare_categories)
        for name in SPLITS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.width < 32 or self.height < 32:
            raise ValueError(f"image size {self.width}x{self.height} is below the 32x32 minimum")
        for name in ("rare_prob", "pretrain_name_prob", "name_prob", "occlusion_prob", "min_region_frac"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        for name in ("rare_scale", "object_scale"):
            if not 0.25 <= getattr(self, name) <= 4.0:
                raise ValueError(f"{name} must be in [0.25, 4], got {getattr(self, name)}")
        nearest = max(spec[5][0] for spec in _SPEC.values())
        if self.max_distance and not nearest <= self.max_distance <= 200:
            raise ValueError(f"max_distance must be 0 (off) or from {nearest:g} (the farthest near limit, traffic lights') to 200 m, got {self.max_distance}")
        if not 0.5 <= self.cyclist_width <= 2.0:
            raise ValueError(f"cyclist_width must be in [0.5, 2] m, got {self.cyclist_width}")
        if self.max_rare < 0 or self.max_common < 0 or self.max_regions < 0 or self.noise < 0:
            raise ValueError("max_rare, max_common, max_regions and noise must be >= 0")
        if self.image_format not in FORMATS:
            raise ValueError(f"image_format must be one of {FORMATS}, got {self.image_format!r}")
        unknown = [c for c in self.rare_categories if c not in RARE_CATEGORIES]
        if unknown or not self.rare_categories:
            raise ValueError(f"rare_categories must be a non-empty subset of {RARE_CATEGORIES}, got unknown {unknown}")

    def count(self, split: str) -> int:
        return int(getattr(self, split))


@dataclass
class WorldObject:
    """One placed object; ``box`` is what the annotation gets."""

    category: str  # CODA-LM category_name
    z: float  # distance ahead of the camera, metres
    xw: float  # lateral position, metres (0 = centre of the ego lane, + = right)
    zone: str  # "road", "edge", "sidewalk" or "pole" (mounted beside the road)
    fbox: tuple[float, float, float, float]  # drawn extent x0, y0, x1, y1 (may leave the image)
    ground_y: float  # image row of the object's ground contact (for poles and shadows)
    ppm: float  # pixels per metre at its distance
    colour: str  # colour word used in the text ("" if none)
    rgb: tuple[int, int, int]  # main drawing colour
    variant: str = ""  # light state, sign type, pose...
    flip: bool = False  # side-view objects face left when True
    group_id: int = -1  # objects placed together (a row of cones) share an id
    named: bool = True  # whether the texts mention it
    occluder: str = ""  # "post" or "bush" drawn in front of it, "" for none
    occluded: float = 0.0  # fraction of its box hidden by nearer objects or its occluder
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # x, y, w, h clipped to the image (annotation box)


@dataclass
class Scene:
    """A sampled scene: camera, road layout and objects (farthest first, the drawing order)."""

    width: int  # image width in pixels
    height: int  # image height in pixels
    horizon: float  # image row of the horizon
    cx: float  # image column of the vanishing point
    focal: float  # focal length in pixels
    lanes: int  # number of lanes
    ego_lane: int  # index of the ego lane, 0 = leftmost
    lane_width: float  # metres
    sky: str  # "day", "overcast" or "dusk"
    ground: str  # "grass", "dry" or "urban"
    objects: list[WorldObject] = field(default_factory=list)  # what is drawn and annotated, far to near
    palette: dict = field(default_factory=dict)  # sampled background colours and roadside clutter

    @property
    def left_edge(self) -> float:
        return -(self.ego_lane + 0.5) * self.lane_width

    @property
    def right_edge(self) -> float:
        return (self.lanes - self.ego_lane - 0.5) * self.lane_width


@dataclass
class WorldSummary:
    """What ``generate_world`` wrote."""

    out_dir: Path  # the dataset root
    images: dict[str, int]  # split -> images
    questions: dict[str, dict[str, int]]  # split -> task -> questions
    objects: dict[str, dict[str, int]]  # split -> category -> objects drawn
    named: dict[str, dict[str, int]]  # split -> category -> objects named in the texts


CAM_HEIGHT = 1.5  # metres; the ground plane is CAM_HEIGHT below the camera
SIDEWALK = 2.5  # sidewalk width in metres

# category -> (width m, height m, elevation m, footprint depth m, zones with weights, z range m)
_SPEC: dict[str, tuple[float, float, float, float, dict[str, float], tuple[float, float]]] = {
    "car": (1.8, 1.5, 0.0, 4.5, {"road": 0.85, "edge": 0.15}, (6, 60)),
    "truck": (2.5, 3.2, 0.0, 8.0, {"road": 1.0}, (9, 70)),
    "bus": (2.55, 3.1, 0.0, 11.0, {"road": 1.0}, (9, 70)),
    "pedestrian": (0.55, 1.72, 0.0, 0.6, {"sidewalk": 0.75, "road": 0.25}, (4, 40)),
    "cyclist": (0.7, 1.75, 0.0, 1.8, {"edge": 0.8, "road": 0.2}, (5, 45)),
    "traffic_light": (0.4, 1.1, 3.2, 0.5, {"pole": 1.0}, (12, 55)),
    "traffic_sign": (0.75, 0.75, 2.1, 0.5, {"pole": 1.0}, (6, 45)),
    "warning_sign": (0.9, 1.2, 0.0, 0.6, {"road": 0.6, "edge": 0.4}, (5, 28)),
    "traffic_cone": (0.4, 0.72, 0.0, 0.4, {"road": 0.6, "edge": 0.4}, (4, 26)),
    "barrier": (2.0, 1.0, 0.0, 0.6, {"road": 0.6, "edge": 0.4}, (5, 30)),
    "bollard": (0.22, 0.95, 0.0, 0.3, {"edge": 0.8, "road": 0.2}, (4, 24)),
    "debris": (1.4, 0.3, 0.0, 1.0, {"road": 1.0}, (4, 20)),
    "dog": (0.85, 0.62, 0.0, 0.5, {"road": 0.5, "sidewalk": 0.3, "edge": 0.2}, (4, 22)),
    "cat": (0.5, 0.32, 0.0, 0.3, {"road": 0.5, "sidewalk": 0.3, "edge": 0.2}, (4, 14)),
    "tire": (0.68, 0.68, 0.0, 0.3, {"road": 0.8, "edge": 0.2}, (4, 20)),
    "stroller": (0.65, 1.05, 0.0, 0.9, {"sidewalk": 0.5, "edge": 0.3, "road": 0.2}, (4, 22)),
    "concrete_block": (1.2, 0.8, 0.0, 1.0, {"road": 0.6, "edge": 0.4}, (5, 26)),
    "garbage_bag": (0.6, 0.65, 0.0, 0.5, {"sidewalk": 0.4, "edge": 0.3, "road": 0.3}, (4, 20)),
    "stone": (0.7, 0.45, 0.0, 0.6, {"road": 0.7, "edge": 0.3}, (4, 20)),
    "dustbin": (0.62, 1.1, 0.0, 0.6, {"sidewalk": 0.7, "edge": 0.2, "road": 0.1}, (4, 24)),
    "carton": (0.55, 0.42, 0.0, 0.5, {"road": 0.8, "edge": 0.2}, (4, 20)),
}
# How often each common category is drawn (cars dominate, as on real roads).
_COMMON_P = np.array([0.36, 0.1, 0.07, 0.2, 0.09, 0.09, 0.09])
# Kinds that often come as a row along the road; the row counts as one placement.
_ROWS = {"traffic_cone": (2, 5), "bollard": (2, 4), "concrete_block": (2, 3)}
# Kinds whose neighbours of the same colour and place are described together.
_GROUPABLE = {"traffic_cone", "bollard", "barrier", "concrete_block", "debris", "stone", "tire", "carton", "garbage_bag"}

_CAR_COLOURS = {
    "white": (232, 232, 230), "black": (28, 28, 32), "silver": (168, 172, 178), "gray": (98, 100, 106),
    "red": (178, 32, 30), "blue": (38, 70, 158), "green": (40, 108, 62), "yellow": (222, 188, 40),
    "brown": (110, 72, 44),
}
_BUS_COLOURS = {"yellow": (228, 186, 30), "red": (190, 36, 32), "blue": (40, 84, 170), "white": (230, 230, 228), "green": (50, 130, 70)}
_TRUCK_COLOURS = {"white": (228, 228, 226), "blue": (44, 80, 150), "red": (170, 40, 36), "orange": (220, 120, 30), "gray": (120, 122, 126)}
_SHIRT_COLOURS = {
    "red": (190, 40, 40), "blue": (40, 80, 170), "green": (50, 130, 60), "yellow": (220, 190, 50),
    "white": (225, 225, 225), "black": (35, 35, 38), "orange": (225, 120, 40), "purple": (110, 60, 140),
}
_CONE_COLOURS = {"orange": (245, 110, 22), "red": (210, 40, 30), "yellow": (236, 200, 30)}
_BOLLARD_COLOURS = {"yellow": (230, 196, 30), "white": (230, 230, 228), "orange": (240, 120, 30), "black": (35, 35, 35)}
_BARRIER_COLOURS = {"red and white": (200, 30, 30), "yellow and black": (230, 190, 20), "orange and white": (235, 120, 25)}
_DOG_COLOURS = {"brown": (120, 78, 44), "black": (30, 28, 28), "white": (225, 222, 215), "golden": (200, 150, 70), "gray": (120, 118, 115)}
_STROLLER_COLOURS = {"blue": (50, 80, 150), "red": (170, 40, 50), "black": (35, 35, 40), "green": (60, 120, 80), "pink": (220, 130, 160)}
_BIN_COLOURS = {"green": (40, 110, 60), "blue": (40, 80, 150), "gray": (110, 112, 115), "black": (35, 35, 38)}
_BAG_COLOURS = {"black": (28, 28, 30), "gray": (90, 92, 96), "blue": (50, 70, 130)}
_LIGHT_STATES = ("red", "yellow", "green")
_SIGN_VARIANTS = ("speed limit", "no entry", "stop", "direction")

_SKIES = {
    "day": ((82, 132, 205), (178, 205, 236)),
    "overcast": (((142, 146, 152)), (204, 205, 208)),
    "dusk": ((58, 66, 118), (232, 152, 92)),
}
_GROUNDS = {"grass": (72, 118, 52), "dry": (146, 132, 92), "urban": (128, 126, 120)}


def _jitter(rgb: Sequence[int], rng: np.random.Generator, amount: int = 14) -> tuple[int, int, int]:
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(min(255, max(0, c + int(v)))) for c, v in zip(rgb, d))  # type: ignore[return-value]


def _grey(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    v = int(rng.integers(lo, hi + 1))
    return (v, v, v + 2)


def _shade(rgb: Sequence[int], k: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * k))) for c in rgb)  # type: ignore[return-value]


def _pick(rng: np.random.Generator, table: dict) -> tuple[str, tuple[int, int, int]]:
    keys = list(table)
    k = keys[int(rng.integers(len(keys)))]
    return k, _jitter(table[k], rng)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def _colour_for(cat: str, rng: np.random.Generator) -> tuple[str, tuple[int, int, int], str]:
    """(colour word, rgb, variant) of a new object."""
    table = {
        "car": _CAR_COLOURS, "truck": _TRUCK_COLOURS, "bus": _BUS_COLOURS, "pedestrian": _SHIRT_COLOURS,
        "cyclist": _SHIRT_COLOURS, "traffic_cone": _CONE_COLOURS, "bollard": _BOLLARD_COLOURS,
        "barrier": _BARRIER_COLOURS, "dog": _DOG_COLOURS, "cat": _DOG_COLOURS, "stroller": _STROLLER_COLOURS,
        "dustbin": _BIN_COLOURS, "garbage_bag": _BAG_COLOURS,
    }.get(cat)
    variant = ""
    if cat == "traffic_light":
        variant = _LIGHT_STATES[int(rng.integers(3))]
        return "", (30, 30, 32), variant
    if cat == "traffic_sign":
        variant = _SIGN_VARIANTS[int(rng.integers(len(_SIGN_VARIANTS)))]
        return "", (200, 30, 30), variant
    if cat == "barrier":
        variant = "jersey" if rng.random() < 0.35 else "board"
        if variant == "jersey":
            return "concrete", _jitter((176, 174, 168), rng), variant
    if cat == "pedestrian":
        variant = "standing" if rng.random() < 0.3 else "walking"
    if cat == "tire":
        variant = "lying" if rng.random() < 0.4 else "standing"
        return "", _jitter((30, 30, 32), rng, 6), variant
    if table is None:
        base = {
            "warning_sign": (230, 40, 30), "debris": (110, 92, 70), "concrete_block": (170, 168, 160),
            "stone": (126, 122, 116), "carton": (176, 134, 82),
        }[cat]
        return "", _jitter(base, rng), variant
    name, rgb = _pick(rng, table)
    return name, rgb, variant


def _sample_x(scene: Scene, zone: str, rng: np.random.Generator, width_m: float) -> float:
    left, right = scene.left_edge, scene.right_edge
    side = -1 if rng.random() < 0.45 else 1
    if zone == "road":
        return float(rng.uniform(left + width_m / 2 + 0.2, right - width_m / 2 - 0.2))
    if zone == "edge":
        edge = left if side < 0 else right
        return float(edge - side * rng.uniform(0.2, 0.9) + side * width_m / 2 * 0.2)
    if zone == "sidewalk":
        edge = left if side < 0 else right
        return float(edge + side * rng.uniform(0.5 + width_m / 2, SIDEWALK - width_m / 2))
    if zone == "pole":
        edge = left if rng.random() < 0.25 else right
        return float(edge + (1 if edge == right else -1) * rng.uniform(0.6, 1.6))
    raise AssertionError(zone)


def _project(scene: Scene, cat: str, xw: float, z: float, scale: float,
             width_m: float) -> tuple[tuple[float, float, float, float], float, float]:
    _, h_m, elev, _, _, _ = _SPEC[cat]
    w_m, h_m = width_m * scale, h_m * scale
    ppm = scene.focal / z
    ground_y = scene.horizon + scene.focal * CAM_HEIGHT / z
    cx = scene.cx + scene.focal * xw / z
    y1 = ground_y - elev * ppm
    return (cx - w_m * ppm / 2, y1 - h_m * ppm, cx + w_m * ppm / 2, y1), ground_y, ppm


def _clip_box(fbox: Sequence[float], w: int, h: int) -> tuple[int, int, int, int]:
    x0, y0 = max(0, math.floor(fbox[0])), max(0, math.floor(fbox[1]))
    x1, y1 = min(w, math.ceil(fbox[2])), min(h, math.ceil(fbox[3]))
    return x0, y0, max(0, x1 - x0), max(0, y1 - y0)


def _inside_fraction(fbox: Sequence[float], w: int, h: int) -> float:
    area = max(1e-6, (fbox[2] - fbox[0]) * (fbox[3] - fbox[1]))
    bx = _clip_box(fbox, w, h)
    return bx[2] * bx[3] / area


def sample_scene(cfg: WorldConfig, rng: np.random.Generator) -> Scene:
    """Draw a scene's camera, road and objects from ``rng`` (no pixels yet)."""
    W, H = cfg.width, cfg.height
    lanes = int(rng.integers(2, 5))
    scene = Scene(
        width=W,
        height=H,
        horizon=float(H * rng.uniform(0.36, 0.48)),
        cx=float(W * (0.5 + rng.uniform(-0.08, 0.08))),
        focal=float(W * rng.uniform(0.85, 1.1)),
        lanes=lanes,
        ego_lane=int(rng.integers(lanes)),
        lane_width=float(rng.uniform(3.2, 3.8)),
        sky=("day", "overcast", "dusk")[int(rng.choice(3, p=[0.6, 0.28, 0.12]))],
        ground=("grass", "dry", "urban")[int(rng.integers(3))],
    )
    scene.palette = {
        "road": _jitter(_grey(rng, 70, 100), rng, 3),
        "sidewalk": _jitter(_grey(rng, 128, 170), rng, 5),
        "ground": _jitter(_GROUNDS[scene.ground], rng, 14),
        "sky_top": _jitter(_SKIES[scene.sky][0], rng, 10),
        "sky_low": _jitter(_SKIES[scene.sky][1], rng, 10),
        "edge_line": (236, 200, 40) if rng.random() < 0.3 else (235, 235, 230),
        "dash_phase": float(rng.uniform(0, 9)),
        "clutter": [
            (int(rng.integers(2)), float(rng.uniform(-1, 1)), float(rng.uniform(0.6, 1.4)), float(rng.uniform(0.4, 1.6)),
             _jitter((70, 80, 70) if scene.ground != "urban" else (120, 110, 100), rng, 25))
            for _ in range(int(rng.integers(3, 9)))
        ],
    }
    z_near = scene.focal * CAM_HEIGHT / (H - scene.horizon)

    placements: list[str] = []
    n_common = int(rng.integers(0, cfg.max_common + 1)) if cfg.max_common else 0
    placements += [COMMON_CATEGORIES[int(i)] for i in rng.choice(len(COMMON_CATEGORIES), size=n_common, p=_COMMON_P)]
    if cfg.max_rare and rng.random() < cfg.rare_prob:
        n_rare = int(rng.integers(1, cfg.max_rare + 1))
        rare = cfg.rare_categories
        placements += [rare[int(rng.integers(len(rare)))] for _ in range(n_rare)]

    footprints: list[tuple[float, float, float, float]] = []  # x0, x1, z0, z1 in metres
    objects: list[WorldObject] = []
    for gid, cat in enumerate(placements):
        width, _, _, depth_m, zones, (z_lo, z_hi) = _SPEC[cat]
        if cat == "cyclist":
            width = cfg.cyclist_width
        scale = (cfg.rare_scale if cat in RARE_CATEGORIES else 1.0) * cfg.object_scale
        w_m, depth_m = width * scale, depth_m * scale
        if cfg.max_distance:
            z_hi = min(z_hi, cfg.max_distance)
        zone_names = list(zones)
        zone = zone_names[int(rng.choice(len(zones), p=np.array(list(zones.values())) / sum(zones.values())))]
        count = int(rng.integers(_ROWS[cat][0], _ROWS[cat][1] + 1)) if cat in _ROWS and rng.random() < 0.6 else 1
        colour, rgb, variant = _colour_for(cat, rng)
        flip = bool(rng.random() < 0.5)
        for _ in range(12):  # a few tries for a free, visible spot
            z0 = float(rng.uniform(max(z_lo, z_near + 0.8), max(z_hi, z_near + 2.0)))
            xw = _sample_x(scene, zone, rng, w_m)
            if zone == "road" and cat in ("car", "truck", "bus"):  # vehicles keep to lane centres
                lane = int(round(xw / scene.lane_width))
                lane = min(max(lane, -scene.ego_lane), scene.lanes - 1 - scene.ego_lane)
                xw = lane * scene.lane_width + float(rng.uniform(-0.3, 0.3))
            step = float(rng.uniform(2.0, 4.0))
            row = [(xw, z0 + k * step) for k in range(count)]
            boxes = [_project(scene, cat, x, z, scale, width) for x, z in row]
            fps = [(x - w_m / 2, x + w_m / 2, z - depth_m / 2, z + depth_m / 2) for x, z in row]
            free = all(
                not (a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]) for a in fps for b in footprints
            )
            visible = all(_inside_fraction(b[0], W, H) >= 0.7 for b in boxes)
            if free and visible:
                footprints += fps
                for (x, z), (fbox, gy, ppm) in zip(row, boxes):
                    objects.append(
                        WorldObject(cat, z, x, zone, fbox, gy, ppm, colour, _jitter(rgb, rng, 6), variant, flip, gid)
                    )
                break
    objects.sort(key=lambda o: -o.z)  # painter's order: far to near

    # Explicit occluders, then the fraction of each box hidden by nearer boxes (near to far).
    for o in objects:
        if o.zone != "pole" and rng.random() < cfg.occlusion_prob:
            o.occluder = "bush" if o.zone == "sidewalk" else "post"
    covered = np.zeros((H, W), dtype=bool)
    kept = []
    for o in reversed(objects):
        x, y, w, h = o.box = _clip_box(o.fbox, W, H)
        if w < 1 or h < 1:
            continue
        region = covered[y : y + h, x : x + w]
        o.occluded = float(region.mean())
        if o.occluder:
            o.occluded = min(1.0, o.occluded + 0.3)
        if o.occluded > 0.6:  # mostly hidden: leave it out of the picture and the texts
            continue
        region[...] = True
        kept.append(o)
    scene.objects = kept[::-1]
    return scene


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


class _Pen:
    """Draws in box-relative coordinates: u (0 = left, 1 = right) and v (0 = top, 1 = bottom)."""

    def __init__(self, d: ImageDraw.ImageDraw, box: Sequence[float], flip: bool = False):
        self.d = d
        self.x0, self.y0 = box[0], box[1]
        self.w, self.h = box[2] - box[0], box[3] - box[1]
        self.flip = flip

    def p(self, u: float, v: float) -> tuple[float, float]:
        if self.flip:
            u = 1.0 - u
        return (self.x0 + u * self.w, self.y0 + v * self.h)

    def _r(self, u0: float, v0: float, u1: float, v1: float) -> list[float]:
        (a, b), (c, e) = self.p(u0, v0), self.p(u1, v1)
        return [min(a, c), min(b, e), max(a, c), max(b, e)]

    def rect(self, u0, v0, u1, v1, fill) -> None:
        self.d.rectangle(self._r(u0, v0, u1, v1), fill=fill)

    def ell(self, u0, v0, u1, v1, fill) -> None:
        self.d.ellipse(self._r(u0, v0, u1, v1), fill=fill)

    def poly(self, pts, fill) -> None:
        self.d.polygon([self.p(u, v) for u, v in pts], fill=fill)

    def line(self, pts, fill, width: float) -> None:
        self.d.line([self.p(u, v) for u, v in pts], fill=fill, width=max(1, int(round(width))))


def _draw_car(pen: _Pen, o: WorldObject, rng) -> None:
    c = o.rgb
    pen.rect(0.05, 0.82, 0.22, 1.0, (18, 18, 18))
    pen.rect(0.78, 0.82, 0.95, 1.0, (18, 18, 18))
    pen.rect(0.0, 0.4, 1.0, 0.9, c)
    pen.poly([(0.1, 0.42), (0.2, 0.02), (0.8, 0.02), (0.9, 0.42)], c)
    pen.poly([(0.16, 0.38), (0.25, 0.08), (0.75, 0.08), (0.84, 0.38)], (42, 52, 64))
    pen.rect(0.03, 0.47, 0.2, 0.57, (205, 24, 24))
    pen.rect(0.8, 0.47, 0.97, 0.57, (205, 24, 24))
    pen.rect(0.38, 0.62, 0.62, 0.72, (226, 226, 220))
    pen.rect(0.0, 0.82, 1.0, 0.88, _shade(c, 0.55))


def _draw_truck(pen: _Pen, o: WorldObject, rng) -> None:
    c = o.rgb
    for u in (0.04, 0.2, 0.66, 0.82):
        pen.rect(u, 0.86, u + 0.14, 1.0, (16, 16, 16))
    pen.rect(0.0, 0.0, 1.0, 0.84, c)
    pen.rect(0.0, 0.84, 1.0, 0.88, (40, 40, 42))
    pen.line([(0.5, 0.04), (0.5, 0.8)], _shade(c, 0.55), max(1, pen.w * 0.02))
    pen.line([(0.02, 0.02), (0.98, 0.02), (0.98, 0.82), (0.02, 0.82), (0.02, 0.02)], _shade(c, 0.7), max(1, pen.w * 0.015))
    for u in (0.3, 0.7):
        pen.line([(u, 0.35), (u, 0.55)], (70, 70, 72), max(1, pen.w * 0.02))
    pen.rect(0.02, 0.76, 0.12, 0.82, (210, 30, 30))
    pen.rect(0.88, 0.76, 0.98, 0.82, (210, 30, 30))


def _draw_bus(pen: _Pen, o: WorldObject, rng) -> None:
    c = o.rgb
    pen.rect(0.06, 0.9, 0.22, 1.0, (16, 16, 16))
    pen.rect(0.78, 0.9, 0.94, 1.0, (16, 16, 16))
    pen.rect(0.0, 0.0, 1.0, 0.93, c)
    pen.rect(0.06, 0.05, 0.94, 0.14, (20, 20, 20))
    pen.rect(0.3, 0.06, 0.7, 0.13, (250, 170, 30))
    pen.rect(0.06, 0.2, 0.94, 0.5, (40, 52, 66))
    pen.rect(0.04, 0.72, 0.14, 0.8, (214, 30, 30))
    pen.rect(0.86, 0.72, 0.96, 0.8, (214, 30, 30))
    pen.rect(0.35, 0.76, 0.65, 0.84, (226, 226, 220))


def _draw_person(pen: _Pen, shirt, rng, walking: float) -> None:
    skin = (198, 152, 118)
    pants = (44, 48, 70)
    pen.line([(0.42, 0.55), (0.5 - walking, 1.0)], pants, pen.w * 0.22)
    pen.line([(0.58, 0.55), (0.5 + walking, 1.0)], pants, pen.w * 0.22)
    pen.poly([(0.22, 0.2), (0.78, 0.2), (0.72, 0.58), (0.28, 0.58)], shirt)
    pen.line([(0.24, 0.22), (0.12, 0.52)], shirt, pen.w * 0.14)
    pen.line([(0.76, 0.22), (0.88, 0.52)], shirt, pen.w * 0.14)
    pen.ell(0.3, 0.0, 0.7, 0.17, skin)
    pen.rect(0.3, 0.0, 0.7, 0.05, (40, 30, 24))


def _draw_pedestrian(pen: _Pen, o: WorldObject, rng) -> None:
    _draw_person(pen, o.rgb, rng, 0.12 if o.variant != "standing" else 0.05)


def _draw_cyclist(pen: _Pen, o: WorldObject, rng) -> None:
    wheel = (22, 22, 22)
    lw = max(1, pen.w * 0.07)
    for u in (0.0, 0.58):
        (a, b), (c, e) = pen.p(u, 0.62), pen.p(u + 0.42, 1.0)
        pen.d.ellipse([min(a, c), b, max(a, c), e], outline=wheel, width=int(lw))
    pen.line([(0.21, 0.81), (0.45, 0.62), (0.79, 0.81)], (150, 150, 155), lw)
    pen.line([(0.45, 0.62), (0.72, 0.6), (0.79, 0.81)], (150, 150, 155), lw)
    skin, pants = (198, 152, 118), (44, 48, 70)
    pen.line([(0.42, 0.42), (0.5, 0.75)], pants, pen.w * 0.1)
    pen.poly([(0.3, 0.16), (0.5, 0.14), (0.52, 0.44), (0.36, 0.44)], o.rgb)
    pen.line([(0.48, 0.2), (0.72, 0.52)], o.rgb, pen.w * 0.08)
    pen.ell(0.33, 0.0, 0.55, 0.14, skin)
    pen.poly([(0.31, 0.05), (0.44, -0.02), (0.58, 0.05)], (230, 230, 40))


def _draw_pole(pen: _Pen, o: WorldObject, top_v: float) -> None:
    x, _ = pen.p(0.5, 0)
    half = max(1.0, 0.06 * o.ppm)
    pen.d.rectangle([x - half, pen.y0 + top_v * pen.h, x + half, o.ground_y], fill=(92, 94, 98))


def _draw_traffic_light(pen: _Pen, o: WorldObject, rng) -> None:
    _draw_pole(pen, o, 1.0)
    pen.rect(0.0, 0.0, 1.0, 1.0, (26, 26, 28))
    lit = {"red": (255, 40, 30), "yellow": (255, 200, 30), "green": (40, 230, 90)}
    dim = {"red": (80, 24, 22), "yellow": (80, 66, 20), "green": (20, 70, 36)}
    for i, s in enumerate(_LIGHT_STATES):
        v = 0.05 + i * 0.32
        pen.ell(0.15, v, 0.85, v + 0.26, lit[s] if s == o.variant else dim[s])


def _draw_traffic_sign(pen: _Pen, o: WorldObject, rng) -> None:
    _draw_pole(pen, o, 0.5)
    v = o.variant
    if v == "direction":
        pen.rect(0.0, 0.1, 1.0, 0.9, (30, 80, 170))
        pen.line([(0.2, 0.5), (0.75, 0.5)], (240, 240, 240), pen.w * 0.1)
        pen.poly([(0.62, 0.3), (0.88, 0.5), (0.62, 0.7)], (240, 240, 240))
    elif v == "stop":
        k = 0.29
        pen.poly([(k, 0), (1 - k, 0), (1, k), (1, 1 - k), (1 - k, 1), (k, 1), (0, 1 - k), (0, k)], (200, 26, 26))
        pen.rect(0.2, 0.42, 0.8, 0.58, (240, 240, 240))
    elif v == "no entry":
        pen.ell(0.0, 0.0, 1.0, 1.0, (205, 30, 30))
        pen.rect(0.18, 0.4, 0.82, 0.6, (245, 245, 245))
    else:  # speed limit
        pen.ell(0.0, 0.0, 1.0, 1.0, (205, 30, 30))
        pen.ell(0.14, 0.14, 0.86, 0.86, (245, 245, 245))
        pen.rect(0.3, 0.35, 0.46, 0.65, (20, 20, 20))
        pen.rect(0.54, 0.35, 0.7, 0.65, (20, 20, 20))


def _draw_warning_sign(pen: _Pen, o: WorldObject, rng) -> None:
    pen.line([(0.3, 0.6), (0.15, 1.0)], (60, 60, 62), pen.w * 0.06)
    pen.line([(0.7, 0.6), (0.85, 1.0)], (60, 60, 62), pen.w * 0.06)
    pen.poly([(0.5, 0.0), (1.0, 0.72), (0.0, 0.72)], o.rgb)
    pen.poly([(0.5, 0.14), (0.84, 0.64), (0.16, 0.64)], (245, 245, 240))
    pen.rect(0.47, 0.3, 0.53, 0.5, (20, 20, 20))
    pen.rect(0.47, 0.54, 0.53, 0.59, (20, 20, 20))


def _draw_traffic_cone(pen: _Pen, o: WorldObject, rng) -> None:
    pen.rect(0.0, 0.9, 1.0, 1.0, (32, 32, 32))
    pen.poly([(0.42, 0.0), (0.58, 0.0), (0.86, 0.9), (0.14, 0.9)], o.rgb)
    pen.poly([(0.35, 0.26), (0.65, 0.26), (0.7, 0.4), (0.3, 0.4)], (240, 240, 240))
    pen.poly([(0.26, 0.54), (0.74, 0.54), (0.78, 0.66), (0.22, 0.66)], (240, 240, 240))


def _draw_barrier(pen: _Pen, o: WorldObject, rng) -> None:
    if o.variant == "jersey":
        pen.poly([(0.05, 1.0), (0.95, 1.0), (0.85, 0.55), (0.8, 0.0), (0.2, 0.0), (0.15, 0.55)], o.rgb)
        pen.poly([(0.15, 0.55), (0.85, 0.55), (0.95, 1.0), (0.05, 1.0)], _shade(o.rgb, 0.82))
        for i in range(6):
            u = 0.2 + i * 0.1
            pen.rect(u, 0.08, u + 0.05, 0.22, (200, 30, 30) if i % 2 == 0 else (240, 240, 240))
        return
    leg = (70, 70, 72)
    pen.line([(0.12, 0.2), (0.06, 1.0)], leg, pen.w * 0.03)
    pen.line([(0.88, 0.2), (0.94, 1.0)], leg, pen.w * 0.03)
    pen.rect(0.0, 0.08, 1.0, 0.45, (245, 245, 240))
    for i in range(5):
        u = -0.05 + i * 0.22
        pen.poly([(u, 0.45), (u + 0.1, 0.08), (u + 0.2, 0.08), (u + 0.1, 0.45)], o.rgb)
    pen.rect(-0.01, 0.44, 1.01, 0.48, (60, 60, 60))


def _draw_bollard(pen: _Pen, o: WorldObject, rng) -> None:
    pen.rect(0.0, 0.08, 1.0, 1.0, o.rgb)
    pen.ell(0.0, 0.0, 1.0, 0.16, o.rgb)
    band = (245, 245, 245) if o.colour in ("black", "orange") else (25, 25, 25)
    pen.rect(0.0, 0.2, 1.0, 0.32, band)
    pen.rect(0.0, 0.42, 1.0, 0.5, band)


def _draw_debris(pen: _Pen, o: WorldObject, rng) -> None:
    for _ in range(int(rng.integers(4, 8))):
        u, v = float(rng.uniform(0.0, 0.8)), float(rng.uniform(0.3, 0.8))
        s = float(rng.uniform(0.12, 0.25))
        pts = [(u + s * float(rng.uniform(0, 1)), v + s * 2.2 * float(rng.uniform(0, 1))) for _ in range(5)]
        pts.sort(key=lambda p: math.atan2(p[1] - v - s, p[0] - u - s / 2))
        pen.poly(pts, _jitter(o.rgb, rng, 30))
    pen.rect(0.1, 0.7, 0.55, 0.78, (150, 150, 150))
    pen.poly([(0.5, 0.0), (0.8, 0.35), (0.7, 0.9), (0.35, 0.55)], _shade(o.rgb, 0.7))


def _draw_quadruped(pen: _Pen, o: WorldObject, rng, cat: bool) -> None:
    c = o.rgb
    dark = _shade(c, 0.7)
    leg_w = pen.w * (0.07 if cat else 0.09)
    for u in (0.22, 0.32, 0.62, 0.72):
        pen.line([(u, 0.5), (u + 0.02, 1.0)], dark if u in (0.32, 0.72) else c, leg_w)
    pen.ell(0.12, 0.3, 0.8, 0.68, c)
    if cat:
        pen.line([(0.14, 0.42), (0.04, 0.1), (0.0, 0.0)], c, pen.w * 0.06)
        pen.ell(0.68, 0.06, 1.0, 0.5, c)
        pen.poly([(0.7, 0.16), (0.74, -0.06), (0.82, 0.1)], c)
        pen.poly([(0.86, 0.1), (0.94, -0.06), (0.98, 0.16)], c)
        pen.ell(0.86, 0.22, 0.9, 0.28, (40, 160, 60))
    else:
        pen.line([(0.14, 0.4), (0.02, 0.2)], c, pen.w * 0.07)
        pen.poly([(0.7, 0.3), (0.8, 0.05), (0.92, 0.05), (1.0, 0.25), (0.98, 0.35), (0.78, 0.42)], c)
        pen.poly([(0.78, 0.06), (0.74, 0.3), (0.82, 0.26)], dark)
        pen.ell(0.95, 0.2, 1.0, 0.28, (15, 15, 15))
        pen.ell(0.86, 0.1, 0.89, 0.15, (15, 15, 15))


def _draw_dog(pen: _Pen, o: WorldObject, rng) -> None:
    _draw_quadruped(pen, o, rng, cat=False)


def _draw_cat(pen: _Pen, o: WorldObject, rng) -> None:
    _draw_quadruped(pen, o, rng, cat=True)


def _draw_tire(pen: _Pen, o: WorldObject, rng) -> None:
    if o.variant == "lying":
        pen.ell(0.0, 0.6, 1.0, 1.0, o.rgb)
        pen.ell(0.0, 0.35, 1.0, 0.8, _shade(o.rgb, 1.6))
        pen.ell(0.26, 0.46, 0.74, 0.7, (20, 20, 20))
        return
    pen.ell(0.0, 0.0, 1.0, 1.0, o.rgb)
    pen.ell(0.24, 0.24, 0.76, 0.76, (140, 142, 146))
    pen.ell(0.4, 0.4, 0.6, 0.6, (60, 60, 62))
    for a in range(0, 360, 60):
        r = math.radians(a)
        pen.ell(0.5 + 0.42 * math.cos(r) - 0.04, 0.5 + 0.42 * math.sin(r) - 0.04,
                0.5 + 0.42 * math.cos(r) + 0.04, 0.5 + 0.42 * math.sin(r) + 0.04, (55, 55, 57))


def _draw_stroller(pen: _Pen, o: WorldObject, rng) -> None:
    frame = (50, 50, 52)
    pen.line([(0.75, 0.55), (0.98, 0.0)], frame, pen.w * 0.05)
    pen.line([(0.2, 0.65), (0.1, 0.9)], frame, pen.w * 0.04)
    pen.line([(0.7, 0.65), (0.8, 0.9)], frame, pen.w * 0.04)
    pen.ell(0.05, 0.3, 0.8, 0.72, o.rgb)
    pen.poly([(0.05, 0.5), (0.1, 0.2), (0.3, 0.08), (0.5, 0.1), (0.45, 0.5)], _shade(o.rgb, 0.75))
    for u in (0.02, 0.66):
        pen.ell(u, 0.8, u + 0.22, 1.0, (20, 20, 20))


def _draw_concrete_block(pen: _Pen, o: WorldObject, rng) -> None:
    c = o.rgb
    pen.rect(0.0, 0.22, 0.82, 1.0, c)
    pen.poly([(0.0, 0.22), (0.18, 0.0), (1.0, 0.0), (0.82, 0.22)], _shade(c, 1.15))
    pen.poly([(0.82, 0.22), (1.0, 0.0), (1.0, 0.8), (0.82, 1.0)], _shade(c, 0.7))
    pen.line([(0.1, 0.6), (0.3, 0.55), (0.45, 0.7)], _shade(c, 0.8), max(1, pen.w * 0.015))


def _draw_garbage_bag(pen: _Pen, o: WorldObject, rng) -> None:
    c = o.rgb
    pen.ell(0.0, 0.22, 1.0, 1.0, c)
    pen.poly([(0.38, 0.3), (0.5, 0.1), (0.62, 0.3)], c)
    pen.poly([(0.42, 0.1), (0.5, 0.0), (0.58, 0.1), (0.5, 0.16)], _shade(c, 1.5))
    pen.ell(0.2, 0.4, 0.38, 0.55, _shade((c[0] + 40, c[1] + 40, c[2] + 40), 1.3))


def _draw_stone(pen: _Pen, o: WorldObject, rng) -> None:
    c = o.rgb
    pts = [(0.0, 1.0), (0.04, 0.45), (0.25, 0.08), (0.6, 0.0), (0.88, 0.2), (1.0, 0.65), (0.94, 1.0)]
    pen.poly([(u + float(rng.uniform(-0.04, 0.04)), v) for u, v in pts], c)
    pen.poly([(0.25, 0.1), (0.6, 0.02), (0.7, 0.3), (0.35, 0.38)], _shade(c, 1.25))
    pen.poly([(0.6, 0.6), (0.95, 0.7), (0.94, 1.0), (0.5, 1.0)], _shade(c, 0.7))


def _draw_dustbin(pen: _Pen, o: WorldObject, rng) -> None:
    c = o.rgb
    pen.poly([(0.05, 0.12), (0.95, 0.12), (0.88, 0.92), (0.12, 0.92)], c)
    pen.rect(0.0, 0.02, 1.0, 0.14, _shade(c, 0.7))
    pen.rect(0.4, 0.0, 0.6, 0.04, _shade(c, 0.6))
    pen.ell(0.1, 0.84, 0.3, 1.0, (20, 20, 20))
    pen.ell(0.7, 0.84, 0.9, 1.0, (20, 20, 20))
    pen.rect(0.3, 0.35, 0.7, 0.5, _shade(c, 1.3))


def _draw_carton(pen: _Pen, o: WorldObject, rng) -> None:
    c = o.rgb
    pen.rect(0.0, 0.3, 0.8, 1.0, c)
    pen.poly([(0.0, 0.3), (0.2, 0.0), (1.0, 0.0), (0.8, 0.3)], _shade(c, 1.15))
    pen.poly([(0.8, 0.3), (1.0, 0.0), (1.0, 0.75), (0.8, 1.0)], _shade(c, 0.72))
    pen.poly([(0.36, 0.3), (0.56, 0.0), (0.64, 0.0), (0.44, 0.3)], (200, 176, 130))
    pen.rect(0.36, 0.3, 0.44, 0.55, (200, 176, 130))


_DRAW: dict[str, Callable[[_Pen, WorldObject, np.random.Generator], None]] = {
    "car": _draw_car, "truck": _draw_truck, "bus": _draw_bus, "pedestrian": _draw_pedestrian,
    "cyclist": _draw_cyclist, "traffic_light": _draw_traffic_light, "traffic_sign": _draw_traffic_sign,
    "warning_sign": _draw_warning_sign, "traffic_cone": _draw_traffic_cone, "barrier": _draw_barrier,
    "bollard": _draw_bollard, "debris": _draw_debris, "dog": _draw_dog, "cat": _draw_cat, "tire": _draw_tire,
    "stroller": _draw_stroller, "concrete_block": _draw_concrete_block, "garbage_bag": _draw_garbage_bag,
    "stone": _draw_stone, "dustbin": _draw_dustbin, "carton": _draw_carton,
}


def _draw_background(scene: Scene, rng: np.random.Generator) -> Image.Image:
    W, H, hz = scene.width, scene.height, scene.horizon
    pal = scene.palette
    hz_i = int(round(hz))
    # One column of sky and ground gradient, stretched sideways: far cheaper than a full array.
    col = np.empty((H, 1, 3), dtype=np.float32)
    t = np.linspace(0.0, 1.0, max(hz_i, 1), dtype=np.float32)[:, None]
    col[:hz_i, 0] = np.array(pal["sky_top"], np.float32) * (1 - t) + np.array(pal["sky_low"], np.float32) * t
    col[hz_i:, 0] = np.array(pal["ground"], np.float32) * np.linspace(0.82, 1.08, H - hz_i, dtype=np.float32)[:, None]
    img = Image.fromarray(np.clip(col, 0, 255).astype(np.uint8)).resize((W, H), Image.Resampling.NEAREST)
    d = ImageDraw.Draw(img)
    f, cx = scene.focal, scene.cx

    def at(xw: float, z: float) -> tuple[float, float]:
        return (cx + f * xw / z, hz + f * CAM_HEIGHT / z)

    z_b = f * CAM_HEIGHT / (H - hz) * 0.6  # below the bottom row, so the road fills it
    z_f = 400.0
    # Roadside clutter (trees or buildings) on the horizon, beyond the sidewalks.
    for kind, side, scale, dist, col in pal["clutter"]:
        z = 25.0 + 60.0 * dist
        xw = (scene.right_edge + SIDEWALK + 3 + 8 * abs(side)) if side > 0 else (scene.left_edge - SIDEWALK - 3 - 8 * abs(side))
        x, y = at(xw, z)
        s = f / z
        if kind == 0:  # tree
            d.rectangle([x - 0.25 * s, y - 2.5 * s * scale, x + 0.25 * s, y], fill=(80, 60, 40))
            d.ellipse([x - 2.0 * s * scale, y - 6 * s * scale, x + 2.0 * s * scale, y - 2.0 * s * scale], fill=col)
        else:  # building
            d.rectangle([x - 6 * s * scale, y - 12 * s * scale, x + 6 * s * scale, y], fill=col)
            d.rectangle([x - 4 * s * scale, y - 10 * s * scale, x + 4 * s * scale, y - 8 * s * scale], fill=_shade(col, 0.6))
    left, right = scene.left_edge, scene.right_edge
    for edge, side in ((left, -1), (right, 1)):
        d.polygon([at(edge, z_f), at(edge + side * SIDEWALK, z_f), at(edge + side * SIDEWALK, z_b), at(edge, z_b)], fill=pal["sidewalk"])
        d.polygon([at(edge, z_f), at(edge + side * 0.15, z_f), at(edge + side * 0.15, z_b), at(edge, z_b)], fill=_shade(pal["sidewalk"], 0.75))
    d.polygon([at(left, z_f), at(right, z_f), at(right, z_b), at(left, z_b)], fill=pal["road"])
    line_w = 0.14
    for edge, inward in ((left, 1), (right, -1)):
        colour = pal["edge_line"] if edge == left else (235, 235, 230)
        e = edge + inward * 0.25
        d.polygon([at(e, z_f), at(e + inward * line_w, z_f), at(e + inward * line_w, z_b), at(e, z_b)], fill=colour)
    z = z_b + pal["dash_phase"]
    while z < 120.0:  # dashed lane lines, 3 m dash and 6 m gap
        for k in range(1, scene.lanes):
            xb = left + k * scene.lane_width - line_w / 2
            z1 = min(z + 3.0, 120.0)
            d.polygon([at(xb, z1), at(xb + line_w, z1), at(xb + line_w, max(z, z_b)), at(xb, max(z, z_b))], fill=(230, 230, 226))
        z += 9.0
    return img


def render_scene(scene: Scene, rng: np.random.Generator, noise: float = 4.0) -> Image.Image:
    """Draw a sampled scene: background, then objects far to near with shadows and occluders, then noise."""
    img = _draw_background(scene, rng)
    d = ImageDraw.Draw(img)
    shadow = _shade(scene.palette["road"], 0.55)
    for o in scene.objects:
        x0, y0, x1, y1 = o.fbox
        if o.zone != "pole":
            w = x1 - x0
            d.ellipse([x0 - 0.06 * w, o.ground_y - 0.05 * w, x1 + 0.06 * w, o.ground_y + 0.04 * w], fill=shadow)
        _DRAW[o.category](_Pen(d, o.fbox, o.flip), o, rng)
        if o.occluder == "post":
            u = float(rng.uniform(0.15, 0.75))
            half = max(1.0, 0.1 * o.ppm)
            x = x0 + u * (x1 - x0)
            d.rectangle([x - half, y0 - 0.4 * (y1 - y0) - 2.0 * o.ppm, x + half, y1 + 0.05 * (y1 - y0)], fill=(96, 98, 102))
        elif o.occluder == "bush":
            c = _jitter((52, 96, 44), rng, 16)
            side = 0.0 if rng.random() < 0.5 else 0.55
            pen = _Pen(d, o.fbox)
            pen.ell(side - 0.1, 0.45, side + 0.55, 1.1, c)
            pen.ell(side, 0.3, side + 0.4, 0.8, _shade(c, 1.12))
    gain = float(rng.uniform(0.88, 1.12))  # exposure: a lookup table is far cheaper than float maths
    img = img.point([min(255, int(i * gain + 0.5)) for i in range(256)] * 3)
    if noise <= 0:
        return img
    a = min(127, max(1, int(round(noise * math.sqrt(3)))))  # uniform noise on [-a, a] has std a / sqrt(3)
    n = rng.integers(0, 2 * a + 1, size=(scene.height, scene.width, 3), dtype=np.uint8)
    return ImageChops.add(img, Image.fromarray(n), offset=-a)  # img + n - a, clipped to 0-255 in C


# ----------------------------------------------------------------------------------------------
# Texts
# ----------------------------------------------------------------------------------------------

_NOUNS = {
    "car": ("car", "cars"), "truck": ("truck", "trucks"), "bus": ("bus", "buses"),
    "pedestrian": ("pedestrian", "pedestrians"), "cyclist": ("cyclist", "cyclists"),
    "traffic_light": ("traffic light", "traffic lights"), "traffic_sign": ("traffic sign", "traffic signs"),
    "warning_sign": ("road work warning sign", "road work warning signs"),
    "traffic_cone": ("traffic cone", "traffic cones"), "barrier": ("barrier", "barriers"),
    "bollard": ("bollard", "bollards"), "debris": ("patch of debris", "patches of debris"),
    "dog": ("dog", "dogs"), "cat": ("cat", "cats"), "tire": ("tire", "tires"),
    "stroller": ("baby stroller", "baby strollers"), "concrete_block": ("concrete block", "concrete blocks"),
    "garbage_bag": ("garbage bag", "garbage bags"), "stone": ("large stone", "large stones"),
    "dustbin": ("dustbin", "dustbins"), "carton": ("carton", "cartons"),
}
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}

# Explanations by category and situation ("ego": in the ego lane, "road": elsewhere on the road,
# "side": beside the road). {it} {is} {s} {them} {its} agree with one or several objects.
# Wording rule: no explanation may name another CODA-LM category (the keyword judge would count it).
_STATIC_OBSTACLE = {
    "ego": "{it} lie{s} in the ego lane and could damage the ego car, so the ego car should slow down and steer around {them}",
    "road": "{it} lie{s} on the road, so the ego car should avoid {them} and expect other traffic to swerve",
    "side": "{it} lie{s} beside the road outside the ego lane, so the ego car only needs to stay alert",
}
_EXPLAIN: dict[str, dict[str, str]] = {
    "car": {
        "ego": "{it} {is} directly ahead in the ego lane, so the ego car must keep a safe following distance and be ready to brake",
        "road": "{it} {is} in a neighbouring lane and may move into the ego lane, so the ego car should keep watching {them}",
        "side": "{it} {is} stopped at the roadside and may pull out, so the ego car should pass with care",
    },
    "truck": {
        "ego": "{it} {is} large and hide{s} the road ahead of the ego lane, so the ego car should keep a longer following distance",
        "road": "{it} {is} large and slow in a neighbouring lane, so the ego car should avoid driving in {its} blind spot",
    },
    "bus": {
        "ego": "{it} may stop often to let passengers on and off, so the ego car should keep a safe distance and be ready to brake",
        "road": "{it} may pull into the ego lane or stop suddenly, so the ego car should keep watching {them}",
    },
    "pedestrian": {
        "ego": "{it} {is} walking on the road in front of the ego car, so the ego car must slow down and yield",
        "road": "{it} {is} walking on the road, so the ego car must slow down and yield",
        "side": "{it} may step onto the road at any moment, so the ego car should watch {them} and be ready to stop",
    },
    "cyclist": {
        "any": "{it} ride{s} close to the traffic and may swerve, so the ego car should slow down and leave enough lateral space",
    },
    "traffic_sign": {"any": "{it} regulate{s} the traffic here, so the ego car must follow {its} instruction"},
    "warning_sign": {"any": "{it} warn{s} of road works or a hazard ahead, so the ego car should slow down and drive carefully"},
    "traffic_cone": {
        "ego": "{it} close{s} part of the ego lane, so the ego car should slow down and change lanes to go around",
        "road": "{it} mark{s} a closed or hazardous area on the road, so the ego car should slow down and keep away",
        "side": "{it} mark{s} a work zone at the road edge, so the ego car should keep some lateral distance",
    },
    "barrier": {
        "ego": "{it} close{s} off the ego lane, so the ego car must slow down and change lanes",
        "road": "{it} close{s} off part of the road, so the ego car must not drive through there",
        "side": "{it} narrow{s} the drivable area at the road edge, so the ego car should keep clear",
    },
    "bollard": {
        "ego": "{it} stand{s} in the ego lane and could damage the ego car, so the ego car must steer around {them}",
        "road": "{it} stand{s} in the drivable area, so the ego car must steer around {them}",
        "side": "{it} limit{s} the drivable space at the road edge, so the ego car should keep clear",
    },
    "dog": {
        "ego": "{it} {is} on the road in front of the ego car and may move unpredictably, so the ego car should slow down and be ready to stop",
        "road": "{it} {is} on the road and may move unpredictably, so the ego car should slow down and be ready to stop",
        "side": "{it} may run onto the road unexpectedly, so the ego car should slow down and watch {them}",
    },
    "stroller": {
        "road": "{it} may carry a baby and {is} on the road, so the ego car must slow down and be ready to stop",
        "side": "{it} may carry a baby and could roll onto the road, so the ego car should slow down and stay alert",
    },
    "concrete_block": {
        "ego": "{it} {is} heavy and stand{s} in the ego lane, so the ego car must slow down and change lanes",
        "road": "{it} {is} heavy and narrow{s} the road, so the ego car should keep away from {them}",
        "side": "{it} stand{s} at the road edge outside the ego lane, so the ego car should keep some lateral distance",
    },
    "dustbin": {
        "road": "{it} stand{s} on the road, so the ego car should steer around {them}",
        "side": "{it} stand{s} at the roadside and may hide someone about to step out, so the ego car should stay alert",
    },
}
for _c in ("debris", "tire", "garbage_bag", "stone", "carton"):
    _EXPLAIN[_c] = _STATIC_OBSTACLE
_EXPLAIN["cat"] = _EXPLAIN["dog"]
_LIGHT_EXPLAIN = {
    "red": "{it} show{s} red, so the ego car must stop and wait",
    "yellow": "{it} show{s} yellow, so the ego car should prepare to stop",
    "green": "{it} show{s} green, so the ego car may proceed with care",
}
_PRONOUNS = ({"it": "it", "is": "is", "s": "s", "them": "it", "its": "its"}, {"it": "they", "is": "are", "s": "", "them": "them", "its": "their"})


def _lane_of(scene: Scene, o: WorldObject) -> int:
    """Lane of a point on the road relative to the ego lane (0 = ego, -1 = next to the left...)."""
    lane = int(round(o.xw / scene.lane_width))
    return min(max(lane, -scene.ego_lane), scene.lanes - 1 - scene.ego_lane)


def _situation(scene: Scene, o: WorldObject) -> str:
    if o.zone in ("sidewalk", "pole") or not (scene.left_edge < o.xw < scene.right_edge):
        return "side"
    if o.zone == "edge":
        return "side"
    return "ego" if _lane_of(scene, o) == 0 else "road"


def _place(scene: Scene, o: WorldObject) -> str:
    side = "left" if o.xw < 0 else "right"
    if o.zone == "sidewalk":
        return f"on the {side} sidewalk"
    if o.zone == "pole":
        return f"on the {side} side of the road"
    sit = _situation(scene, o)
    if sit == "side":
        side = "left" if o.xw < (scene.left_edge + scene.right_edge) / 2 else "right"
        return f"at the {side} edge of the road"
    lane = _lane_of(scene, o)
    if lane == 0:
        return "in the ego lane"
    side = "left" if lane < 0 else "right"
    return f"in the lane to the {side}" if abs(lane) == 1 else f"in the second lane to the {side}"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _distance(zs: Sequence[float]) -> str:
    lo, hi = int(round(min(zs))), int(round(max(zs)))
    return f"about {lo} meters ahead" if lo == hi else f"about {lo} to {hi} meters ahead"


def _describe(scene: Scene, objs: Sequence[WorldObject]) -> str:
    o = objs[0]
    n = len(objs)
    noun = _NOUNS[o.category][0 if n == 1 else 1]
    if o.category == "traffic_sign":
        noun = {"speed limit": "speed limit sign", "no entry": "no entry sign", "stop": "stop sign", "direction": "blue direction sign"}[o.variant]
    colour = o.colour
    if o.category in ("pedestrian", "cyclist"):
        head = f"{noun} in a {colour} shirt"
        colour = ""
    elif o.category == "barrier" and o.colour and o.colour != "concrete":
        head = f"{colour} striped {noun}"
    else:
        head = f"{colour} {noun}" if colour else noun
    if o.category == "traffic_light":
        head = f"{noun} showing {o.variant}"
    lead = _NUMBERS.get(n, str(n)) if n > 1 else _article(head)
    text = f"{lead} {head} {_place(scene, o)} {_distance([x.z for x in objs])}"
    if any(x.occluded >= 0.25 for x in objs):
        text += ", partly hidden"
    return text


def _explain(scene: Scene, objs: Sequence[WorldObject]) -> str:
    o = objs[0]
    if o.category == "traffic_light":
        tmpl = _LIGHT_EXPLAIN[o.variant]
    else:
        table = _EXPLAIN[o.category]
        sit = _situation(scene, o)
        tmpl = table.get("any") or table.get(sit) or table.get("road") or next(iter(table.values()))
    return tmpl.format(**_PRONOUNS[len(objs) > 1])


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _items(scene: Scene) -> list[list[WorldObject]]:
    """Named objects, nearest first, with a row of alike objects in one place merged into one item."""
    items: dict[tuple, list[WorldObject]] = {}
    for o in sorted((o for o in scene.objects if o.named), key=lambda o: o.z):
        key: tuple = (o.category, o.colour, o.variant, _place(scene, o))
        if o.category not in _GROUPABLE:
            key += (id(o),)
        items.setdefault(key, []).append(o)
    return list(items.values())


def _suggestion(scene: Scene) -> str:
    """Rule-based driving suggestion: the two or three most urgent rules that apply."""
    rules: list[str] = []
    objs = sorted(scene.objects, key=lambda o: o.z)
    named = [o for o in objs if o.named]
    for o in named:
        if o.category == "traffic_light" and o.variant in ("red", "yellow") and o.z < 45:
            rules.append("Stop before the red traffic light and wait for green." if o.variant == "red" else "Prepare to stop, the traffic light ahead is turning yellow to red.")
            break
    static = {"traffic_cone", "barrier", "bollard", "debris", "tire", "concrete_block", "stone", "carton", "garbage_bag", "warning_sign", "dustbin"}
    blocking = [o for o in objs if o.category in static and _situation(scene, o) == "ego" and o.z < 35]
    if blocking:
        o = blocking[0]
        left_free = scene.ego_lane > 0
        right_free = scene.ego_lane < scene.lanes - 1
        what = f"the {_NOUNS[o.category][0]}" if o.named else "an object"
        if left_free or right_free:
            side = "left" if left_free else "right"
            rules.append(f"Slow down and change to the {side} lane to pass {what} in the ego lane ahead.")
        else:
            rules.append(f"Slow down and stop before {what} blocking the ego lane.")
    for o in named:
        if o.category in ("dog", "cat", "pedestrian", "stroller") and _situation(scene, o) in ("ego", "road") and o.z < 35:
            noun = _NOUNS[o.category][0]
            rules.append(f"Slow down and yield to the {noun} on the road." if o.category == "pedestrian" else f"Slow down, the {noun} on the road may move unpredictably.")
            break
    for o in named:
        if o.category in ("car", "truck", "bus") and _situation(scene, o) == "ego" and o.z < 40:
            rules.append(f"Keep a safe distance from the {_NOUNS[o.category][0]} ahead.")
            break
    side_work = [o for o in named if o.category in ("traffic_cone", "barrier", "bollard", "concrete_block") and _situation(scene, o) != "ego"]
    if side_work and len(rules) < 3:
        rules.append(f"Keep away from the {_NOUNS[side_work[0].category][1]} near the ego lane.")
    cyclists = [o for o in named if o.category == "cyclist" and o.z < 30]
    if cyclists and len(rules) < 3:
        rules.append("Leave enough lateral space when passing the cyclist.")
    if not rules:
        rules.append("Keep the current lane at a steady speed and stay alert.")
    return " ".join(rules[:3])


def scene_annotation(scene: Scene, max_regions: int = 4, min_region_px: int = 8) -> CodaAnnotation:
    """The CODA-LM annotation of a scene; only objects with ``named`` set appear in its texts."""
    general: dict[str, list[PerceptionItem]] = {k: [] for k in GENERAL_KEYS}
    sentences = []
    for objs in _items(scene):
        desc, expl = _describe(scene, objs), _explain(scene, objs)
        general[GENERAL_KEY_OF_GROUP[category_group(objs[0].category)]].append(PerceptionItem(_cap(desc), _cap(expl) + "."))
        sentences.append(f"{_cap(desc)}; {expl}.")
    if sentences:
        summary = f"The ego car drives on a road with {_NUMBERS.get(scene.lanes, scene.lanes)} lanes. " + " ".join(sentences)
    else:
        summary = "The road ahead is clear and nothing in the scene strongly influences the ego car."
    rare = set(RARE_CATEGORIES)
    candidates = [o for o in scene.objects if o.named and o.box[2] >= min_region_px and o.box[3] >= min_region_px]
    candidates.sort(key=lambda o: (o.category not in rare, o.z))
    regions = [
        RegionItem(f"This object is {_describe(scene, [o])}. {_cap(_explain(scene, [o]))}.", o.box, o.category)
        for o in candidates[:max_regions]
    ]
    return CodaAnnotation(general, summary, regions, _suggestion(scene))


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def _image_bytes(img: Image.Image, cfg: WorldConfig) -> bytes:
    buf = io.BytesIO()
    if cfg.image_format == "jpg":
        img.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def draw_scene(cfg: WorldConfig, rng: np.random.Generator, name_prob: float) -> tuple[Scene, Image.Image]:
    """One image of the world from ``rng``, as a split draws it: the scene, which rare objects its text names, the picture."""
    scene = sample_scene(cfg, rng)
    named_rows: dict[int, bool] = {}
    for o in scene.objects:  # a row of cones is named (or not) as a whole
        if o.category in RARE_CATEGORIES:
            o.named = named_rows.setdefault(o.group_id, bool(rng.random() < name_prob))
    return scene, render_scene(scene, rng, cfg.noise)


def _make_image(job: tuple[WorldConfig, str, int, str]) -> tuple[dict, list[str], list[str]]:
    """Render, annotate and save image ``index`` of ``split`` under ``root``; returns what the main process writes."""
    cfg, split, index, root = job
    rng = np.random.default_rng([cfg.seed, SPLITS[split], index])
    scene, img = draw_scene(cfg, rng, cfg.pretrain_name_prob if split == "pretrain" else cfg.name_prob)
    ann = scene_annotation(scene, cfg.max_regions, max(1, int(round(cfg.min_region_frac * cfg.width))))
    image_id = f"{index:06d}"
    ext = cfg.image_format
    atomic_write_bytes(Path(root, split, "images", f"{image_id}.{ext}"), _image_bytes(img, cfg))
    if cfg.boxed_images:
        for k, region in enumerate(ann.region_perception, 1):
            path = Path(root, split, "images_w_boxes", f"{image_id}_object_{k}.{ext}")
            atomic_write_bytes(path, _image_bytes(draw_region_box(img, region.box), cfg))
    return annotation_to_json(ann), [o.category for o in scene.objects], [o.category for o in scene.objects if o.named]


def _jobs(cfg: WorldConfig, split: str, root: str) -> Iterator[tuple[WorldConfig, str, int, str]]:
    for i in range(cfg.count(split)):
        yield cfg, split, i, root


def generate_world(
    cfg: WorldConfig, out_dir: str | os.PathLike, overwrite: bool = False, workers: int = 1, progress: bool = True
) -> WorldSummary:
    """Generate every split of ``cfg`` into ``out_dir`` (CODA-LM layout, see the module docstring).

    The files are written in a temporary sibling folder, which replaces ``out_dir`` only once
    everything succeeded; an existing non-empty ``out_dir`` is an error unless ``overwrite``.
    ``workers`` > 1 renders in that many processes; the bytes do not depend on it.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out, ".tmp")
    summary = WorldSummary(out, {}, {}, {}, {})
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for split in SPLITS:
            n = cfg.count(split)
            ann_dir = tmp / "CODA-LM" / split
            (ann_dir / "vqa_anno").mkdir(parents=True)
            (tmp / split / "images").mkdir(parents=True)
            if cfg.boxed_images:
                (tmp / split / "images_w_boxes").mkdir(parents=True)
            jobs = _jobs(cfg, split, str(tmp))
            results = pool.map(_make_image, jobs, chunksize=8) if pool else map(_make_image, jobs)
            records: dict[str, list[TaskRecord]] = {t: [] for t in TASKS}
            drawn: dict[str, int] = {}
            named: dict[str, int] = {}
            bar = tqdm(results, total=n, desc=f"world {split}", unit="img", disable=not progress or n == 0, file=sys.stderr)
            for index, (ann_json, cats, named_cats) in enumerate(bar):
                image_id = f"{index:06d}"
                image = f"{split}/images/{image_id}.{cfg.image_format}"
                ann = annotation_from_json(ann_json, f"{split}_{image_id}.json", (cfg.width, cfg.height))
                save_annotation(ann_dir / f"{split}_{image_id}.json", ann, (cfg.width, cfg.height))
                gp, sg, rp = records["general_perception"], records["driving_suggestion"], records["region_perception"]
                gp.append(TaskRecord(len(gp), image, TASK_QUESTIONS["general_perception"], ann.general_summary))
                sg.append(TaskRecord(len(sg), image, TASK_QUESTIONS["driving_suggestion"], ann.driving_suggestion))
                for k, region in enumerate(ann.region_perception, 1):
                    boxed = f"{split}/images_w_boxes/{image_id}_object_{k}.{cfg.image_format}" if cfg.boxed_images else image
                    rp.append(TaskRecord(len(rp), boxed, TASK_QUESTIONS["region_perception"], region.description_and_explanation))
                for c in cats:
                    drawn[c] = drawn.get(c, 0) + 1
                for c in named_cats:
                    named[c] = named.get(c, 0) + 1
            for task in TASKS:
                write_tasks(ann_dir / "vqa_anno" / f"{task}.jsonl", records[task])
            summary.images[split] = n
            summary.questions[split] = {t: len(r) for t, r in records.items()}
            summary.objects[split] = dict(sorted(drawn.items()))
            summary.named[split] = dict(sorted(named.items()))
        meta = {
            "format": "rtrt-world",
            "version": 1,
            "config": asdict(cfg),
            "images": summary.images,
            "questions": summary.questions,
            "objects": summary.objects,
            "named": summary.named,
        }
        atomic_write_text(tmp / "world.json", json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, out)  # an existing folder is swapped out in one atomic step, then deleted
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    try:
        if "x" in text.lower():
            w, h = text.lower().split("x")
            return int(w), int(h)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = WorldConfig()
    p = argparse.ArgumentParser(prog="rtrt world", description="Generate the procedural rare-object driving world in CODA-LM format.")
    p.add_argument("--out", required=True, help="dataset root to create (CODA-LM layout)")
    p.add_argument("--seed", type=int, default=d.seed, help="master seed; same seed, same bytes")
    for split in SPLITS:
        p.add_argument(f"--{split}", type=int, default=d.count(split), help=f"number of {split} images (default {d.count(split)})")
    p.add_argument("--size", type=_size, default=(d.width, d.height), help="image size, N or WxH (default 448)")
    p.add_argument("--rare-prob", type=float, default=d.rare_prob, help="probability that an image holds rare objects (default 0.9, the demo's world)")
    p.add_argument("--max-rare", type=int, default=d.max_rare, help="most rare placements per image")
    p.add_argument("--max-common", type=int, default=d.max_common, help="most common objects per image (default 9, the demo's world)")
    p.add_argument("--pretrain-name-prob", type=float, default=d.pretrain_name_prob, help="chance a rare object is named in pretrain texts")
    p.add_argument("--name-prob", type=float, default=d.name_prob, help="chance a rare object is named in plugin/val/test texts")
    p.add_argument("--occlusion-prob", type=float, default=d.occlusion_prob, help="chance an object gets a foreground occluder")
    p.add_argument("--noise", type=float, default=d.noise, help="pixel noise standard deviation (0-255 scale)")
    p.add_argument("--max-regions", type=int, default=d.max_regions, help="most region questions per image")
    p.add_argument("--format", choices=FORMATS, default=d.image_format, help="image file format")
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality, help="JPEG quality (1-95)")
    p.add_argument("--no-boxed-images", action="store_true", help="do not write images_w_boxes/ (region questions then point at the plain image)")
    p.add_argument("--rare-scale", type=float, default=d.rare_scale,
                   help="rare objects' physical size times this (default 1: as common objects, true to life)")
    p.add_argument("--object-scale", type=float, default=d.object_scale,
                   help="every object's physical size times this, rare and common alike (default 1.6, the demo's world; 1: true to life)")
    p.add_argument("--max-distance", type=float, default=d.max_distance,
                   help="metres: place no object farther ahead than this (default 30, the demo's world; 0: each kind's own range, rare kinds up to 30 m, common ones up to 70 m)")
    p.add_argument("--cyclist-width", type=float, default=d.cyclist_width,
                   help="metres before --object-scale: a cyclist's box width (default 1.7, the demo's world: side-on, round wheels; 0.7: the bicycle foreshortened, narrow as a pedestrian)")
    p.add_argument("--rare", nargs="+", choices=RARE_CATEGORIES, default=list(d.rare_categories), help="rare categories that may appear")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (output does not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> WorldConfig:
    return WorldConfig(
        seed=args.seed, pretrain=args.pretrain, plugin=args.plugin, val=args.val, test=args.test,
        width=args.size[0], height=args.size[1], rare_prob=args.rare_prob, max_rare=args.max_rare,
        max_common=args.max_common, pretrain_name_prob=args.pretrain_name_prob, name_prob=args.name_prob,
        occlusion_prob=args.occlusion_prob, noise=args.noise, max_regions=args.max_regions,
        image_format=args.format, jpeg_quality=args.jpeg_quality, boxed_images=not args.no_boxed_images,
        rare_categories=tuple(args.rare), rare_scale=args.rare_scale, object_scale=args.object_scale,
        max_distance=args.max_distance, cyclist_width=args.cyclist_width,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        summary = generate_world(cfg, args.out, overwrite=args.overwrite, workers=max(1, args.workers), progress=not args.quiet)
    except (ValueError, FileExistsError) as e:
        print(f"rtrt world: error: {e}", file=sys.stderr)
        return 2
    total = sum(summary.images.values())
    print(f"wrote {total} images to {summary.out_dir}: " + ", ".join(f"{s} {n}" for s, n in summary.images.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
