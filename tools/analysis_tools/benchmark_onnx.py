"""Time ONNX Runtime against PyTorch eager for the R50 Deformable DETR.

The config's model is built with random weights (nothing is downloaded),
exported to ONNX once per sampling mode at a fixed size (800x1216 by
default), and the same normalised image is run by

* PyTorch eager: the detector's tensor forward (``TensorDetector``, the
  stages of ``predict`` with the plugin's compiled op), and
* ONNX Runtime (CPU), one session per sampling mode,

alternating them run by run so that a change of machine load hits all.
It prints the median and minimum time of each, ONNX Runtime's time as a
ratio of PyTorch's, and the largest differences of the detections.
Example::

    python tools/analysis_tools/benchmark_onnx.py --threads 2
"""
import argparse
import os.path as osp
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import ddetr_plugin  # noqa: F401
from ddetr_plugin.deployment import (TensorDetector, example_images,
                                     full_image_shapes)
from ddetr_plugin.deployment.onnx_export import export_onnx
from ddetr_plugin.deployment.onnx_ms_deform_attn import SAMPLING_MODES
from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
from ddetr_plugin.registry import MODELS

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO, 'configs', 'deformable_detr',
                  'deformable-detr_r50_16xb2-50e_coco.py')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default=CONFIG)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument(
        '--size', type=int, nargs=2, default=[800, 1216], metavar=('H', 'W'))
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument(
        '--sampling',
        nargs='+',
        choices=SAMPLING_MODES,
        default=list(SAMPLING_MODES))
    return parser.parse_args()


def build_model(config: str) -> torch.nn.Module:
    """The config's detector with random weights, in eval mode."""
    model_cfg = Config.fromfile(config).model
    model_cfg.backbone.init_cfg = None  # nothing to download
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        torch.manual_seed(0)
        return MODELS.build(model_cfg).eval()


def time_alternating(runners: Dict[str, Callable[[], object]], warmup: int,
                     runs: int) -> Dict[str, List[float]]:
    """Seconds per call of each runner, runners taking turns."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    height, width = args.size
    model = build_model(args.config)
    images = example_images(height, width)
    # One unpadded image: the graph still builds its (empty) padding mask.
    image_shapes = full_image_shapes(images)
    eager = TensorDetector(model).eval()

    runners = {}
    outputs = {}
    with tempfile.TemporaryDirectory() as folder:
        for sampling in args.sampling:
            path = osp.join(folder, f'{sampling}.onnx')
            start = time.perf_counter()
            export_onnx(model, images, path, sampling=sampling)
            print(f'exported {sampling} in {time.perf_counter() - start:.0f}'
                  ' s')
            runners[f'onnxruntime-{sampling}'] = OnnxRuntimeDetector(
                path, num_threads=args.threads)

        def run_eager():
            with torch.no_grad():
                return eager(images, image_shapes)

        calls = {'pytorch-eager': run_eager}
        for name, detector in runners.items():
            calls[name] = (lambda detector=detector: detector(images))
        for name, call in calls.items():
            outputs[name] = call()
        times = time_alternating(calls, args.warmup, args.runs)

    expected_dets, expected_labels = outputs['pytorch-eager']
    print(f'\n{args.config}, input 1x3x{height}x{width}, {args.threads} '
          f'threads, median and min of {args.runs} runs after '
          f'{args.warmup} warm-up')
    print('| runtime | median s | min s | ratio to PyTorch (median) | '
          'max score diff | max box diff px | same labels |')
    print('|---|---:|---:|---:|---:|---:|---|')
    baseline = statistics.median(times['pytorch-eager'])
    for name, seconds in times.items():
        dets, labels = outputs[name]
        dets = torch.as_tensor(dets)
        score_diff = (dets[..., 4] - expected_dets[..., 4]).abs().max()
        box_diff = (dets[..., :4] - expected_dets[..., :4]).abs().max()
        same = bool((torch.as_tensor(labels) == expected_labels).all())
        median = statistics.median(seconds)
        print(f'| {name} | {median:.3f} | {min(seconds):.3f} | '
              f'{median / baseline:.2f} | {score_diff:.1e} | '
              f'{box_diff:.1e} | {same} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
