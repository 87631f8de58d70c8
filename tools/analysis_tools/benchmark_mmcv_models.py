"""Time mmdet's DINO and Mask2Former with and without the plugin's op.

``ddetr_plugin.mmcv_msda`` (one line in a config) makes mmcv's
``MultiScaleDeformableAttention`` sample with the plugin's op. This script
measures what that line changes, in one process, with the same model and
weights for both:

* default (CPU, needs mmdet): DINO R50 and Mask2Former R50 built from
  mmdet 3.3.0's configs (random weights, no download). For each, the time
  of ``predict`` on one image (800x1216 by default) and of one training
  step (``loss`` and ``backward``) on a batch (2x512x512 by default;
  Mask2Former's batch is padded to that size instead of its 1024x1024),
  with mmcv's own sampling and with the plugin's op. Runs alternate
  between the two (a change of machine load hits both); the script prints
  the median and minimum of each and the plugin's time as a ratio of
  mmcv's, and the load average before and after, since other processes
  may share the cores.
* ``--attention-only`` (torch alone, for the GPU check): the sampling core
  alone at the shapes these models give it, mmcv's kernel (its CUDA kernel
  through ``--mmcv-library`` on a machine without mmcv, its ``grid_sample``
  path on CPU) against the plugin's op, forward and forward+backward.

Examples::

    python tools/analysis_tools/benchmark_mmcv_models.py --threads 2
    python tools/analysis_tools/benchmark_mmcv_models.py --attention-only \
        --device cuda --mmcv-library build/libmmcv_msda.so

Goal on CPU: DINO R50 inference at 800x1216 at most 0.6x mmcv's time.
"""
import argparse
import json
import os
import os.path as osp
import statistics
from typing import Callable, Dict, List, Optional

import torch
# The sibling benchmark: run as a script, this folder is first on sys.path.
from benchmark_msda import (DTYPES, load_mmcv_cuda, load_mmcv_pytorch,
                            make_inputs, make_pass, median_seconds)

CONFIGS = {
    'dino': 'dino/dino-4scale_r50_8xb2-12e_coco.py',
    'mask2former': 'mask2former/mask2former_r50_8xb2-lsj-50e_coco.py',
}
# The sampling calls of one training batch of two images per GPU: DINO
# R50 at 800x1333 (strides 8 to 64; 900 queries in the decoder) and
# Mask2Former R50 with large-scale jitter (1024x1024, strides 8 to 32).
DINO_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
MASK2FORMER_LEVELS = ((128, 128), (64, 64), (32, 32))
ATTENTION_SHAPES = {
    # name: (batch size, queries (None: one per key), level shapes)
    'dino-encoder': (2, None, DINO_LEVELS),
    'dino-decoder': (2, 900, DINO_LEVELS),
    'mask2former-encoder': (2, None, MASK2FORMER_LEVELS),
}


def parse_args() -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--models', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
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
    parser.add_argument('--skip-train', action='store_true')
    parser.add_argument('--skip-infer', action='store_true')
    parser.add_argument(
        '--attention-only',
        action='store_true',
        help='time the sampling core alone at the models\' shapes (needs '
        'torch only)')
    parser.add_argument(
        '--shapes',
        nargs='+',
        default=list(ATTENTION_SHAPES),
        choices=list(ATTENTION_SHAPES),
        help='with --attention-only')
    parser.add_argument(
        '--dtypes',
        nargs='+',
        default=['fp32'],
        choices=list(DTYPES),
        help='with --attention-only')
    parser.add_argument(
        '--mmcv-library',
        default=None,
        help='with --attention-only on cuda: the library of mmcv\'s kernel '
        'built by tools/misc/gpu_check/build_mmcv_msda.py')
    parser.add_argument(
        '--json', default=None, help='also write the rows to this file')
    return parser.parse_args()


# ---------------------------------------------------------------------------
# Whole models (mmdet needed).


def build_model(config: str,
                adjust: Callable = lambda model_cfg: None,
                device: str = 'cpu'):
    """mmdet's model with random weights (no pretrained backbone).

    Args:
        config (str): the config file, relative to mmdet's ``configs``.
        adjust (Callable): edits the model's config in place first.
        device (str): where the model goes.
    """
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', config)
    model_cfg = Config.fromfile(path).model
    model_cfg.backbone.init_cfg = None
    adjust(model_cfg)
    with DefaultScope.overwrite_default_scope('mmdet'):
        register_all_modules(init_default_scope=False)
        model = MODELS.build(model_cfg)
    model.init_weights()
    return model.to(device)


def pad_training_batches(model_cfg, height: int, width: int) -> None:
    """Mask2Former pads every training batch to 1024x1024: to the
    benchmark's training size instead."""
    for augment in model_cfg.data_preprocessor.get('batch_augments') or []:
        augment.size = (height, width)


class _Unprocessed:
    """Stands in for a model in ``benchmark_model.make_data``: its data
    preprocessor hands the images and samples back as they are."""

    @staticmethod
    def data_preprocessor(data: dict, training: bool) -> dict:
        return data


def make_data(model, sizes: List[tuple], training: bool) -> dict:
    """Random images of ``sizes`` with one box each and the box's mask
    (Mask2Former trains on masks), through the model's preprocessor."""
    import numpy as np
    from benchmark_model import make_data as make_boxes_data
    from mmdet.structures.mask import BitmapMasks
    data = make_boxes_data(_Unprocessed, sizes, training)
    for sample in data['data_samples']:
        height, width = sample.img_shape
        masks = np.zeros((1, height, width), dtype=np.uint8)
        x1, y1, x2, y2 = sample.gt_instances.bboxes[0].int().tolist()
        masks[0, y1:y2, x1:x2] = 1
        sample.gt_instances.masks = BitmapMasks(masks, height, width)
    return model.data_preprocessor(data, training)


def with_switch(on: bool, run: Callable[[], None]) -> Callable[[], None]:
    """``run`` with the plugin's op under mmcv's attention, or without."""
    from ddetr_plugin import mmcv_patch

    def switched():
        if on:
            with mmcv_patch.enabled():
                run()
        else:
            mmcv_patch.disable()
            run()

    return switched


def time_models(args: argparse.Namespace) -> List[Dict]:
    """Rows of (model, pass, mmcv times, plugin times)."""
    from benchmark_model import inference, interleaved_times, training_step
    rows = []
    for name in args.models:
        model = build_model(
            CONFIGS[name], lambda model_cfg: pad_training_batches(
                model_cfg, *args.train_size[1:]), args.device)
        passes = []
        if not args.skip_infer:
            height, width = args.infer_size
            passes.append((f'inference 1x{height}x{width}', inference,
                           make_data(model, [(height, width)], False)))
        if not args.skip_train:
            batch_size, height, width = args.train_size
            passes.append(
                (f'training step {batch_size}x{height}x{width}', training_step,
                 make_data(model, [(height, width)] * batch_size, True)))
        for pass_name, make_run, data in passes:
            run = make_run(model, data)
            mmcv_times, plugin_times = interleaved_times(
                [with_switch(False, run),
                 with_switch(True, run)], args.warmup, args.runs)
            rows.append(
                dict(
                    model=name,
                    pass_=pass_name,
                    mmcv_s=mmcv_times,
                    plugin_s=plugin_times))
            print_row(rows[-1])
        del model
    return rows


def print_row(row: Dict) -> None:
    mmcv_times, plugin_times = row['mmcv_s'], row['plugin_s']
    medians = [statistics.median(mmcv_times), statistics.median(plugin_times)]
    minima = [min(mmcv_times), min(plugin_times)]
    print(
        f'{row["model"]:<12} {row["pass_"]:<28} {medians[0]:8.3f} '
        f'{minima[0]:8.3f} {medians[1]:8.3f} {minima[1]:8.3f} '
        f'{medians[1] / medians[0]:6.3f} {minima[1] / minima[0]:6.3f}',
        flush=True)


# ---------------------------------------------------------------------------
# The sampling core alone (torch only).


def time_attention(args: argparse.Namespace) -> List[Dict]:
    """Rows of (shape, pass, dtype, mmcv ms, plugin ms) of the core."""
    from ddetr_plugin.ops import ms_deform_attn
    baseline = (
        load_mmcv_cuda(args.mmcv_library)
        if args.device == 'cuda' else load_mmcv_pytorch())
    print(f'mmcv\'s kernel ({baseline.name}): '
          f'{baseline.missing or "loaded"}')
    print(f'{"shape":<20} {"pass":<17} {"dtype":<5} {"mmcv ms":>10} '
          f'{"plugin ms":>10} {"ratio":>7}')
    rows = []
    for shape in args.shapes:
        batch_size, num_queries, levels = ATTENTION_SHAPES[shape]
        for dtype_name in args.dtypes:
            inputs = make_inputs(
                batch_size,
                num_queries,
                DTYPES[dtype_name],
                args.device,
                level_shapes=levels)
            for backward in (False, True):
                row = dict(
                    shape=shape,
                    pass_='forward+backward' if backward else 'forward',
                    dtype=dtype_name,
                    mmcv_ms=_time_call(baseline.function, inputs, backward,
                                       args),
                    plugin_ms=_time_call(ms_deform_attn, inputs, backward,
                                         args))
                rows.append(row)
                ratio = (
                    row['plugin_ms'] / row['mmcv_ms']
                    if row['plugin_ms'] and row['mmcv_ms'] else float('nan'))
                print(
                    f'{shape:<20} {row["pass_"]:<17} {dtype_name:<5} '
                    f'{_format_ms(row["mmcv_ms"]):>10} '
                    f'{_format_ms(row["plugin_ms"]):>10} {ratio:7.3f}',
                    flush=True)
    return rows


def _time_call(function: Optional[Callable], inputs, backward: bool,
               args: argparse.Namespace) -> Optional[float]:
    """Median milliseconds of one pass, None where it cannot run."""
    if function is None:
        return None
    run, reset = make_pass(function, inputs, backward)
    try:
        return 1e3 * median_seconds(run, reset, args.device, args.warmup,
                                    args.runs)
    except Exception as error:  # e.g. no kernel for the dtype: its row
        print(f'  failed: {type(error).__name__}: {error}'.splitlines()[0])
        return None


def _format_ms(milliseconds: Optional[float]) -> str:
    return 'missing' if milliseconds is None else f'{milliseconds:.3f}'


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda given but torch sees no CUDA device')
    from ddetr_plugin.ops import extension_error, extension_loaded
    print(f'torch {torch.__version__}, device {args.device}, '
          f'{torch.get_num_threads()} threads, compiled op loaded: '
          f'{extension_loaded() or extension_error()}')
    load_before = os.getloadavg()
    if args.attention_only:
        rows = time_attention(args)
    else:
        print(f'{"model":<12} {"pass":<28} {"mmcv (s)":>17} '
              f'{"plugin op (s)":>17} {"ratio":>13}')
        print(f'{"":<41} {"median   min":>17} {"median   min":>17} '
              f'{"median   min":>13}')
        rows = time_models(args)
    load_after = os.getloadavg()
    print('load average (1, 5, 15 min) before: ' +
          ', '.join(f'{load:.2f}' for load in load_before) + '; after: ' +
          ', '.join(f'{load:.2f}'
                    for load in load_after) + f'; {os.cpu_count()} cores')
    if args.json:
        with open(args.json, 'w') as file:
            json.dump(
                dict(
                    rows=rows, load_before=load_before, load_after=load_after),
                file,
                indent=2)


if __name__ == '__main__':
    main()
