"""Generate the toy COCO-format detection data set used by ``make demo``.

Each image is a plain dark canvas with a few filled shapes. A class is a
(shape, colour) pair and no two classes share a colour or a shape, so a
small randomly initialised CNN can tell all of them apart within minutes on
a CPU, while boxes still have to be regressed precisely for a good COCO mAP.

Object sides range from a twelfth of the image to nearly all of it (COCO's
small, medium and large objects all occur), boxes never overlap (an occluded
shape would make its box ambiguous), about one image in twenty is empty, one
in twelve holds a single large object and one in eight is crowded.

Layout written under ``OUT_DIR``::

    annotations/instances_train.json
    annotations/instances_val.json
    train/000000.png ...
    val/000000.png ...
    toy_dataset.json        parameters of the last complete generation

Every image is drawn from its own ``numpy`` generator seeded by
``(seed, split, index)``, so the output depends only on the arguments. When
``toy_dataset.json`` records the same arguments and every file is present,
the script returns at once without writing anything.

Example::

    python tools/misc/make_toy_dataset.py data/toy --num-train 1200
"""
import argparse
import json
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

# Bump when the drawing changes, so that old data is regenerated.
GENERATOR_VERSION = 2
STAMP_NAME = 'toy_dataset.json'

# (name, RGB colour, shape); colours are far apart in RGB and shapes differ,
# so colour alone already separates the classes.
CLASSES: Tuple[Tuple[str, Tuple[int, int, int], str], ...] = (
    ('red square', (230, 40, 40), 'square'),
    ('green circle', (40, 200, 60), 'circle'),
    ('blue triangle', (50, 90, 245), 'triangle'),
    ('yellow diamond', (240, 225, 40), 'diamond'),
    ('cyan cross', (40, 225, 235), 'cross'),
    ('magenta hexagon', (225, 50, 225), 'hexagon'),
    ('orange ring', (250, 140, 20), 'ring'),
    ('white frame', (245, 245, 245), 'frame'),
    ('purple star', (135, 60, 205), 'star'),
    ('brown trapezoid', (150, 95, 45), 'trapezoid'),
)
CLASS_NAMES = tuple(name for name, _, _ in CLASSES)
BACKGROUND_RANGE = (20, 60)  # grey level of the plain background


def _polygon(shape: str, width: int, height: int) -> List[Tuple[float, ...]]:
    """Vertices of a polygonal shape filling a ``width`` x ``height`` box."""
    right, bottom = width - 1, height - 1
    mid_x, mid_y = right / 2, bottom / 2
    if shape == 'triangle':
        return [(mid_x, 0), (right, bottom), (0, bottom)]
    if shape == 'diamond':
        return [(mid_x, 0), (right, mid_y), (mid_x, bottom), (0, mid_y)]
    if shape == 'hexagon':
        quarter = right / 4
        return [(quarter, 0), (right - quarter, 0), (right, mid_y),
                (right - quarter, bottom), (quarter, bottom), (0, mid_y)]
    if shape == 'trapezoid':
        inset = right / 4
        return [(inset, 0), (right - inset, 0), (right, bottom), (0, bottom)]
    if shape == 'star':
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        xs = np.cos(angles) * radii
        ys = -np.sin(angles) * radii
        # Stretch the star so that its outer points touch the whole box.
        xs = (xs - xs.min()) / (xs.max() - xs.min()) * right
        ys = (ys - ys.min()) / (ys.max() - ys.min()) * bottom
        return list(zip(xs.tolist(), ys.tolist()))
    raise ValueError(f'unknown polygonal shape {shape!r}')


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Rasterise one shape into a boolean mask of shape (height, width)."""
    canvas = Image.new('L', (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    box = (0, 0, width - 1, height - 1)
    thickness = max(2, min(width, height) // 5)
    if shape == 'square':
        draw.rectangle(box, fill=1)
    elif shape == 'circle':
        draw.ellipse(box, fill=1)
    elif shape == 'ring':
        draw.ellipse(box, fill=1)
        draw.ellipse((thickness, thickness, width - 1 - thickness,
                      height - 1 - thickness),
                     fill=0)
    elif shape == 'frame':
        draw.rectangle(box, fill=1)
        draw.rectangle((thickness, thickness, width - 1 - thickness,
                        height - 1 - thickness),
                       fill=0)
    elif shape == 'cross':
        bar_w, bar_h = max(2, width // 3), max(2, height // 3)
        left, top = (width - bar_w) // 2, (height - bar_h) // 2
        draw.rectangle((left, 0, left + bar_w - 1, height - 1), fill=1)
        draw.rectangle((0, top, width - 1, top + bar_h - 1), fill=1)
    else:
        draw.polygon(_polygon(shape, width, height), fill=1)
    return np.asarray(canvas, dtype=bool)


def _layout(rng: np.random.Generator) -> Tuple[int, str]:
    """How many objects an image holds, and of which sizes."""
    kind = rng.random()
    if kind < 0.05:
        return 0, 'empty'
    if kind < 0.13:
        return 1, 'large'
    if kind < 0.26:
        return int(rng.integers(9, 15)), 'crowded'
    return int(rng.integers(1, 7)), 'normal'


def _object_size(rng: np.random.Generator, image_size: int,
                 layout: str) -> Tuple[int, int]:
    """Box width and height: log-uniform side, mild aspect-ratio jitter."""
    smallest = max(6, image_size // 12)
    if layout == 'large':
        # Sides of 75-95% of the image: COCO's 'large' (over 96 x 96 pixels
        # at the default size).
        low, high = 0.75 * image_size, 0.95 * image_size
    elif layout == 'crowded':
        low, high = smallest, image_size // 3
    else:
        low, high = smallest, 0.8 * image_size
    side = np.exp(rng.uniform(np.log(low), np.log(high)))
    aspect = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    width = int(np.clip(round(side * np.sqrt(aspect)), smallest, image_size))
    height = int(np.clip(round(side / np.sqrt(aspect)), smallest, image_size))
    return width, height


def _overlaps(box: Sequence[int], boxes: List[Sequence[int]],
              margin: int) -> bool:
    """Whether ``box`` (x, y, w, h) comes within ``margin`` of any box."""
    x, y, w, h = box
    for other_x, other_y, other_w, other_h in boxes:
        if (x < other_x + other_w + margin and other_x < x + w + margin
                and y < other_y + other_h + margin
                and other_y < y + h + margin):
            return True
    return False


def draw_image(rng: np.random.Generator,
               image_size: int) -> Tuple[np.ndarray, List[Dict]]:
    """Draw one image and its objects.

    Args:
        rng (np.random.Generator): Generator of this image alone.
        image_size (int): Side of the square image in pixels.

    Returns:
        tuple: ``image`` (uint8 array of shape (image_size, image_size, 3),
        RGB) and a list of objects, each a dict with ``category_id``
        (1-based), ``bbox`` ([x, y, w, h], tight around the drawn pixels)
        and ``area`` (w * h: without masks, COCO's small / medium / large
        ranges then follow the box size).
    """
    grey = int(rng.integers(*BACKGROUND_RANGE))
    image = np.full((image_size, image_size, 3), grey, dtype=np.uint8)
    wanted, layout = _layout(rng)
    objects: List[Dict] = []
    placed: List[Sequence[int]] = []
    attempts = 0
    while len(objects) < wanted and attempts < 50 * max(wanted, 1):
        attempts += 1
        width, height = _object_size(rng, image_size, layout)
        x = int(rng.integers(0, image_size - width + 1))
        y = int(rng.integers(0, image_size - height + 1))
        if _overlaps((x, y, width, height), placed, margin=2):
            continue
        label = int(rng.integers(len(CLASSES)))
        _, colour, shape = CLASSES[label]
        mask = shape_mask(shape, width, height)
        rows, cols = np.nonzero(mask)
        image[y:y + height, x:x + width][mask] = colour
        placed.append((x, y, width, height))
        objects.append(
            dict(
                category_id=label + 1,
                bbox=[
                    x + int(cols.min()), y + int(rows.min()),
                    int(cols.max() - cols.min() + 1),
                    int(rows.max() - rows.min() + 1)
                ],
                area=int(cols.max() - cols.min() + 1) *
                int(rows.max() - rows.min() + 1)))
    return image, objects


def _stamp(args: argparse.Namespace) -> Dict:
    return dict(
        version=GENERATOR_VERSION,
        seed=args.seed,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.image_size)


def _split_files(out_dir: str, split: str, count: int) -> List[str]:
    return [osp.join(out_dir, 'annotations', f'instances_{split}.json')] + [
        osp.join(out_dir, split, f'{index:06d}.png') for index in range(count)
    ]


def is_up_to_date(out_dir: str, args: argparse.Namespace) -> bool:
    """Whether ``out_dir`` already holds this exact generation."""
    stamp_path = osp.join(out_dir, STAMP_NAME)
    if not osp.isfile(stamp_path):
        return False
    try:
        with open(stamp_path) as file:
            if json.load(file) != _stamp(args):
                return False
    except (OSError, ValueError):
        return False
    files = (
        _split_files(out_dir, 'train', args.num_train) +
        _split_files(out_dir, 'val', args.num_val))
    return all(osp.isfile(path) for path in files)


def _write_json(path: str, content: Dict) -> None:
    """Write JSON through a temporary file so a reader never sees half."""
    temporary = f'{path}.tmp{os.getpid()}'
    with open(temporary, 'w') as file:
        json.dump(content, file)
    os.replace(temporary, path)


def generate_split(out_dir: str, split: str, count: int, seed: int,
                   image_size: int) -> Dict:
    """Draw ``count`` images of one split and return its COCO dict."""
    split_index = {'train': 0, 'val': 1}[split]
    os.makedirs(osp.join(out_dir, split), exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, split_index, index])
        image, objects = draw_image(rng, image_size)
        file_name = f'{index:06d}.png'
        Image.fromarray(image).save(osp.join(out_dir, split, file_name))
        image_id = index + 1
        images.append(
            dict(
                id=image_id,
                file_name=file_name,
                width=image_size,
                height=image_size))
        for obj in objects:
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=image_id,
                    iscrowd=0,
                    **obj))
    return dict(
        info=dict(
            description=f'ddetr_plugin toy shapes, {split} split',
            version=str(GENERATOR_VERSION)),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[
            dict(id=label + 1, name=name, supercategory='shape')
            for label, name in enumerate(CLASS_NAMES)
        ])


def generate(out_dir: str,
             seed: int = 0,
             num_train: int = 1200,
             num_val: int = 100,
             image_size: int = 128) -> bool:
    """Generate the data set unless ``out_dir`` already holds it.

    Args:
        out_dir (str): Folder to write into.
        seed (int): Seed of the whole data set.
        num_train (int): Number of training images.
        num_val (int): Number of validation images.
        image_size (int): Side of the square images in pixels.

    Returns:
        bool: True if files were written, False if they were up to date.
    """
    args = argparse.Namespace(
        seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)
    if is_up_to_date(out_dir, args):
        return False
    stamp_path = osp.join(out_dir, STAMP_NAME)
    if osp.exists(stamp_path):
        # The stamp goes first so an interrupted run is never taken as done.
        os.remove(stamp_path)
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    for split, count in (('train', num_train), ('val', num_val)):
        coco = generate_split(out_dir, split, count, seed, image_size)
        _write_json(
            osp.join(out_dir, 'annotations', f'instances_{split}.json'), coco)
    _write_json(stamp_path, _stamp(args))
    return True


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Generate the toy COCO-format shapes data set')
    parser.add_argument('out_dir', help='folder to write the data set into')
    parser.add_argument(
        '--seed', type=int, default=0, help='seed of the whole data set')
    parser.add_argument(
        '--num-train', type=int, default=1200, help='training images')
    parser.add_argument(
        '--num-val', type=int, default=100, help='validation images')
    parser.add_argument(
        '--image-size',
        type=int,
        default=128,
        help='side of the square images in pixels')
    args = parser.parse_args(argv)
    if args.num_train < 0 or args.num_val < 0:
        parser.error('--num-train and --num-val must be >= 0, got '
                     f'{args.num_train} and {args.num_val}')
    if args.image_size < 32:
        parser.error(f'--image-size must be >= 32, got {args.image_size}')
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    written = generate(args.out_dir, args.seed, args.num_train, args.num_val,
                       args.image_size)
    if written:
        print(f'wrote {args.num_train} training and {args.num_val} '
              f'validation images to {args.out_dir}')
    else:
        print(f'{args.out_dir} is up to date, nothing to do')
    return 0


if __name__ == '__main__':
    sys.exit(main())
