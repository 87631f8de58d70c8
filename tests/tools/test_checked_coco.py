"""Bad data set files give errors or warnings that name the file."""
import copy
import json
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from ddetr_plugin.datasets import (AnnotationError, CheckedCocoDataset,
                                   ImageLoadError, ImageSizeWarning,
                                   InvalidAnnotationWarning,
                                   MissingAnnotationWarning)

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


def _as_array(boxes):
    """Boxes as an (n, 4) array, whether mmdet gives a box type or not.

    Run alone, the pipeline here gives a plain array; in the whole suite it
    gave a box type, which ``np.asarray`` cannot read.
    """
    return boxes.numpy() if hasattr(boxes, 'numpy') else np.asarray(boxes)


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


@pytest.mark.parametrize('filter_empty_gt', [False, True])
@pytest.mark.parametrize('drop', ['empty list', 'no key'])
def test_training_file_without_annotations_is_an_error(coco_files, drop,
                                                       filter_empty_gt):
    root, coco = coco_files
    coco = copy.deepcopy(coco)
    if drop == 'empty list':
        coco['annotations'] = []
    else:
        del coco['annotations']
    # With filter_empty_gt=True, MMEngine used to fail with a bare
    # "ValueError: need at least one array to concatenate".
    with pytest.raises(
            AnnotationError, match=r'train\.json.* holds no annotations'):
        _dataset(root, coco, filter_cfg=dict(filter_empty_gt=filter_empty_gt))


@pytest.mark.parametrize('filter_empty_gt', [False, True])
def test_test_split_without_annotations_warns_and_predicts(
        coco_files, filter_empty_gt):
    root, coco = coco_files
    coco = dict(coco, annotations=[])
    with pytest.warns(MissingAnnotationWarning) as record:
        dataset = _dataset(
            root,
            coco,
            test_mode=True,
            filter_cfg=dict(filter_empty_gt=filter_empty_gt))
    message = str(record[0].message)
    assert 'train.json' in message and 'nothing to evaluate' in message
    assert len(dataset) == 2 and dataset.num_instances == 0
    assert dataset[1]['img'].shape == (40, 60, 3)


def test_no_usable_box_for_training_is_an_error(coco_files):
    root, coco = coco_files
    coco = copy.deepcopy(coco)
    for annotation in coco['annotations']:
        annotation['bbox'] = [500, 500, 10, 10]  # outside every image
    with pytest.warns(InvalidAnnotationWarning), pytest.raises(
            AnnotationError,
            match=r'train\.json.* 3 annotation\(s\) but '
            'none gives a usable box'):
        _dataset(root, coco)


def test_file_without_images_is_an_error(coco_files):
    root, coco = coco_files
    coco = dict(coco, images=[], annotations=[])
    with pytest.raises(AnnotationError, match=r'train\.json.* no images'):
        _dataset(root, coco, test_mode=True)


def test_filter_leaving_no_image_names_the_file(coco_files):
    root, coco = coco_files
    # Both images are 60 x 40: min_size=50 drops them.
    with pytest.raises(
            AnnotationError,
            match=r"filter_cfg=.*'min_size': 50.* none of the 2 images of "
            r'.*train\.json'):
        _dataset(
            root, coco, filter_cfg=dict(filter_empty_gt=True, min_size=50))


def test_filter_empty_gt_keeps_annotated_images(coco_files):
    root, coco = coco_files
    coco = copy.deepcopy(coco)
    coco['annotations'] = coco['annotations'][:2]  # image b has none now
    dataset = _dataset(root, coco, filter_cfg=dict(filter_empty_gt=True))
    assert len(dataset) == 1
    assert dataset.get_data_info(0)['img_id'] == 1


def test_real_image_size_differing_from_the_record(coco_files):
    root, coco = coco_files
    coco = copy.deepcopy(coco)
    # The file says 640 x 480; the image is really 60 x 40. Annotation 1
    # lies in the real image, annotation 2 only in the recorded one.
    coco['images'][0].update(width=640, height=480)
    coco['annotations'][1]['bbox'] = [100, 100, 200, 100]
    dataset = _dataset(
        root,
        coco,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(type='Resize', scale=(120, 80), keep_ratio=True),
        ])
    with pytest.warns(ImageSizeWarning) as record:
        sample = dataset[0]
    message = str(record[0].message)
    assert "a.png' is 60 x 40" in message and 'records 640 x 480' in message
    assert 'train.json' in message
    assert '1 of them skipped' in message and '[100, 100, 300, 200]' in message
    # Only the box inside the real image is left, scaled by the Resize,
    # and none of zero size.
    np.testing.assert_allclose(
        _as_array(sample['gt_bboxes']), [[10., 10., 30., 30.]])
    assert sample['width'] == 60 and sample['height'] == 40


def test_image_of_the_recorded_size_gives_no_size_warning(coco_files):
    import warnings
    root, coco = coco_files
    dataset = _dataset(root, coco)
    with warnings.catch_warnings():
        warnings.simplefilter('error', ImageSizeWarning)
        assert dataset[0]['img'].shape == (40, 60, 3)


def test_image_recorded_smaller_keeps_its_boxes_inside_the_real_image(
        coco_files):
    root, coco = coco_files
    coco = copy.deepcopy(coco)
    # A non-square 128 x 96 image recorded as 64 x 48: annotation 1 lies
    # inside the real image only, annotation 2 outside both.
    Image.fromarray(np.zeros((96, 128, 3),
                             np.uint8)).save(root / 'images' / 'a.png')
    coco['images'][0].update(width=64, height=48)
    coco['annotations'][0]['bbox'] = [80, 60, 30, 20]
    coco['annotations'][1]['bbox'] = [100, 20, 40, 10]
    pipeline = [
        dict(type='LoadImageFromFile'),
        dict(type='LoadAnnotations', with_bbox=True)
    ]
    with pytest.warns(InvalidAnnotationWarning) as record:
        dataset = _dataset(root, coco, pipeline=pipeline)
    skipped = [str(warning.message) for warning in record]
    assert len(skipped) == 1
    # The warning names the size the box was really checked against.
    assert 'annotation id 2' in skipped[0]
    assert 'outside the 128 x 96 image' in skipped[0]
    assert 'annotation id 1' not in skipped[0]
    with pytest.warns(ImageSizeWarning) as record:
        sample = dataset[0]
    message = str(record[0].message)
    assert "a.png' is 128 x 96" in message and 'records 64 x 48' in message
    assert 'skipped' not in message
    np.testing.assert_allclose(
        _as_array(sample['gt_bboxes']), [[80., 60., 110., 80.]])


def test_dataset_warnings_point_at_the_annotation_file(coco_files):
    root, coco = coco_files
    coco = copy.deepcopy(coco)
    coco['annotations'][0]['bbox'] = [55, 5, 30, 10]
    with pytest.warns(InvalidAnnotationWarning) as record:
        _dataset(root, coco)
    # Not mmdet's base_det_dataset.py, which calls load_data_list.
    assert record[0].filename == osp.join(
        str(root), 'annotations', 'train.json')
