"""A COCO detection data set that checks its files instead of trusting them.

MMDetection's ``CocoDataset`` reads whatever the annotation file says and
quietly drops what it cannot use: a box of negative size, a box outside its
image, an annotation whose category is not in the file, a class name in the
config that the file does not know (which silently shifts every label after
it). :class:`CheckedCocoDataset` behaves the same on a clean file and
otherwise:

* raises ``FileNotFoundError`` naming a missing data root, annotation file or
  image folder before anything else happens;
* raises :class:`AnnotationError` naming the file for malformed JSON,
  malformed boxes, annotations of unknown category ids or images, and class
  names the file does not define;
* raises :class:`AnnotationError` naming the file when a training split has
  no images, no annotations at all or no usable box, or when ``filter_cfg``
  leaves no image (MMEngine would fail later with a bare ``ValueError: need
  at least one array to concatenate``); a test split (``test_mode=True``)
  without annotations only warns, since it can still be run for
  predictions;
* warns with :class:`InvalidAnnotationWarning` naming the file and the
  annotations for boxes it skips (empty, negative size, outside the image);
* warns with :class:`ImageSizeWarning` naming the image and both sizes when
  an image's real size differs from the one the file records, and checks
  its boxes against the real size (skipping those outside the real image);
* raises :class:`ImageLoadError` naming the image file when an image cannot
  be read or transformed.
"""
import math
import os.path as osp
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from mmdet.datasets import CocoDataset
from mmdet.datasets.api_wrappers import COCO
from mmengine.fileio import get_local_path
from PIL import Image

from ..registry import DATASETS

# A box may stick out of its image by this many pixels before it is skipped:
# COCO's own annotations exceed the border by rounding errors.
BORDER_TOLERANCE = 1.0
# The EXIF tag of an image's orientation.
EXIF_ORIENTATION = 0x0112
# How many skipped boxes a warning lists before it only counts them.
MAX_LISTED = 5


class AnnotationError(ValueError):
    """An annotation file is malformed or contradicts the configuration."""


class ImageLoadError(RuntimeError):
    """An image of the data set cannot be read or transformed."""


class InvalidAnnotationWarning(UserWarning):
    """Annotations were skipped because their boxes cannot be used."""


class ImageSizeWarning(UserWarning):
    """An image's real size differs from the size its annotation records."""


class MissingAnnotationWarning(UserWarning):
    """A test split has no annotations: nothing can be evaluated."""


def _is_remote(path: Optional[str]) -> bool:
    return bool(path) and '://' in str(path)


def _size_problem(bbox: Sequence[float]) -> Optional[str]:
    """Why a well-formed [x, y, w, h] box is too small to use, or None."""
    _, _, box_width, box_height = bbox
    if box_width < 1 or box_height < 1:
        return (f'size {box_width} x {box_height} is below one pixel'
                if box_width > 0 and box_height > 0 else
                f'non-positive size {box_width} x {box_height}')
    return None


def _outside_problem(bbox: Sequence[float], width: float,
                     height: float) -> Optional[str]:
    """Why a well-formed [x, y, w, h] box does not fit a width x height
    image, or None."""
    x, y, box_width, box_height = bbox
    if (x < -BORDER_TOLERANCE or y < -BORDER_TOLERANCE
            or x + box_width > width + BORDER_TOLERANCE
            or y + box_height > height + BORDER_TOLERANCE):
        return f'it lies outside the {width} x {height} image'
    return None


def _box_problem(bbox: Sequence[float], width: float,
                 height: float) -> Optional[str]:
    """Why a well-formed [x, y, w, h] box cannot be used, or None."""
    return _size_problem(bbox) or _outside_problem(bbox, width, height)


@DATASETS.register_module()
class CheckedCocoDataset(CocoDataset):
    """``CocoDataset`` that reports bad files instead of skipping silently.

    Takes exactly the arguments of MMDetection's ``CocoDataset`` and yields
    the same samples for a valid annotation file.
    """

    def full_init(self) -> None:
        """Check that the files exist, then load the annotations."""
        if not self._fully_initialized:
            self._check_paths()
        super().full_init()

    def _check_paths(self) -> None:
        if self.backend_args or _is_remote(self.ann_file):
            return  # only local files can be checked cheaply
        if self.data_root and not osp.isdir(self.data_root):
            raise FileNotFoundError(
                f'data_root {self.data_root!r} of {type(self).__name__} is '
                f'not a folder (resolved to {osp.abspath(self.data_root)!r})')
        if not osp.isfile(self.ann_file):
            raise FileNotFoundError(
                f'annotation file {self.ann_file!r} of '
                f'{type(self).__name__} does not exist (resolved to '
                f'{osp.abspath(self.ann_file)!r})')
        image_folder = self.data_prefix.get('img', '')
        if image_folder and not osp.isdir(image_folder):
            raise FileNotFoundError(
                f'image folder {image_folder!r} (data_prefix.img) of '
                f'{type(self).__name__} is not a folder (resolved to '
                f'{osp.abspath(image_folder)!r})')

    def _warn(self, message: str, category: type) -> None:
        """Warn with the annotation file as the warning's location.

        Python would otherwise show the line of mmdet's data set code that
        called the plugin; line 0 keeps it from printing the file's first
        line (often the whole JSON).
        """
        warnings.warn_explicit(message, category, str(self.ann_file), 0)

    def _read_annotation_file(self) -> COCO:
        with get_local_path(
                self.ann_file, backend_args=self.backend_args) as local_path:
            try:
                return self.COCOAPI(local_path)
            except (ValueError, KeyError, TypeError) as error:
                raise AnnotationError(
                    f'{self.ann_file!r} is not a valid COCO annotation file '
                    f'({type(error).__name__}: {error})') from error

    def _check_categories(self, coco: COCO) -> None:
        """Every configured class and every annotation's category must be
        defined by the file."""
        names_in_file = [category['name'] for category in coco.cats.values()]
        missing = [
            name for name in self.metainfo['classes']
            if name not in names_in_file
        ]
        if missing:
            raise AnnotationError(
                f'classes {missing} of the configuration are not categories '
                f'of {self.ann_file!r}, which defines {names_in_file}')
        for annotation in coco.anns.values():
            if annotation.get('category_id') not in coco.cats:
                raise AnnotationError(
                    f'annotation id {annotation.get("id")} in '
                    f'{self.ann_file!r} has category_id '
                    f'{annotation.get("category_id")!r}, which is not among '
                    f'the file\'s category ids {sorted(coco.cats)}')
            if annotation.get('image_id') not in coco.imgs:
                raise AnnotationError(
                    f'annotation id {annotation.get("id")} in '
                    f'{self.ann_file!r} refers to image_id '
                    f'{annotation.get("image_id")!r}, which is not among the '
                    'file\'s images')

    def _usable(self, annotation: Dict, image: Dict,
                skipped: List[str]) -> bool:
        """Whether an annotation's box can be used; records why not."""
        bbox = annotation.get('bbox')
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(value, (int, float)) for value in bbox)
                or not all(math.isfinite(value) for value in bbox)):
            raise AnnotationError(
                f'annotation id {annotation.get("id")} in {self.ann_file!r} '
                f'has bbox {bbox!r}; expected four finite numbers [x, y, '
                'width, height]')
        problem = _size_problem(bbox) or self._outside_real_image(bbox, image)
        if problem is None and annotation.get('area', 1) <= 0:
            problem = f'area {annotation["area"]} is not positive'
        if problem is not None:
            skipped.append(f'annotation id {annotation.get("id")} '
                           f'(image {image["file_name"]!r}, bbox {bbox}): '
                           f'{problem}')
        return problem is None

    def _outside_real_image(self, bbox: Sequence[float],
                            image: Dict) -> Optional[str]:
        """Why a box lies outside its image, or None.

        The recorded size decides for the boxes inside it. A box outside it
        is checked against the real image, whose size is read from the
        file's header: an image recorded smaller than it is keeps its valid
        boxes, and the warning names the size the box was checked against.
        """
        recorded = (image['width'], image['height'])
        problem = _outside_problem(bbox, *recorded)
        if problem is None:
            return None
        if image['img_id'] not in self._real_sizes:
            self._real_sizes[image['img_id']] = self._real_image_size(image)
        real = self._real_sizes[image['img_id']]
        if real is None or tuple(real) == recorded:
            return problem
        return _outside_problem(bbox, *real)

    def _real_image_size(self, image: Dict) -> Optional[Tuple[int, int]]:
        """(width, height) of an image as the pipeline will load it, read
        from the file's header; None when the file cannot be read here
        (remote storage, missing or damaged file: the pipeline names it)."""
        path = osp.join(self.data_prefix.get('img', ''), image['file_name'])
        if self.backend_args or _is_remote(path) or not osp.isfile(path):
            return None
        try:
            with Image.open(path) as picture:
                width, height = picture.size
                # The loaders turn images by their EXIF orientation;
                # orientations 5 to 8 swap width and height.
                if picture.getexif().get(EXIF_ORIENTATION, 1) >= 5:
                    width, height = height, width
        except (OSError, ValueError):
            return None
        return width, height

    def _parse(self, image: Dict, annotations: List[Dict]) -> dict:
        """``CocoDataset.parse_data_info`` of an image and its usable
        annotations.

        mmdet drops a box that does not meet the recorded image; for an
        image recorded smaller than it is, it is given the real size, then
        the recorded one is put back so that the pipeline's size check
        still warns about the record.
        """
        real = self._real_sizes.get(image['img_id'])
        recorded = (image['width'], image['height'])
        if real is None or tuple(real) == recorded:
            return self.parse_data_info(
                dict(raw_img_info=image, raw_ann_info=annotations))
        data_info = self.parse_data_info(
            dict(
                raw_img_info=dict(image, width=real[0], height=real[1]),
                raw_ann_info=annotations))
        data_info['width'], data_info['height'] = recorded
        return data_info

    def load_data_list(self) -> List[dict]:
        """Read and check the annotation file, then parse every image the
        way ``CocoDataset`` does, without the boxes that cannot be used.

        Returns:
            list[dict]: One data info dict per image.
        """
        coco = self._read_annotation_file()
        self._check_categories(coco)
        # Labels follow the file's order of the configured categories, as
        # in CocoDataset and CocoMetric (which must agree on it).
        self.cat_ids = coco.get_cat_ids(cat_names=self.metainfo['classes'])
        names = [
            coco.cats[category_id]['name'] for category_id in self.cat_ids
        ]
        configured = list(self.metainfo['classes'])
        if names != configured:
            self._warn(
                f'the classes of the configuration are ordered {configured} '
                f'but {self.ann_file!r} orders them {names}; labels follow '
                'the file, as in MMDetection, so class names shown by the '
                'visualizer will be wrong unless the orders agree',
                UserWarning)
        self.cat2label = {
            category_id: label
            for label, category_id in enumerate(self.cat_ids)
        }
        self.cat_img_map = {
            category_id: list(coco.cat_img_map[category_id])
            for category_id in self.cat_ids
        }
        # pycocotools indexes annotations by id, so duplicates collapse.
        if len(coco.anns) != len(coco.dataset.get('annotations', [])):
            raise AnnotationError(
                f'annotation ids in {self.ann_file!r} are not unique')

        skipped: List[str] = []
        data_list = []
        # Real sizes read from image files, by image id (see
        # _outside_real_image).
        self._real_sizes: Dict[int, Optional[Tuple[int, int]]] = {}
        for image_id in coco.get_img_ids():
            image = dict(coco.load_imgs([image_id])[0], img_id=image_id)
            annotations = [
                annotation for annotation in coco.load_anns(
                    coco.get_ann_ids(img_ids=[image_id]))
                if self._usable(annotation, image, skipped)
            ]
            data_list.append(self._parse(image, annotations))
        del self._real_sizes
        if skipped:
            listed = '; '.join(skipped[:MAX_LISTED])
            more = len(skipped) - MAX_LISTED
            self._warn(
                f'{self.ann_file!r}: skipped {len(skipped)} annotation(s) '
                f'whose box cannot be used: {listed}' +
                (f'; and {more} more' if more > 0 else ''),
                InvalidAnnotationWarning)
        self._check_not_empty(coco, data_list)
        return data_list

    def _check_not_empty(self, coco: COCO, data_list: List[dict]) -> None:
        """A split must hold images, and a training split boxes to learn.

        Sets :attr:`num_instances`, the number of usable boxes, which
        :class:`~ddetr_plugin.engine.DatasetCheckHook` reads.
        """
        if not data_list:
            raise AnnotationError(
                f'{self.ann_file!r} lists no images (its "images" list is '
                'empty or missing); give the annotation file of the split '
                'you mean (ann_file)')
        self.num_instances = sum(1 for data_info in data_list
                                 for instance in data_info['instances']
                                 if not instance.get('ignore_flag', 0))
        if self.num_instances:
            return
        raw_count = len(coco.dataset.get('annotations') or [])
        if raw_count == 0:
            problem = ('holds no annotations (its "annotations" list is '
                       'empty or missing)')
        else:
            problem = (f'has {raw_count} annotation(s) but none gives a '
                       'usable box of the configured classes '
                       f'{list(self.metainfo["classes"])}')
        if self.test_mode:
            self._warn(
                f'{self.ann_file!r} {problem}: its {len(data_list)} images '
                'can be run for predictions, but there is nothing to '
                'evaluate (use the evaluator\'s format_only=True with an '
                'outfile_prefix to keep the predictions)',
                MissingAnnotationWarning)
            return
        raise AnnotationError(
            f'{self.ann_file!r} {problem}, so training on it would learn '
            'only "no object"; give the annotated file of the split '
            '(ann_file), or set test_mode=True to run predictions only')

    def filter_data(self) -> List[dict]:
        """``CocoDataset``'s filter, with an error naming the file when it
        leaves no image (MMEngine would fail later without naming it).

        Returns:
            list[dict]: The data infos that pass ``filter_cfg``.
        """
        kept = super().filter_data()
        if not kept and self.data_list:
            raise AnnotationError(
                f'filter_cfg={self.filter_cfg} leaves none of the '
                f'{len(self.data_list)} images of {self.ann_file!r} (with '
                'filter_empty_gt=True an image needs a usable box, and '
                'min_size drops images whose shorter side is smaller); '
                'relax filter_cfg or check the annotation file')
        return kept

    def _check_image_size(self, results: dict) -> None:
        """Check the boxes against the loaded image when its real size is
        not the recorded one.

        Args:
            results (dict): Pipeline results just after the image was
                loaded: ``ori_shape`` (height, width) of the real image,
                the recorded ``height`` and ``width``, and ``instances``
                with (x1, y1, x2, y2) ``bbox``.
        """
        real_height, real_width = results['ori_shape'][:2]
        recorded = (results.get('height'), results.get('width'))
        if None in recorded or recorded == (real_height, real_width):
            return
        kept, skipped = [], []
        for instance in results.get('instances', []):
            x1, y1, x2, y2 = instance['bbox']
            problem = _box_problem([x1, y1, x2 - x1, y2 - y1], real_width,
                                   real_height)
            if problem is None:
                kept.append(instance)
            else:
                skipped.append(f'{instance["bbox"]}: {problem}')
        results['instances'] = kept
        results['height'], results['width'] = real_height, real_width
        self._size_warnings = getattr(self, '_size_warnings', 0) + 1
        if self._size_warnings > MAX_LISTED:
            return  # one data set with wrong sizes would flood the log
        message = (
            f'image {results.get("img_path")!r} is {real_width} x '
            f'{real_height} (width x height) but {self.ann_file!r} records '
            f'{recorded[1]} x {recorded[0]}; its boxes are checked against '
            'the real size')
        if skipped:
            message += (f' and {len(skipped)} of them skipped, lying '
                        'outside it: ' + '; '.join(skipped[:MAX_LISTED]))
        if self._size_warnings == MAX_LISTED:
            message += ('; further images of this process whose size '
                        'differs are not reported')
        self._warn(message, ImageSizeWarning)

    def _run_pipeline(self, data_info: dict) -> Optional[dict]:
        """The pipeline's transforms in order, with the size check right
        after the transform that loads the image.

        The check filters the raw ``instances``; MMDetection's pipelines
        load the image first, so ``LoadAnnotations`` reads them after it.
        """
        transforms = getattr(self.pipeline, 'transforms', None)
        if transforms is None:
            return self.pipeline(data_info)
        results, checked = data_info, False
        for transform in transforms:
            results = transform(results)
            if results is None:
                # A transform gave up on this sample; the data set picks
                # another one, as in MMEngine's Compose.
                return None
            if not checked and 'ori_shape' in results:
                self._check_image_size(results)
                checked = True
        return results

    def prepare_data(self, idx: int) -> Optional[dict]:
        """Run the pipeline on one image; failures name the image file."""
        try:
            return self._run_pipeline(self.get_data_info(idx))
        except Exception as error:
            image_path = self.get_data_info(idx).get('img_path')
            raise ImageLoadError(
                f'could not load or transform image {image_path!r} (index '
                f'{idx} of {self.ann_file!r}): {type(error).__name__}: '
                f'{error}') from error
