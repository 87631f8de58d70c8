"""Time the plugin's Deformable or Conditional DETR against mmdet 3.3.0's,
same weights.

Both models are built in one process from their own R50 configs (random
weights, no download); mmdet's weights are copied into the plugin's model,
so both compute the same function. The script times

* inference: ``predict`` on one image (800x1216 by default), and
* a training step: ``loss`` + ``backward`` on a batch (2x512x512 default),

alternating the two models run by run (so a change of machine load hits
both), and prints the median and the minimum of each and the plugin's time
as a ratio of mmdet's. Examples::

    python tools/analysis_tools/benchmark_model.py --threads 2
    python tools/analysis_tools/benchmark_model.py --threads 2 \
        --variant conditional-detr_r50_8xb2-50e_coco.py --skip-train

``--also-unfolded`` adds a row for the plugin with its backbone as built
(no folded batch norms, ``model.fast_backbone_inference=False``).

Targets on CPU: Deformable DETR inference <= 0.5x and a training step
<= 0.6x mmdet's; Conditional DETR inference <= 0.8x.
"""
import argparse
import logging
import os.path as osp
import statistics
import time
from typing import Callable, List, Sequence

import mmdet
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

import ddetr_plugin
from ddetr_plugin.converters import convert_mmdet_state_dict, load_converted

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
VARIANT = 'deformable-detr_r50_16xb2-50e_coco.py'


def parse_args() -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--variant',
        default=VARIANT,
        help='config file name, the same in mmdet\'s and the plugin\'s '
        'configs/deformable_detr/ (or configs/conditional_detr/ for a name '
        'starting with conditional-detr)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument(
        '--infer-size',
        type=int,
        nargs=2,
        default=[800, 1216],
        metavar=('H', 'W'))
    parser.add_argument(
        '--train-size',
        type=int,
        nargs=3,
        default=[2, 512, 512],
        metavar=('BATCH', 'H', 'W'))
    parser.add_argument(
        '--clock',
        choices=('wall', 'cpu'),
        default='wall',
        help='wall time, or the CPU time of this process (all its threads), '
        'which other processes on a loaded machine disturb less')
    parser.add_argument(
        '--also-unfolded',
        action='store_true',
        help='also time the plugin\'s inference with its backbone as built '
        '(model.fast_backbone_inference=False), to show what folding the '
        'batch norms contributes')
    parser.add_argument('--skip-train', action='store_true')
    parser.add_argument('--skip-infer', action='store_true')
    return parser.parse_args()


def build_models(variant: str, device: str):
    """mmdet's model and the plugin's, with mmdet's random weights."""
    folder = 'conditional_detr' if variant.startswith(
        'conditional-detr') else 'deformable_detr'
    configs = {
        'mmdet':
        osp.join(
            osp.dirname(mmdet.__file__), '.mim', 'configs', folder, variant),
        'ddetr_plugin':
        osp.join(REPO, 'configs', folder, variant),
    }
    models = {}
    for scope, path in configs.items():
        cfg = Config.fromfile(path).model
        cfg.backbone.init_cfg = None
        with DefaultScope.overwrite_default_scope(scope):
            if scope == 'mmdet':
                from mmdet.registry import MODELS
                from mmdet.utils import register_all_modules
                register_all_modules(init_default_scope=False)
            else:
                from ddetr_plugin.registry import MODELS
            models[scope] = MODELS.build(cfg).to(device)
    # init_weights logs a line per parameter (about 1500): not for a
    # benchmark's output.
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        models['mmdet'].init_weights()
    finally:
        logger.setLevel(level)
    load_converted(models['ddetr_plugin'],
                   convert_mmdet_state_dict(models['mmdet'].state_dict()))
    return models['mmdet'], models['ddetr_plugin']


def make_data(model, sizes: List[tuple], training: bool) -> dict:
    """Random images (and one box each) through the preprocessor, which
    also moves them to the model's device."""
    generator = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for height, width in sizes:
        inputs.append(
            torch.randint(0, 256, (3, height, width),
                          generator=generator).byte())
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(height, width),
                ori_shape=(height, width),
                scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor(
                [[0.1 * width, 0.2 * height, 0.6 * width, 0.7 * height]]),
            labels=torch.tensor([1]))
        samples.append(sample)
    return model.data_preprocessor(
        dict(inputs=inputs, data_samples=samples), training)


def interleaved_times(
        functions: Sequence[Callable[[], None]],
        warmup: int,
        runs: int,
        clock: Callable[[], float] = time.perf_counter) -> List[List[float]]:
    """Times of each function, runs alternating between them.

    Alternating spreads any change of machine load over both models
    instead of charging it to whichever ran second.

    Args:
        functions (Sequence[Callable]): What to time.
        warmup (int): Untimed runs of each first.
        runs (int): Timed runs of each.
        clock (Callable): Seconds now; wall time by default.

    Returns:
        list[list[float]]: ``runs`` times in seconds per function.
    """
    for function in functions:
        for _ in range(warmup):
            function()
    times = [[] for _ in functions]
    for _ in range(runs):
        for function, function_times in zip(functions, times):
            start = clock()
            function()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            function_times.append(clock() - start)
    return times


def inference(model, data: dict, fold: bool = True) -> Callable[[], None]:
    """``predict`` without gradients; ``fold=False`` runs the plugin's
    backbone as built."""

    def run():
        model.eval()
        backbone_inference = getattr(model, 'backbone_inference', None)
        if backbone_inference is not None:
            backbone_inference.enabled = fold
        with torch.no_grad():
            model.predict(data['inputs'], data['data_samples'])

    return run


def training_step(model, data: dict) -> Callable[[], None]:
    """``loss`` and ``backward``."""

    def run():
        model.train()
        model.zero_grad(set_to_none=True)
        losses = model.loss(data['inputs'], data['data_samples'])
        sum(losses.values()).backward()

    return run


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference, plugin = build_models(args.variant, args.device)
    from ddetr_plugin import ops
    compiled = getattr(ops, 'extension_loaded', lambda: False)()
    print(f'{args.variant}, device {args.device}, {args.threads} threads, '
          f'torch {torch.__version__}, ddetr_plugin '
          f'{ddetr_plugin.__version__}, compiled op loaded: {compiled}, '
          f'{args.clock} clock')
    clock = time.perf_counter if args.clock == 'wall' else time.process_time
    rows = []
    if not args.skip_infer:
        data = make_data(reference, [tuple(args.infer_size)], False)
        name = f'inference 1x{args.infer_size[0]}x{args.infer_size[1]}'
        functions = [inference(reference, data), inference(plugin, data)]
        if args.also_unfolded:
            functions.append(inference(plugin, data, fold=False))
        times = interleaved_times(functions, args.warmup, args.runs, clock)
        rows.append((name, times[:2]))
        if args.also_unfolded:
            rows.append((f'{name}, plugin unfolded', [times[0], times[2]]))
    if not args.skip_train:
        batch_size, height, width = args.train_size
        data = make_data(reference, [(height, width)] * batch_size, True)
        rows.append(
            (f'training step {batch_size}x{height}x{width}',
             interleaved_times(
                 [training_step(reference, data),
                  training_step(plugin, data)], args.warmup, args.runs,
                 clock)))
    print(f'{"":38s} {"mmdet (s)":>17s} {"plugin (s)":>17s} '
          f'{"ratio":>13s}')
    print(f'{"":38s} {"median   min":>17s} {"median   min":>17s} '
          f'{"median   min":>13s}')
    for name, (reference_times, plugin_times) in rows:
        medians = [
            statistics.median(reference_times),
            statistics.median(plugin_times)
        ]
        minima = [min(reference_times), min(plugin_times)]
        print(f'{name:38s} {medians[0]:8.3f} {minima[0]:8.3f} '
              f'{medians[1]:8.3f} {minima[1]:8.3f} '
              f'{medians[1] / medians[0]:6.3f} {minima[1] / minima[0]:6.3f}')


if __name__ == '__main__':
    main()
