"""Captioned synthetic scenes in COCO caption format: the offline default dataset.

Each 64x64 scene holds one or two groups of coloured shapes (1-3 objects) on a plain background,
with five captions from varied templates that name colour, shape, size, position, count, the
spatial relation between two objects and the background. Scenes are simple enough for a tiny model
trained on a CPU for a few minutes to learn, and varied enough that a collapsed decoder ("a red
circle" for every image) is easy to see.

A few (colour, shape) combinations are held out: they never appear in train or val, only in the
"heldout" split, which measures compositional generalisation (has the model learnt "yellow" and
"triangle", or only the pairs it saw?).

Generation is deterministic: every image draws from its own RNG seeded by (seed, split, index), so
the same seed gives byte-identical JSON and PNGs. `shapes_meta.json`, written last and atomically,
marks a complete folder; a folder without it (an interrupted run) is regenerated.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

VERSION = 1  # bump when scenes or captions change, so existing folders are regenerated
META_FILE = "shapes_meta.json"
SPLITS = ("train", "val", "heldout")

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (120, 120, 120), "white": (250, 250, 250)}
MIN_CONTRAST = 100.0  # RGB distance between an object's colour and the background (rules out white on white)
# Radius as a fraction of the image side; scenes sit on a 3x3 grid whose cells are 1/3 of the side.
SIZES = {"small": 0.08, "large": 0.13}
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
JITTER = 0.025  # centre jitter (fraction of the side): adjacent large objects never touch
HELDOUT_COMBOS = (("yellow", "triangle"), ("purple", "square"), ("green", "circle"), ("blue", "star"))  # 4/42

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
COLUMNS = ("left", "", "right")
ROWS = ("top", "", "bottom")
CELLS = tuple((col, row) for row in range(3) for col in range(3))
# Scene layouts and how often they occur: at most two object groups, mostly one or two objects.
LAYOUTS = {"single": 0.40, "pair": 0.30, "count": 0.20, "count_single": 0.10}

_SUPERSAMPLE = 4
Combo = tuple[str, str]
Obj = dict[str, Any]


def _position_name(cell: tuple[int, int]) -> str:
    """"top left", "left", "middle", ... for a grid cell (col, row)."""
    return " ".join(word for word in (ROWS[cell[1]], COLUMNS[cell[0]]) if word) or "middle"


def _position_phrases(name: str) -> tuple[str, ...]:
    """Ways to say where an object is."""
    if name == "middle":
        return ("in the middle", "in the center", "in the middle of the picture")
    if " " in name:
        return (f"in the {name} corner", f"at the {name}", f"in the {name} of the picture")
    if name in ("left", "right"):
        return (f"on the {name}", f"on the {name} side", f"at the {name} of the picture")
    return (f"at the {name}", f"near the {name}", f"at the {name} of the picture")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _contrasts(colour: str, background: str) -> bool:
    return math.dist(COLOURS[colour], BACKGROUNDS[background]) >= MIN_CONTRAST


# --- scene sampling -----------------------------------------------------------------------------------


def _object(rng: random.Random, combo: Combo, size: str, cell: tuple[int, int]) -> Obj:
    col, row = cell
    return {
        "colour": combo[0],
        "shape": combo[1],
        "size": size,
        "position": _position_name(cell),
        "cell": [col, row],
        "x": round((col + 0.5) / 3 + rng.uniform(-JITTER, JITTER), 4),
        "y": round((row + 0.5) / 3 + rng.uniform(-JITTER, JITTER), 4),
        "radius": round(SIZES[size] * rng.uniform(0.92, 1.08), 4),
    }


def _sample_scene(rng: random.Random, allowed: list[Combo], required: list[Combo]) -> dict[str, Any]:
    """A background, a layout and its objects. `required`: one object must use one of these combos."""
    layout = rng.choices(list(LAYOUTS), weights=list(LAYOUTS.values()))[0]
    if required:
        first = rng.choice(required)
        background = rng.choice([bg for bg in BACKGROUNDS if _contrasts(first[0], bg)])
    else:
        background = rng.choice(list(BACKGROUNDS))
        first = rng.choice([combo for combo in allowed if _contrasts(combo[0], background)])
    others = [combo for combo in allowed + required if combo != first and _contrasts(combo[0], background)]
    sizes = list(SIZES)

    if layout == "single":
        objects = [_object(rng, first, rng.choice(sizes), rng.choice(CELLS))]
    elif layout == "pair":
        pair = [first, rng.choice(others)]
        rng.shuffle(pair)
        line = rng.randrange(3)  # the shared row (horizontal pair) or column (vertical pair)
        near, far = sorted(rng.sample(range(3), 2))
        horizontal = rng.random() < 0.5
        cells = [(near, line), (far, line)] if horizontal else [(line, near), (line, far)]
        objects = [_object(rng, combo, rng.choice(sizes), cell) for combo, cell in zip(pair, cells, strict=True)]
        layout = "pair_horizontal" if horizontal else "pair_vertical"
    elif layout == "count":
        size, cells = rng.choice(sizes), rng.sample(CELLS, rng.choice((2, 2, 3)))
        objects = [_object(rng, first, size, cell) for cell in cells]
    else:  # count_single: two identical objects and one other
        size, cells = rng.choice(sizes), rng.sample(CELLS, 3)
        objects = [_object(rng, first, size, cell) for cell in cells[:2]]
        objects.append(_object(rng, rng.choice(others), rng.choice(sizes), cells[2]))
    return {"layout": layout, "background": background, "objects": objects}


# --- captions -------------------------------------------------------------------------------------------


def _captions(rng: random.Random, scene: dict[str, Any], count: int = 5) -> list[str]:
    """`count` distinct captions from the templates of the scene's layout, synonyms drawn from `rng`."""
    objects, layout = scene["objects"], scene["layout"]
    background = scene["background"]
    on_bg = f"on a {background} background"
    with_bg = f"a {background} background with"

    def size(obj: Obj) -> str:
        return rng.choice(SIZE_WORDS[obj["size"]])

    def noun(obj: Obj, sized: bool = False, article: bool = True) -> str:
        words = ([size(obj)] if sized else []) + [obj["colour"], obj["shape"]]
        return " ".join(([_article(words[0])] if article else []) + words)

    def plural(obj: Obj, n: int, sized: bool = False) -> str:
        return " ".join([COUNT_WORDS[n]] + ([size(obj)] if sized else []) + [obj["colour"], PLURALS[obj["shape"]]])

    if layout == "single":
        obj = objects[0]
        where = _position_phrases(obj["position"])

        def place() -> str:
            return rng.choice(where)  # a fresh synonym per template

        templates = [
            f"{noun(obj)} {place()}",
            f"{noun(obj, sized=True)} {place()}",
            f"{noun(obj, sized=True)} {on_bg}",
            f"there is one {noun(obj, sized=True, article=False)} {place()}",
            f"one {noun(obj, article=False)} {place()} {on_bg}",
            f"{noun(obj)} {place()} {on_bg}",
            f"{with_bg} {noun(obj, sized=True)} {place()}",
            f"a single {noun(obj, sized=True, article=False)} {place()}",
            f"{noun(obj, sized=True)}",
        ]
    elif layout.startswith("pair"):
        first, second = objects  # first is left of / above second
        horizontal = layout == "pair_horizontal"
        relation, inverse = ("to the left of", "to the right of") if horizontal else ("above", "below")
        side_first, side_second = ("on the left", "on the right") if horizontal else ("at the top", "at the bottom")
        templates = [
            f"{noun(first)} {relation} {noun(second)}",
            f"{noun(second)} {inverse} {noun(first)}",
            f"{noun(first, sized=True)} {relation} {noun(second, sized=True)}",
            f"{noun(first)} {side_first} and {noun(second)} {side_second}",
            f"{noun(first)} and {noun(second)} {on_bg}",
            f"there is {noun(first)} {relation} {noun(second)}",
            f"{noun(second)} {inverse} {noun(first)} {on_bg}",
            f"{noun(first, sized=True)} and {noun(second, sized=True)}",
        ]
    elif layout == "count":
        obj, n = objects[0], len(objects)
        templates = [
            plural(obj, n),
            plural(obj, n, sized=True),
            f"there are {plural(obj, n)}",
            f"{plural(obj, n)} {on_bg}",
            f"{plural(obj, n, sized=True)} {on_bg}",
            f"a group of {plural(obj, n)}",
            f"{COUNT_WORDS[n]} identical {obj['colour']} {PLURALS[obj['shape']]}",
            f"there are {plural(obj, n, sized=True)} in the picture",
        ]
    else:  # count_single
        group, single = objects[0], objects[2]
        templates = [
            f"{plural(group, 2)} and {noun(single)}",
            f"{noun(single)} and {plural(group, 2)}",
            f"there are {plural(group, 2)} and {noun(single)}",
            f"{plural(group, 2, sized=True)} and {noun(single, sized=True)}",
            f"{plural(group, 2)} and one {noun(single, article=False)} {on_bg}",
            f"{plural(group, 2)} and {noun(single)} {on_bg}",
            f"{with_bg} {plural(group, 2)} and {noun(single)}",
        ]
    distinct = list(dict.fromkeys(templates))
    return rng.sample(distinct, count)


# --- drawing --------------------------------------------------------------------------------------------


def _polygon(cx: float, cy: float, radius: float, shape: str) -> list[tuple[float, float]]:
    """Outline of a polygonal shape centred on (cx, cy) whose extent is `radius`; its centre is filled."""
    if shape == "square":
        h = radius * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - radius), (cx + 0.75 * radius, cy), (cx, cy + radius), (cx - 0.75 * radius, cy)]
    if shape == "triangle":
        return [(cx, cy - radius), (cx + 0.95 * radius, cy + 0.75 * radius), (cx - 0.95 * radius, cy + 0.75 * radius)]
    if shape == "star":
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        return points
    if shape == "cross":
        a, t = radius, radius * 0.32
        return [
            (cx - t, cy - a), (cx + t, cy - a), (cx + t, cy - t), (cx + a, cy - t), (cx + a, cy + t), (cx + t, cy + t),
            (cx + t, cy + a), (cx - t, cy + a), (cx - t, cy + t), (cx - a, cy + t), (cx - a, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: dict[str, Any], image_size: int) -> Image.Image:
    """Draw a scene at 4x and downsample with Lanczos, for anti-aliased edges."""
    side = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(canvas)
    for obj in scene["objects"]:
        cx, cy, radius, fill = obj["x"] * side, obj["y"] * side, obj["radius"] * side, COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        else:
            draw.polygon(_polygon(cx, cy, radius, obj["shape"]), fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


# --- writing --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _split_combos(split: str) -> tuple[list[Combo], list[Combo]]:
    """(allowed, required) combos: train/val never see a held-out combo; every heldout scene has one."""
    heldout = list(HELDOUT_COMBOS)
    allowed = [(colour, shape) for colour in COLOURS for shape in SHAPES if (colour, shape) not in HELDOUT_COMBOS]
    return (allowed, heldout) if split == "heldout" else (allowed, [])


def _params(n_train: int, n_val: int, n_heldout: int, image_size: int, seed: int) -> dict[str, int]:
    return {"n_train": n_train, "n_val": n_val, "n_heldout": n_heldout, "image_size": image_size, "seed": seed}


def shapes_ready(root: str | os.PathLike, params: dict[str, int]) -> bool:
    """Whether `root` holds a complete generation with these parameters (keys as `generate_shapes`'s)."""
    root = Path(root)
    try:
        meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        meta.get("complete") is True
        and meta.get("version") == VERSION
        and meta.get("params") == _params(**params)
        and all((root / "annotations" / f"captions_{split}.json").is_file() for split in SPLITS)
    )


def generate_shapes(
    root: str | os.PathLike,
    n_train: int,
    n_val: int,
    n_heldout: int,
    image_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write root/images/*.png, root/annotations/captions_{train,val,heldout}.json and, last, the meta file.

    Returns the meta dict (parameters, vocabulary of the scenes, held-out combos, images per split).
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / META_FILE).unlink(missing_ok=True)  # from here on the folder counts as incomplete

    counts = {"train": n_train, "val": n_val, "heldout": n_heldout}
    image_id, caption_id = 0, 0
    with tqdm(total=sum(counts.values()), desc="generating shapes", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            allowed, required = _split_combos(split)
            images, annotations = [], []
            for index in range(counts[split]):
                rng = random.Random(f"blip-shapes:{seed}:{split}:{index}")
                scene = _sample_scene(rng, allowed, required)
                image_id += 1
                file_name = f"{split}_{index:06d}.png"
                buffer = io.BytesIO()
                render_scene(scene, image_size).save(buffer, format="PNG")
                _write_atomic(root / "images" / file_name, buffer.getvalue(), durable=False)
                size = {"width": image_size, "height": image_size}
                images.append({"id": image_id, "file_name": file_name, **size, **scene})
                for caption in _captions(rng, scene):
                    caption_id += 1
                    annotations.append({"id": caption_id, "image_id": image_id, "caption": caption})
                bar.update()
            info = {"description": "BLIP Lab synthetic shapes", "version": VERSION, "seed": seed, "split": split}
            document = {"info": info, "images": images, "annotations": annotations}
            _write_atomic(root / "annotations" / f"captions_{split}.json", _json_bytes(document))

    meta = {
        "version": VERSION,
        "params": _params(n_train, n_val, n_heldout, image_size, seed),
        "images": counts,
        "heldout_combos": [list(combo) for combo in HELDOUT_COMBOS],
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "backgrounds": list(BACKGROUNDS),
        "sizes": list(SIZES),
        "complete": True,
    }
    _write_atomic(root / META_FILE, _json_bytes(meta))
    return meta
