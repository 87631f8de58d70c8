"""Evaluate an exported ONNX model on the config's test split, and
optionally the PyTorch checkpoint beside it.

    python tools/deployment/test_onnx.py CONFIG MODEL.onnx
        [--weights CHECKPOINT] [--threads N] [--out-json FILE]

Every image goes through the config's test pipeline and data preprocessor,
one at a time, is padded to the model's input size when the model was
exported for a fixed size (the model masks that padding from the image's
size, its second input), and runs in ONNX Runtime; the boxes are mapped
back to the original images and scored by the config's test evaluator
(COCO mAP for the COCO configs). With ``--weights``, the PyTorch model runs
on the same padded batches, so that the difference printed is the
export's alone.

The class names stored in the ONNX file must be the test split's: they are
compared before anything runs.
"""
import argparse
import json
import os.path as osp
import sys

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch
from mmdet.apis import init_detector
from mmengine.evaluator import Evaluator
from mmengine.registry import DefaultScope

import ddetr_plugin  # noqa: F401
from ddetr_plugin.deployment.onnx_runtime import OnnxTestModel
from ddetr_plugin.engine import checkpoint_check, launch
from ddetr_plugin.registry import DATASETS, SCOPE


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Evaluate an ONNX model on the test split')
    parser.add_argument('config', help='config file of the model')
    parser.add_argument('onnx', help='the .onnx of export_onnx.py')
    parser.add_argument(
        '--weights', help='also evaluate this checkpoint in PyTorch')
    parser.add_argument(
        '--threads', type=int, default=None, help='ONNX Runtime threads')
    parser.add_argument('--out-json', help='write the metrics here')
    return parser.parse_args(argv)


def evaluate(cfg, dataset, test_step) -> dict:
    """The config's test metrics of ``test_step`` over ``dataset``."""
    with DefaultScope.overwrite_default_scope(SCOPE):
        evaluator = Evaluator(cfg.test_evaluator)
    evaluator.dataset_meta = dataset.metainfo
    for index in range(len(dataset)):
        item = dataset[index]
        batch = dict(
            inputs=[item['inputs']], data_samples=[item['data_samples']])
        with torch.no_grad():
            evaluator.process(data_samples=test_step(batch), data_batch=batch)
    return evaluator.evaluate(len(dataset))


def pytorch_test_step(model, onnx_model: OnnxTestModel):
    """``model.test_step`` on the batches the ONNX model is given: padded
    to its input size, with that size as the batch's padded shape.

    Args:
        model (nn.Module): The PyTorch detector, in eval mode.
        onnx_model (OnnxTestModel): The ONNX model it is compared with.

    Returns:
        Callable: ``data`` (as the test dataloader gives it) -> the data
        samples with ``pred_instances`` in original image pixels.
    """

    def test_step(data: dict) -> list:
        batch = model.data_preprocessor(data, False)
        images = onnx_model.pad_to_model(batch['inputs'])
        for sample in batch['data_samples']:
            sample.set_metainfo(
                dict(batch_input_shape=tuple(images.shape[-2:])))
        return model.predict(images, batch['data_samples'])

    return test_step


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = launch.load_config(args.config)
    with DefaultScope.overwrite_default_scope(SCOPE):
        dataset = DATASETS.build(cfg.test_dataloader.dataset)
    onnx_model = OnnxTestModel(cfg, args.onnx, args.threads)
    # Before the split runs: other classes would crash the evaluator (or
    # score the wrong names) after the whole run.
    onnx_model.check_classes(
        dataset.metainfo.get('classes'), f'the test split of {args.config} '
        '(test_dataloader.dataset.metainfo.classes)')
    results = dict(onnx=evaluate(cfg, dataset, onnx_model.test_step))
    if args.weights:
        model = init_detector(cfg, args.weights, device='cpu').eval()
        checkpoint_check.check_checkpoint_matches(model, args.weights)
        results['pytorch'] = evaluate(cfg, dataset,
                                      pytorch_test_step(model, onnx_model))
    for name, metrics in results.items():
        print(f'{name}: ' + ', '.join(f'{key} {value:.4f}'
                                      for key, value in metrics.items()
                                      if isinstance(value, float)))
    if args.weights:
        differences = {
            key: abs(results['onnx'][key] - value)
            for key, value in results['pytorch'].items()
            if isinstance(value, float)
        }
        print('largest difference: ' +
              f'{max(differences.values(), default=0.0):.4f}')
    if args.out_json:
        with open(args.out_json, 'w') as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
