"""Export a trained Deformable or Conditional DETR to ONNX, check it, and
compare it with PyTorch.

    python tools/deployment/export_onnx.py CONFIG CHECKPOINT --out FILE.onnx
        [--shape H W] [--dynamic] [--opset 18]
        [--sampling {grid_sample,gather,trt_plugin}]

The model takes ``input`` (N, 3, H, W) float32, the images already resized and
normalised as the config's test pipeline and data preprocessor do, each at the
top left and padded with zeros to H x W, and ``image_shapes`` (N, 2) int64, the
(height, width) of each image's unpadded part, from which it masks the padding
as PyTorch does. It returns ``dets`` (N, K, 5) float32, (x1, y1, x2, y2, score)
in pixels of the input, sorted by score, and ``labels`` (N, K) int64, K = the
config's ``max_per_img``. ``--dynamic`` makes N (1 to 64), H and W dynamic
(from one more than the model's largest feature stride, 65 px for Deformable
DETR and 33 for Conditional DETR R50, to 4096 px); without ``--shape`` the
config's test scale is used. The multi-scale deformable attention is written in
standard ONNX operators (GridSample or Gather), so ONNX Runtime and TensorRT
need no plugin; ``--sampling trt_plugin`` writes it instead as one node of
TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` layout, for TensorRT only.
Every mode needs opset 17 or higher. Conditional DETR's attention is dense
(MatMul and Softmax, written by the exporter): ``--sampling`` does not apply to
it, and a value other than the default is refused.

After writing, the file is checked by ``onnx.checker`` and ONNX shape
inference, run in ONNX Runtime on a random input whose last image is
padded, and compared with PyTorch.
"""
import argparse
import os
import os.path as osp
import sys

# The tool runs from a checkout without installing the package.
sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch
from mmdet.apis import init_detector
from mmengine.config import DictAction

import ddetr_plugin  # noqa: F401
from ddetr_plugin.deployment import (TensorDetector, example_images,
                                     full_image_shapes)
from ddetr_plugin.deployment.config_inputs import test_input_shape
from ddetr_plugin.deployment.onnx_export import (DEFAULT_OPSET,
                                                 DEFAULT_SAMPLING, MIN_OPSET,
                                                 check_opset, export_onnx)
from ddetr_plugin.deployment.onnx_ms_deform_attn import (EXPORT_MODES,
                                                         TENSORRT_PLUGIN,
                                                         TENSORRT_PLUGIN_NAME)
from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
from ddetr_plugin.deployment.torch_export import (MAX_DYNAMIC_SIDE,
                                                  check_dynamic_size,
                                                  uses_deformable_attention)
from ddetr_plugin.engine import checkpoint_check, launch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Export Deformable or Conditional DETR to ONNX (dets, '
        'labels)')
    parser.add_argument('config', help='config file of the model')
    parser.add_argument('checkpoint', help='checkpoint of the model')
    parser.add_argument('--out', required=True, help='the .onnx to write')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='input height and width (default: the config\'s test scale)')
    parser.add_argument(
        '--dynamic',
        action='store_true',
        help='make batch (1-64), height and width dynamic axes (sides from '
        'the model\'s largest feature stride + 1, e.g. 65 px for '
        f'Deformable DETR, to {MAX_DYNAMIC_SIDE} px)')
    parser.add_argument(
        '--opset',
        type=int,
        default=DEFAULT_OPSET,
        help=f'ONNX opset, {MIN_OPSET} or higher (default {DEFAULT_OPSET})')
    parser.add_argument(
        '--sampling',
        choices=EXPORT_MODES,
        default=DEFAULT_SAMPLING,
        help='how the deformable attention is written: GridSample or '
        'Gather (for TensorRT versions that miscompile GridSample), both '
        f'standard operators; or {TENSORRT_PLUGIN}, one node of TensorRT\'s '
        f'{TENSORRT_PLUGIN_NAME} layout, for TensorRT only. Default '
        f'{DEFAULT_SAMPLING}, measured faster in ONNX Runtime. Every mode '
        f'needs --opset {MIN_OPSET} or higher (LayerNormalization). Not '
        'for Conditional DETR, whose attention is dense')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, as key=value pairs')
    return parser.parse_args(argv)


def padded_example(images: torch.Tensor) -> tuple:
    """The example batch with its last image shrunk to about 3/4 x 2/3 of
    the input and zero-padded, and the batch's ``image_shapes``, so that
    the comparison also covers the padding mask.

    Args:
        images (Tensor): (bs, 3, h, w).

    Returns:
        tuple[Tensor, Tensor]: (bs, 3, h, w) images and (bs, 2) int64.
    """
    height, width = images.shape[-2:]
    image_shapes = full_image_shapes(images)
    image_shapes[-1] = torch.tensor(
        [max(1, 3 * height // 4),
         max(1, 2 * width // 3)])
    images = images.clone()
    images[-1, :, image_shapes[-1, 0]:] = 0
    images[-1, :, :, image_shapes[-1, 1]:] = 0
    return images, image_shapes


def check_sampling_applies(model: torch.nn.Module, sampling: str,
                           config: str) -> bool:
    """Whether ``--sampling`` shapes the file: True for a model with
    deformable attention; False for one without (Conditional DETR), where
    a value other than the default is refused with a ValueError rather
    than silently ignored.

    Args:
        model (nn.Module): The built detector.
        sampling (str): The ``--sampling`` value.
        config (str): The config file, for the message.
    """
    if uses_deformable_attention(model):
        return True
    if sampling != DEFAULT_SAMPLING:
        raise ValueError(
            f'--sampling {sampling} chooses how multi-scale deformable '
            f'attention is written, but the model of {config} '
            f'({type(model).__name__}) has none: its attention is dense, '
            'written as standard MatMul and Softmax operators that ONNX '
            'Runtime and TensorRT both run. Leave --sampling out.')
    return False


def main(argv=None) -> int:
    args = parse_args(argv)
    # Refuse a bad opset or size before the slow model build (the smallest
    # size depends on the model: export_detector checks it first).
    check_opset(args.sampling, args.opset)
    if args.dynamic and args.shape:
        check_dynamic_size(*args.shape)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(
            f'checkpoint {args.checkpoint!r} does not exist')
    if not args.out.endswith('.onnx'):
        raise ValueError(f'--out must name a .onnx file, got {args.out!r}')
    cfg = launch.load_config(args.config, args.cfg_options)
    # (export_detector checks the test scale of a dynamic export.)
    height, width = args.shape or test_input_shape(cfg)
    model = init_detector(cfg, args.checkpoint, device='cpu').eval()
    checkpoint_check.check_checkpoint_matches(model, args.checkpoint)
    deformable = check_sampling_applies(model, args.sampling, args.config)

    # torch.export fixes a batch size of 1: trace a dynamic batch with 2.
    images = example_images(height, width, batch_size=2 if args.dynamic else 1)
    out_dir = osp.dirname(osp.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    # Class names and colours let the ONNX demo draw as the PyTorch one.
    dataset_meta = model.dataset_meta or {}
    metadata = dict(
        classes=list(dataset_meta.get('classes', ()) or ()),
        palette=[list(color) for color in dataset_meta.get('palette', ())],
        input_shape=(['batch', 3, 'height', 'width']
                     if args.dynamic else [1, 3, height, width]),
        config=osp.basename(args.config))
    export_onnx(
        model,
        images,
        args.out,
        sampling=args.sampling,
        opset=args.opset,
        dynamic=args.dynamic,
        metadata=metadata)
    attention = (f'sampling {args.sampling}'
                 if deformable else 'dense attention')
    print(f'wrote {args.out} ({osp.getsize(args.out) / 2**20:.1f} MiB, '
          f'opset {args.opset}, {attention}); onnx.checker and shape '
          'inference passed')

    if args.sampling == TENSORRT_PLUGIN:
        # ONNX Runtime has no such node: nothing to compare here.
        print(f'the deformable attention is {TENSORRT_PLUGIN_NAME} nodes, '
              'which only TensorRT runs, with its OSS plugin library '
              f'loaded: e.g. trtexec --onnx={args.out}; ONNX Runtime cannot '
              'run this file')
        return 0
    images, image_shapes = padded_example(images)
    with torch.no_grad():
        torch_dets, torch_labels = TensorDetector(model)(images, image_shapes)
    runtime = OnnxRuntimeDetector(args.out)
    onnx_dets, onnx_labels = runtime(images, image_shapes)
    onnx_dets = torch.from_numpy(onnx_dets)
    same_labels = bool((torch.from_numpy(onnx_labels) == torch_labels).all())
    score_error = (onnx_dets[..., 4] - torch_dets[..., 4]).abs().max()
    box_error = (onnx_dets[..., :4] - torch_dets[..., :4]).abs().max()
    print(f'ONNX Runtime against PyTorch on a random {tuple(images.shape)} '
          f'input (image sizes {image_shapes.tolist()}): labels '
          f'{"equal" if same_labels else "DIFFER"}, largest score '
          f'difference {score_error:.2e}, largest box difference '
          f'{box_error:.2e} px')
    print(f'inputs "input" {runtime.input_shape} and "image_shapes" '
          f'{tuple(runtime.session.get_inputs()[1].shape)} (height, width '
          'of each unpadded image), outputs "dets" (N, K, 5) (x1, y1, x2, '
          'y2, score) and "labels" (N, K)')
    return 0 if same_labels else 1


if __name__ == '__main__':
    sys.exit(main())
