"""Small procedurally drawn datasets for the demo and tests: a Pick-a-Pic-schema parquet of
preference pairs and an InstructPix2Pix-layout parquet of edit triplets (MLLM finetuning).

Each pair: a scene (shape, colour, size, background) described by the caption; the WINNING image
draws exactly that scene; the LOSING image gets one attribute wrong (the colour, the shape, the
size or the background). So "what should change" is visible and learnable even for tiny random
encoders. One tie row and one row with corrupt JPEG bytes exercise the filters.

The schema is Pick-a-Pic v2's, column for column and dtype for dtype, so the demo
runs the real reader.
"""

from __future__ import annotations

import io
import random
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# Column order and dtypes of yuvalkirstain/pickapic_v2.
PICKAPIC_SCHEMA = pa.schema([
    ("are_different", pa.bool_()),
    ("best_image_uid", pa.string()),
    ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")),
    ("has_label", pa.bool_()),
    ("image_0_uid", pa.string()),
    ("image_0_url", pa.string()),
    ("image_1_uid", pa.string()),
    ("image_1_url", pa.string()),
    ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()),
    ("label_0", pa.float64()),
    ("label_1", pa.float64()),
    ("model_0", pa.string()),
    ("model_1", pa.string()),
    ("ranking_id", pa.int64()),
    ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64()),
    ("__index_level_0__", pa.int64()),
])

COLOURS = {
    "red": (220, 30, 30), "green": (40, 170, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.3, "large": 0.62}
ATTRIBUTES = ("colour", "shape", "size", "background")
CORRUPT_JPEG = b"\xff\xd8\xff\xe0 this is not a complete jpeg"


def draw_scene(scene: dict, image_size: int, rng: random.Random) -> Image.Image:
    """Render a scene; small random jitter in position and size keeps images distinct."""
    s = image_size
    im = Image.new("RGB", (s, s), COLOURS[scene["background"]])
    d = ImageDraw.Draw(im)
    half = SIZES[scene["size"]] * s / 2 * rng.uniform(0.9, 1.1)
    cx, cy = s / 2 + rng.uniform(-0.12, 0.12) * s, s / 2 + rng.uniform(-0.12, 0.12) * s
    fill = COLOURS[scene["colour"]]
    box = (cx - half, cy - half, cx + half, cy + half)
    if scene["shape"] == "circle":
        d.ellipse(box, fill=fill)
    elif scene["shape"] == "square":
        d.rectangle(box, fill=fill)
    elif scene["shape"] == "triangle":
        d.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        d.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)
    return im


def caption_of(scene: dict) -> str:
    return f"a {scene['size']} {scene['colour']} {scene['shape']} on a {scene['background']} background"


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _random_scene(rng: random.Random) -> dict:
    colour, background = rng.sample(sorted(COLOURS), 2)
    return {"shape": rng.choice(SHAPES), "colour": colour, "size": rng.choice(sorted(SIZES)), "background": background}


def _corrupt(scene: dict, rng: random.Random) -> tuple[dict, str]:
    """The scene with exactly one attribute changed (never to a colour equal to its neighbour)."""
    attribute = rng.choice(ATTRIBUTES)
    wrong = dict(scene)
    if attribute == "shape":
        wrong["shape"] = rng.choice([s for s in SHAPES if s != scene["shape"]])
    elif attribute == "size":
        wrong["size"] = "small" if scene["size"] == "large" else "large"
    elif attribute == "colour":
        wrong["colour"] = rng.choice([c for c in sorted(COLOURS) if c not in (scene["colour"], scene["background"])])
    else:
        others = [c for c in sorted(COLOURS) if c not in (scene["colour"], scene["background"])]
        wrong["background"] = rng.choice(others)
    return wrong, attribute


def _uid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def write_pickapic_rows(path: str | Path, rows: Iterable[dict[str, Any]], row_group_size: int = 64) -> Path:
    """Write rows (dicts with any subset of the schema's columns; the rest null) as a parquet file."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {f.name: [r.get(f.name) for r in rows] for f in PICKAPIC_SCHEMA}
    table = pa.Table.from_pydict(columns, schema=PICKAPIC_SCHEMA)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def make_row(index: int, caption: str, jpg_0: bytes | None, jpg_1: bytes | None, label_0: float,
             rng: random.Random) -> dict[str, Any]:
    """One row with Pick-a-Pic's columns filled in plausibly."""
    uid0, uid1 = _uid(rng), _uid(rng)
    best = uid0 if label_0 == 1.0 else uid1 if label_0 == 0.0 else ""
    return {
        "are_different": True, "best_image_uid": best, "caption": caption,
        "created_at": datetime(2023, 6, 1) + timedelta(seconds=37 * index), "has_label": True,
        "image_0_uid": uid0, "image_0_url": f"https://example.invalid/{uid0}.png",
        "image_1_uid": uid1, "image_1_url": f"https://example.invalid/{uid1}.png",
        "jpg_0": jpg_0, "jpg_1": jpg_1, "label_0": float(label_0), "label_1": float(1.0 - label_0),
        "model_0": "tiny-shapes-v1", "model_1": "tiny-shapes-v1", "ranking_id": 1_000_000 + index,
        "user_id": 100 + rng.randrange(50), "num_example_per_prompt": 1, "__index_level_0__": index,
    }


def write_demo_parquet(path: str | Path, num_pairs: int, seed: int = 0, image_size: int = 64) -> dict[str, Any]:
    """Write ``num_pairs`` valid pairs + 1 tie + 1 corrupt-image row; returns a summary dict."""
    if num_pairs < 1:
        raise ValueError("num_pairs must be >= 1")
    rng = random.Random(seed)
    rows, changed = [], {a: 0 for a in ATTRIBUTES}
    tie_at, corrupt_at = min(3, num_pairs), min(7, num_pairs + 1)
    total = num_pairs + 2
    for index in range(total):
        scene = _random_scene(rng)
        caption = caption_of(scene)
        if index == tie_at:  # both images fine, users could not decide
            rows.append(make_row(index, caption, _jpeg(draw_scene(scene, image_size, rng)),
                                 _jpeg(draw_scene(_corrupt(scene, rng)[0], image_size, rng)), 0.5, rng))
            continue
        winner = _jpeg(draw_scene(scene, image_size, rng))
        wrong, attribute = _corrupt(scene, rng)
        loser = _jpeg(draw_scene(wrong, image_size, rng))
        label_0 = float(rng.random() < 0.5)  # winner is jpg_0 when label_0 == 1
        if index == corrupt_at:
            loser = CORRUPT_JPEG
        else:
            changed[attribute] += 1
        jpg_0, jpg_1 = (winner, loser) if label_0 == 1.0 else (loser, winner)
        rows.append(make_row(index, caption, jpg_0, jpg_1, label_0, rng))
    path = write_pickapic_rows(path, rows)
    return {
        "path": str(path),
        "rows": total,
        "pairs": num_pairs,
        "ties": 1,
        "corrupt_images": 1,
        "image_size": image_size,
        "seed": seed,
        "changed_attribute_counts": changed,
        "expected_kept_by_reader": num_pairs + 1,  # the corrupt row is found when decoding
        "expected_written": num_pairs,
    }


# -- edit triplets (InstructPix2Pix layout) for the MLLM finetuning stage ---------------------------
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature
IP2P_SCHEMA = pa.schema([
    ("original_prompt", pa.string()),
    ("original_image", IMAGE_STRUCT),
    ("edit_prompt", pa.string()),
    ("edited_prompt", pa.string()),
    ("edited_image", IMAGE_STRUCT),
])


def edit_instruction(wrong: dict, scene: dict, attribute: str) -> str:
    """The instruction that turns the drawn (wrong) scene into the prompted one: "make the square red"."""
    if attribute == "colour":
        return f"make the {wrong['shape']} {scene['colour']}"
    if attribute == "shape":
        return f"turn the {wrong['shape']} into a {scene['shape']}"
    if attribute == "size":
        return f"make the {wrong['shape']} {scene['size']}"
    return f"change the background to {scene['background']}"


def write_ip2p_rows(path: str | Path, rows: Iterable[dict[str, Any]], row_group_size: int = 32) -> Path:
    """Write rows (dicts with the InstructPix2Pix columns; images as ``{"bytes", "path"}``) as parquet."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pydict({f.name: [r.get(f.name) for r in rows] for f in IP2P_SCHEMA}, schema=IP2P_SCHEMA)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_edit_triplets_parquet(path: str | Path, num_triplets: int, seed: int = 0, image_size: int = 64,
                                row_group_size: int = 32, bad_rows: bool = True) -> dict[str, Any]:
    """``num_triplets`` edit triplets in the InstructPix2Pix layout: the ORIGINAL image draws a scene
    with one attribute wrong, the EDITED prompt describes the right scene, the instruction says what
    to change ("make the square red"). With ``bad_rows``, one row with corrupt image bytes and one
    with an empty instruction are added (the reader must count and skip them)."""
    rng = random.Random(seed)
    rows, changed = [], {a: 0 for a in ATTRIBUTES}
    for index in range(num_triplets):
        scene = _random_scene(rng)
        wrong, attribute = _corrupt(scene, rng)
        changed[attribute] += 1
        rows.append({
            "original_prompt": caption_of(wrong),
            "original_image": {"bytes": _jpeg(draw_scene(wrong, image_size, rng)), "path": f"{index:06d}_0.jpg"},
            "edit_prompt": edit_instruction(wrong, scene, attribute),
            "edited_prompt": caption_of(scene),
            "edited_image": {"bytes": _jpeg(draw_scene(scene, image_size, rng)), "path": f"{index:06d}_1.jpg"},
        })
    if bad_rows:
        scene = _random_scene(rng)
        wrong, attribute = _corrupt(scene, rng)
        corrupt = {"original_prompt": caption_of(wrong), "original_image": {"bytes": CORRUPT_JPEG, "path": "bad.jpg"},
                   "edit_prompt": edit_instruction(wrong, scene, attribute), "edited_prompt": caption_of(scene),
                   "edited_image": {"bytes": _jpeg(draw_scene(scene, image_size, rng)), "path": "bad_1.jpg"}}
        empty = {**rows[0], "edit_prompt": "  ", "original_image": rows[0]["original_image"]}
        rows.insert(min(5, len(rows)), corrupt)
        rows.insert(min(11, len(rows)), empty)
    write_ip2p_rows(path, rows, row_group_size=row_group_size)
    return {"path": str(path), "rows": len(rows), "triplets": num_triplets, "corrupt_images": int(bad_rows),
            "empty_instructions": int(bad_rows), "changed_attribute_counts": changed, "seed": seed}
