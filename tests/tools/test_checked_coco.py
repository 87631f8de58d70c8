"""Bad data set files give errors or warnings that name the file."""
import copy
import json
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from ddetr_plugin.datasets import (AnnotationError, CheckedCocoDataset,
                                   ImageLoadError, InvalidAnnotationWarning)

CLASSES = ('block', 'disc')  # in the order of the file's ids


def _write_json(path, content):
    with open(path, 'w') as file:
        json.dump(content, file)


@pytest.fixture
def coco_files(tmp_path):
    """A valid two-image, two-class data set; returns its parts."""
    (tmp_path / 'images').mkdir()
    (tmp_path / 'annotations').mkdir()
    for name in ('a.png', 'b.png'):
        Image.fromarray(np.zeros((40, 60, 3),
                                 np.uint8)).save(tmp_path / 'images' / name)
    coco = dict(
        images=[
            dict(id=1, file_name='a.png', width=60, height=40),
            dict(id=2, file_name='b.png', width=60, height=40)
        ],
        annotations=[
            dict(
                id=1,
                image_id=1,
                category_id=7,
                bbox=[5, 5, 10, 10],
                area=100,
                iscrowd=0),
            dict(
                id=2,
                image_id=1,
                category_id=3,
                bbox=[20, 10, 30, 20],
                area=600,
                iscrowd=0),
            dict(
                id=3,
                image_id=2,
                category_id=3,
                bbox=[0, 0, 60, 40],
                area=2400,
                iscrowd=0)
        ],
        categories=[dict(id=3, name='block'),
                    dict(id=7, name='disc')])
    return tmp_path, coco


def _dataset(root, coco, **overrides):
    _write_json(osp.join(root, 'annotations', 'train.json'), coco)
    args = dict(
        data_root=str(root),
        ann_file='annotations/train.json',
        data_prefix=dict(img='images/'),
        metainfo=dict(classes=CLASSES),
        pipeline=[dict(type='LoadImageFromFile')],
        filter_cfg=dict(filter_empty_gt=False))
    args.update(overrides)
    return CheckedCocoDataset(**args)


def test_valid_file_gives_the_same_data_as_mmdet(coco_files):
    from mmdet.datasets import CocoDataset
    root, coco = coco_files
    checked = _dataset(root, coco)
    plain = CocoDataset(
        data_root=str(root),
        ann_file='annotations/train.json',
        data_prefix=dict(img='images/'),
        metainfo=dict(classes=CLASSES),
        pipeline=[],
        filter_cfg=dict(filter_empty_gt=False))
    assert len(checked) == len(plain) == 2
    for index in range(2):
        assert checked.get_data_info(index) == plain.get_data_info(index)


def test_class_order_differing_from_the_file_is_warned(coco_files):
    root, coco = coco_files
    with pytest.warns(UserWarning, match=r"orders them \['block', 'disc'\]"):
        dataset = _dataset(
            root, coco, metainfo=dict(classes=('disc', 'block')))
    # Labels follow the file's category order, as MMDetection's do.
    labels = [
        instance['bbox_label']
        for instance in dataset.get_data_info(0)['instances']
    ]
    assert labels == [1, 0]


def test_missing_data_root(coco_files):
    root, coco = coco_files
    _write_json(osp.join(root, 'annotations', 'train.json'), coco)
    missing = str(root / 'nowhere')
    with pytest.raises(FileNotFoundError, match='data_root .*nowhere'):
        CheckedCocoDataset(
            data_root=missing,
            ann_file='annotations/train.json',
            metainfo=dict(classes=CLASSES),
            pipeline=[])


def test_missing_annotation_file(coco_files):
    root, coco = coco_files
    with pytest.raises(FileNotFoundError, match='annotation file .*val.json'):
        _dataset(root, coco, ann_file='annotations/val.json')


def test_missing_image_folder(coco_files):
    root, coco = coco_files
    with pytest.raises(FileNotFoundError, match='image folder .*pictures'):
        _dataset(root, coco, data_prefix=dict(img='pictures/'))


def test_malformed_json_names_the_file(coco_files):
    root, coco = coco_files
    _dataset(root, coco)  # writes the file
    path = osp.join(root, 'annotations', 'broken.json')
    with open(path, 'w') as file:
        file.write('{"images": [')
    with pytest.raises(AnnotationError, match='broken.json'):
        CheckedCocoDataset(
            data_root=str(root),
            ann_file='annotations/broken.json',
            data_prefix=dict(img='images/'),
            metainfo=dict(classes=CLASSES),
            pipeline=[])


@pytest.mark.parametrize('bbox, reason',
                         [([5, 5, -4, 10], 'non-positive size'),
                          ([5, 5, 10, 0], 'non-positive'),
                          ([55, 5, 30, 10], 'outside'),
                          ([-20, 5, 10, 10], 'outside'),
                          ([5, 5, 0.5, 10], 'below one pixel')])
def test_unusable_box_is_skipped_with_a_warning(coco_files, bbox, reason):
    root, coco = coco_files
    coco = copy.deepcopy(coco)
    coco['annotations'][0]['bbox'] = bbox
    with pytest.warns(InvalidAnnotationWarning) as record:
        dataset = _dataset(root, coco)
    message = str(record[0].message)
    assert 'train.json' in message and 'annotation id 1' in message
    assert 'a.png' in message and reason in message
    boxes = [
        instance['bbox'] for instance in dataset.get_data_info(0)['instances']
    ]
    assert boxes == [[20, 10, 50, 30]]


def test_malformed_box_is_an_error(coco_files):
    root, coco = coco_files
    coco = copy.deepcopy(coco)
    coco['annotations'][1]['bbox'] = [1, 2, 3]
    with pytest.raises(AnnotationError, match=r'annotation id 2 .*\[1, 2, 3'):
        _dataset(root, coco)


def test_unknown_category_id_is_an_error(coco_files):
    root, coco = coco_files
    coco = copy.deepcopy(coco)
    coco['annotations'][2]['category_id'] = 42
    with pytest.raises(
            AnnotationError,
            match=r'annotation id 3 in .*train.json.*category_id 42.*'
            r'\[3, 7\]'):
        _dataset(root, coco)


def test_class_missing_from_the_file_is_an_error(coco_files):
    root, coco = coco_files
    with pytest.raises(
            AnnotationError, match=r"\['cube'\] .* not categories .*"):
        _dataset(root, coco, metainfo=dict(classes=('block', 'cube')))


def test_unknown_image_id_is_an_error(coco_files):
    root, coco = coco_files
    coco = copy.deepcopy(coco)
    coco['annotations'][0]['image_id'] = 9
    with pytest.raises(AnnotationError, match='image_id 9'):
        _dataset(root, coco)


@pytest.mark.parametrize('damage', ['missing', 'corrupt'])
def test_unreadable_image_names_the_file(coco_files, damage):
    root, coco = coco_files
    dataset = _dataset(root, coco, test_mode=True)
    path = root / 'images' / 'b.png'
    if damage == 'missing':
        path.unlink()
    else:
        path.write_bytes(b'not a png at all')
    assert dataset[0]['img'].shape == (40, 60, 3)
    with pytest.raises(ImageLoadError, match=r'b\.png'):
        dataset[1]
