"""The toy data generator: deterministic, valid COCO, idempotent."""
import hashlib
import json
import os
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from testkit import load_script

generator = load_script('tools/misc/make_toy_dataset.py')


def _digest(folder):
    """Hash of every file under ``folder`` except the stamp."""
    digest = hashlib.sha256()
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = osp.join(root, name)
            digest.update(osp.relpath(path, folder).encode())
            with open(path, 'rb') as file:
                digest.update(file.read())
    return digest.hexdigest()


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('toy'))
    generator.main([out_dir, '--num-train', '60', '--num-val', '10'])
    return out_dir


def test_same_seed_same_files_other_seed_other_files(toy, tmp_path):
    same, other = str(tmp_path / 'same'), str(tmp_path / 'other')
    generator.main([same, '--num-train', '60', '--num-val', '10'])
    generator.main(
        [other, '--num-train', '60', '--num-val', '10', '--seed', '1'])
    assert _digest(same) == _digest(toy)
    assert _digest(other) != _digest(toy)


def test_second_run_writes_nothing(toy):
    annotation = osp.join(toy, 'annotations', 'instances_train.json')
    before = os.stat(annotation).st_mtime_ns
    assert generator.generate(toy, num_train=60, num_val=10) is False
    assert os.stat(annotation).st_mtime_ns == before


def test_changed_parameters_or_missing_file_regenerate(tmp_path):
    out_dir = str(tmp_path)
    assert generator.generate(out_dir, num_train=4, num_val=2)
    assert generator.generate(out_dir, num_train=5, num_val=2)
    os.remove(osp.join(out_dir, 'train', '000003.png'))
    assert generator.generate(out_dir, num_train=5, num_val=2)
    assert osp.isfile(osp.join(out_dir, 'train', '000003.png'))


def test_annotations_are_valid_coco(toy):
    from pycocotools.coco import COCO
    for split, count in (('train', 60), ('val', 10)):
        path = osp.join(toy, 'annotations', f'instances_{split}.json')
        coco = COCO(path)
        assert len(coco.imgs) == count
        assert sorted(coco.cats) == list(range(1, 11))
        assert len({cat['name'] for cat in coco.cats.values()}) == 10
        for annotation in coco.anns.values():
            image = coco.imgs[annotation['image_id']]
            x, y, width, height = annotation['bbox']
            assert width >= 1 and height >= 1
            assert x >= 0 and y >= 0
            assert x + width <= image['width']
            assert y + height <= image['height']
            assert annotation['area'] == width * height
            assert annotation['iscrowd'] == 0
            assert annotation['category_id'] in coco.cats
        for image in coco.imgs.values():
            assert osp.isfile(osp.join(toy, split, image['file_name']))


def test_boxes_are_tight_around_the_drawn_shapes(toy):
    with open(osp.join(toy, 'annotations', 'instances_train.json')) as file:
        coco = json.load(file)
    colours = {
        label + 1: np.array(colour)
        for label, (_, colour, _) in enumerate(generator.CLASSES)
    }
    files = {image['id']: image['file_name'] for image in coco['images']}
    for annotation in coco['annotations'][:40]:
        image = np.asarray(
            Image.open(osp.join(toy, 'train', files[annotation['image_id']])))
        x, y, width, height = annotation['bbox']
        inside = image[y:y + height, x:x + width]
        drawn = np.all(inside == colours[annotation['category_id']], axis=-1)
        # The shape touches all four sides of its box...
        assert drawn[0].any() and drawn[-1].any()
        assert drawn[:, 0].any() and drawn[:, -1].any()
        # ...and the area is the box's, as the data set has no masks.
        assert annotation['area'] == width * height


def test_data_has_empty_crowded_small_and_large_images(tmp_path):
    out_dir = str(tmp_path)
    generator.generate(out_dir, num_train=300, num_val=0)
    with open(osp.join(out_dir, 'annotations',
                       'instances_train.json')) as file:
        coco = json.load(file)
    per_image = np.bincount(
        [annotation['image_id'] for annotation in coco['annotations']],
        minlength=301)[1:]
    assert (per_image == 0).sum() >= 5
    assert per_image.max() >= 9
    # COCO's small, medium and large objects (box areas split at 32 x 32 and
    # 96 x 96) all occur.
    areas = np.array(
        [annotation['area'] for annotation in coco['annotations']])
    assert (areas < 32**2).sum() >= 10
    assert ((areas >= 32**2) & (areas < 96**2)).sum() >= 10
    assert (areas >= 96**2).sum() >= 10
    labels = {annotation['category_id'] for annotation in coco['annotations']}
    assert labels == set(range(1, 11))


def test_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        generator.parse_args(['out', '--num-train', '-1'])
    with pytest.raises(SystemExit):
        generator.parse_args(['out', '--image-size', '8'])
