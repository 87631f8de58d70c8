"""Check every split's data set against the model before the first step.

A data set whose number of classes differs from the detector's
``bbox_head.num_classes`` does not fail where the mistake is: with more
classes in the model, a whole epoch trains and then ``CocoMetric`` crashes
with an ``IndexError`` on the first prediction of an unknown class; with
fewer, the matcher fails on the first batch with an index error that names
neither number. :class:`DatasetCheckHook` compares them when the runner
starts (``before_run``: the loops and their data sets are built, nothing
has been trained or evaluated yet) and stops with both numbers and the keys
to change.

It also stops a test or validation run early when the split has no
annotations to evaluate while the evaluator is set to evaluate (instead of
failing after predicting every image).
"""
from typing import Optional, Sequence

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner import BaseLoop

from ..registry import HOOKS


class DatasetModelMismatchError(ValueError):
    """A data set does not fit the model it is used with."""


def _model_num_classes(model) -> Optional[int]:
    """``bbox_head.num_classes`` of a (possibly wrapped) detector."""
    if is_model_wrapper(model):
        model = model.module
    head = getattr(model, 'bbox_head', None)
    num_classes = getattr(head, 'num_classes', None)
    return num_classes if isinstance(num_classes, int) else None


def _describe(dataset) -> str:
    """``TypeName`` or ``TypeName of 'annotation file'`` for messages."""
    ann_file = getattr(dataset, 'ann_file', None)
    name = type(dataset).__name__
    return f'{name} of {ann_file!r}' if ann_file else name


def _evaluates(evaluator) -> bool:
    """Whether an evaluator will compare predictions with ground truth."""
    metrics = getattr(evaluator, 'metrics', None) or []
    return any(not getattr(metric, 'format_only', False) for metric in metrics)


def check_classes(split: str, description: str, classes: Sequence[str],
                  num_classes: int) -> None:
    """Raise unless a split's data set has the model's number of classes.

    Args:
        split (str): ``'train'``, ``'val'`` or ``'test'``.
        description (str): What the data set is, for the message (its type
            and annotation file).
        classes (Sequence[str]): The data set's ``metainfo['classes']``.
        num_classes (int): The model's ``bbox_head.num_classes``.

    Raises:
        DatasetModelMismatchError: Naming both numbers and the keys to set.
    """
    if len(classes) == num_classes:
        return
    raise DatasetModelMismatchError(
        f'{split}_dataloader.dataset ({description}) has '
        f'{len(classes)} classes {list(classes)} but the model has '
        f'model.bbox_head.num_classes={num_classes}; set '
        f'model.bbox_head.num_classes={len(classes)} in the config (or '
        f'list the model\'s {num_classes} classes in '
        f'{split}_dataloader.dataset.metainfo.classes), so that the '
        'data set and the model agree before training or evaluating')


@HOOKS.register_module()
class DatasetCheckHook(Hook):
    """Compare the data sets of the built loops with the model at start-up.

    Runs in ``before_run`` with the highest priority, so a mismatch stops
    ``runner.train()``, ``runner.val()`` and ``runner.test()`` (the plugin's
    tools and MMDetection's alike) before weights are loaded or a step is
    taken. Checks, for each split whose loop the runner has built:

    * the number of classes of the data set (``metainfo['classes']``)
      against the model's ``bbox_head.num_classes``;
    * for a validation or test split, that it has annotations when the
      evaluator evaluates (not ``format_only``).

    Data sets without ``classes`` in their metainfo and models without
    ``bbox_head.num_classes`` are not compared.

    Args:
        splits (Sequence[str]): Which splits to check, among ``'train'``,
            ``'val'`` and ``'test'``. Defaults to all three.
    """

    priority = 'VERY_HIGH'
    SPLITS = ('train', 'val', 'test')

    def __init__(self, splits: Sequence[str] = SPLITS) -> None:
        if isinstance(splits, str) or not all(split in self.SPLITS
                                              for split in splits):
            raise ValueError(
                f'DatasetCheckHook: splits must be a list of {self.SPLITS}, '
                f'got {splits!r}')
        self.splits = tuple(splits)

    def before_run(self, runner) -> None:
        """Check the data set of every built loop against the model.

        Args:
            runner (Runner): The runner about to train, validate or test.
        """
        num_classes = _model_num_classes(runner.model)
        for split in self.splits:
            # The private attributes: the public properties would build a
            # loop the runner has not built (e.g. the test loop in train()).
            loop = getattr(runner, f'_{split}_loop', None)
            if not isinstance(loop, BaseLoop):
                continue
            dataset = getattr(loop.dataloader, 'dataset', None)
            if dataset is None:
                continue
            if num_classes is not None:
                self._check_classes(split, dataset, num_classes)
            if split != 'train':
                self._check_annotations(split, dataset,
                                        getattr(loop, 'evaluator', None))

    @staticmethod
    def _check_classes(split: str, dataset, num_classes: int) -> None:
        classes = (getattr(dataset, 'metainfo', None) or {}).get('classes')
        if classes is not None:
            check_classes(split, _describe(dataset), classes, num_classes)

    @staticmethod
    def _check_annotations(split: str, dataset, evaluator) -> None:
        # Set by CheckedCocoDataset once it has read its file.
        num_instances = getattr(dataset, 'num_instances', None)
        if num_instances != 0 or not _evaluates(evaluator):
            return
        raise DatasetModelMismatchError(
            f'{split}_dataloader.dataset ({_describe(dataset)}) has no '
            f'annotations, so {split}_evaluator has nothing to evaluate; to '
            'only predict, set '
            f'{split}_evaluator.format_only=True and '
            f'{split}_evaluator.outfile_prefix=PATH (the detections are '
            'written to PATH.bbox.json), or give an annotated file')
