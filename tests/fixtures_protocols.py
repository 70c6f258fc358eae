"""Generate tiny DeepFashion2 and IJB-C folders in their official on-disk formats (for tests).

Every generated item / face is painted a colour that encodes its identity, so a trivial "embedding"
(the mean colour of a crop, centred on grey) retrieves perfectly: the expected metrics then follow from
the fixture's own ground truth, not from the code under test.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GREY = 128
# 26 well separated colour directions around grey: every non-zero vector in {-1, 0, 1}^3.
PALETTE = [
    tuple(GREY + 100 * c for c in offset) for offset in itertools.product((-1, 0, 1), repeat=3) if any(offset)
]


# --------------------------------------------------------------------------------------- DeepFashion2
@dataclass
class FixtureItem:
    number: int
    style: int
    category_id: int
    bbox: tuple[int, int, int, int]
    colour: tuple[int, int, int]


@dataclass
class FixtureImage:
    image_id: int
    source: str
    pair_id: int
    items: list[FixtureItem] = field(default_factory=list)


@dataclass
class DeepFashion2Fixture:
    root: Path
    split: str
    images: list[FixtureImage]

    def annotation_path(self, image_id: int) -> Path:
        return self.root / self.split / "annos" / f"{image_id:06d}.json"

    def items(self) -> list[tuple[FixtureImage, FixtureItem]]:
        return [(image, item) for image in self.images for item in image.items]


DF2_SIZE = 64
_SLOTS = ((4, 6, 30, 58), (34, 6, 60, 58))


def make_deepfashion2_fixture(
    tmp_path: Path, split: str = "validation", n_pairs: int = 8
) -> DeepFashion2Fixture:
    """``n_pairs`` products, each with two shop images (3 shop items) and one consumer image, plus one
    consumer image of a product that has no shop image (a query without a positive).

    Even pairs have a second style (2) on both sides; odd pairs have a style-0 shop distractor; the
    consumer image of pair 3 has a style-0 item; even consumer images number their items 1 and 3.
    With 8 pairs: 25 images, 24 shop items, 13 queries (user items with style > 0), 1 without positive.
    """
    if not 1 <= n_pairs <= 9:
        raise ValueError("the 26-colour palette covers at most 9 products")
    colours: dict[tuple[int, int] | str, tuple[int, int, int]] = {}
    palette = iter(PALETTE)

    def colour(pair_id: int, style: int, distractor_name: str) -> tuple[int, int, int]:
        key: tuple[int, int] | str = (pair_id, style) if style > 0 else distractor_name
        if key not in colours:
            colours[key] = next(palette)
        return colours[key]

    images: list[FixtureImage] = []
    next_id = itertools.count(1)
    for pair_id in range(1, n_pairs + 2):  # consumer images first (ids 1..n_pairs+1)
        category = pair_id % 13 + 1
        image = FixtureImage(next(next_id), "user", pair_id)
        image.items.append(FixtureItem(1, 1, category, _SLOTS[0], colour(pair_id, 1, "")))
        if pair_id % 2 == 0:
            image.items.append(FixtureItem(3, 2, 9, _SLOTS[1], colour(pair_id, 2, "")))
        elif pair_id == 3:
            image.items.append(FixtureItem(2, 0, 9, _SLOTS[1], colour(pair_id, 0, f"user{pair_id}")))
        images.append(image)
    for pair_id in range(1, n_pairs + 1):
        category = pair_id % 13 + 1
        shop_a = FixtureImage(next(next_id), "shop", pair_id)
        shop_a.items.append(FixtureItem(1, 1, category, _SLOTS[0], colour(pair_id, 1, "")))
        second_style = 2 if pair_id % 2 == 0 else 0
        shop_a.items.append(
            FixtureItem(2, second_style, 9, _SLOTS[1], colour(pair_id, second_style, f"shop{pair_id}"))
        )
        shop_b = FixtureImage(next(next_id), "shop", pair_id)
        shop_b.items.append(FixtureItem(1, 1, category, (10, 4, 54, 60), colour(pair_id, 1, "")))
        images.extend([shop_a, shop_b])
    fixture = DeepFashion2Fixture(tmp_path / "deepfashion2", split, images)
    for index, image in enumerate(images):
        write_deepfashion2_image(fixture, image, image_level_keys_first=index % 2 == 0)
    return fixture


def write_deepfashion2_image(
    fixture: DeepFashion2Fixture, image: FixtureImage, image_level_keys_first: bool
) -> None:
    """One JPEG (items painted on grey) and its annotation JSON in the official format."""
    image_dir = fixture.root / fixture.split / "image"
    annos_dir = fixture.root / fixture.split / "annos"
    image_dir.mkdir(parents=True, exist_ok=True)
    annos_dir.mkdir(parents=True, exist_ok=True)
    canvas = Image.new("RGB", (DF2_SIZE, DF2_SIZE), (GREY, GREY, GREY))
    draw = ImageDraw.Draw(canvas)
    for item in image.items:
        x1, y1, x2, y2 = item.bbox
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=item.colour)
    canvas.save(image_dir / f"{image.image_id:06d}.jpg", quality=95)
    record: dict[str, object] = {}
    image_level = {"source": image.source, "pair_id": image.pair_id}
    if image_level_keys_first:
        record.update(image_level)
    for item in image.items:
        x1, y1, x2, y2 = item.bbox
        record[f"item{item.number}"] = {
            "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
            "scale": 2,
            "viewpoint": 2,
            "zoom_in": 1,
            "landmarks": [x1 + 2, y1 + 2, 2, x2 - 2, y1 + 2, 1],
            "style": item.style,
            "bounding_box": [x1, y1, x2, y2],
            "category_id": item.category_id,
            "occlusion": 1,
            "category_name": "fixture",
        }
    if not image_level_keys_first:
        record.update(image_level)
    (annos_dir / f"{image.image_id:06d}.json").write_text(json.dumps(record), encoding="utf-8")


# --------------------------------------------------------------------------------------------- IJB-C
IJBC_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
SUBJECT_COLOURS = [(228, 28, 28), (28, 228, 28), (28, 28, 228), (228, 228, 28)]
IJBC_CROP_SIZE = 96


@dataclass
class IJBCFixture:
    root: Path
    names: list[str]
    template_ids: np.ndarray
    media_ids: np.ndarray
    subjects: np.ndarray  # subject index per image (ground truth the meta files do not carry)
    landmarks: np.ndarray  # [N, 5, 2]
    faceness: np.ndarray
    pairs: np.ndarray  # [P, 2]
    labels: np.ndarray  # [P]

    @property
    def meta_dir(self) -> Path:
        return self.root / "meta"


def make_ijbc_fixture(tmp_path: Path, n_subjects: int = 4, seed: int = 0) -> IJBCFixture:
    """Each subject has 2 templates; each template has a still (1 image) and a video (2 frames).

    Faces are the subject's colour with dark dots on the 5 landmarks, placed by a random similarity
    transform of the ArcFace template. Pairs: every cross-subject template pair (impostor) and the two
    templates of each subject (genuine).
    """
    rng = np.random.default_rng(seed)
    root = tmp_path / "IJBC"
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    names, tids, mids, subjects, landmarks, faceness = [], [], [], [], [], []
    template_of_subject: dict[int, list[int]] = {}
    next_tid, next_mid = 101, 5001
    for subject in range(n_subjects):
        for _ in range(2):
            tid = next_tid
            next_tid += 1
            template_of_subject.setdefault(subject, []).append(tid)
            for frames in (1, 2):
                mid = next_mid
                next_mid += 1
                for _ in range(frames):
                    name = f"{len(names) + 1}.jpg"
                    points = _random_face_points(rng)
                    _draw_face(
                        root / "loose_crop" / name, SUBJECT_COLOURS[subject % len(SUBJECT_COLOURS)], points
                    )
                    names.append(name)
                    tids.append(tid)
                    mids.append(mid)
                    subjects.append(subject)
                    landmarks.append(points)
                    faceness.append(round(float(rng.uniform(0.6, 1.0)), 3))
    pairs, labels = [], []
    all_templates = [(s, t) for s, ts in template_of_subject.items() for t in ts]
    for (s1, t1), (s2, t2) in itertools.combinations(all_templates, 2):
        pairs.append((t1, t2))
        labels.append(int(s1 == s2))
    fixture = IJBCFixture(
        root,
        names,
        np.array(tids),
        np.array(mids),
        np.array(subjects),
        np.array(landmarks),
        np.array(faceness),
        np.array(pairs),
        np.array(labels),
    )
    write_ijbc_meta(fixture)
    return fixture


def write_ijbc_meta(fixture: IJBCFixture) -> None:
    meta = fixture.meta_dir
    rows = zip(fixture.names, fixture.template_ids, fixture.media_ids, strict=True)
    (meta / "ijbc_face_tid_mid.txt").write_text("".join(f"{n} {t} {m}\n" for n, t, m in rows))
    lines = []
    for name, points, score in zip(fixture.names, fixture.landmarks, fixture.faceness, strict=True):
        coords = " ".join(f"{v:.3f}" for v in points.reshape(-1))
        lines.append(f"{name} {coords} {score}\n")
    (meta / "ijbc_name_5pts_score.txt").write_text("".join(lines))
    pair_rows = zip(fixture.pairs.tolist(), fixture.labels.tolist(), strict=True)
    (meta / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for (a, b), y in pair_rows))


def _random_face_points(rng: np.random.Generator) -> np.ndarray:
    """The ArcFace template under a random rotation / scale / shift, inside a 96x96 loose crop."""
    angle = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(0.6, 0.75)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centred = IJBC_TEMPLATE - IJBC_TEMPLATE.mean(axis=0)
    shift = np.array([IJBC_CROP_SIZE / 2, IJBC_CROP_SIZE / 2]) + rng.uniform(-4, 4, size=2)
    return (scale * centred @ rotation.T + shift).round(3)


def _draw_face(path: Path, colour: tuple[int, int, int], points: np.ndarray) -> None:
    canvas = Image.new("RGB", (IJBC_CROP_SIZE, IJBC_CROP_SIZE), colour)
    draw = ImageDraw.Draw(canvas)
    for x, y in points:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(0, 0, 0))
    canvas.save(path, quality=95)
