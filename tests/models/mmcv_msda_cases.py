"""MMDetection's own models at test size, for the tests of the switch.

Each model is built from mmdet 3.3.0's own config file (DINO, DDQ-DETR,
Mask2Former, Deformable DETR), shrunk the same way for every run that is
compared (ResNet-18 of width 16, one or two layers, few queries, small
images) and without pretrained weights. ``run_model`` records what a model
predicts, loses and backpropagates on a padded batch of two images, so a
test can compare a run with the switch off against one with it on.
"""
import importlib
import os.path as osp
import sys
from typing import Callable, Dict, List, Tuple

import torch
from mmcv.ops import MultiScaleDeformableAttention

from testkit import REPO

# The benchmark of these models builds them and their data: the tests
# build them the same way, at test size.
TOOLS = osp.join(REPO, 'tools', 'analysis_tools')
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)
benchmark = importlib.import_module('benchmark_mmcv_models')

CONFIGS = {
    'dino':
    'dino/dino-4scale_r50_8xb2-12e_coco.py',
    'ddq_detr':
    'ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py',
    'mask2former':
    'mask2former/mask2former_r50_8xb2-lsj-50e_coco.py',
    'deformable_detr':
    'deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
}
# Two images of different sizes: the batch is padded, so the attention
# sees padding masks and valid ratios below one.
IMAGE_SIZES = [(96, 128), (80, 104)]
NUM_CLASSES = 5
# ResNet-18 of width 16: channels of its stages 1 to 4.
STAGE_CHANNELS = [16, 32, 64, 128]


def _shrink_detr(model_cfg) -> None:
    """DINO, DDQ-DETR and Deformable DETR at test size (mmdet layout).

    The width stays 256: the two-stage proposals embed positions with a
    fixed 128 features per coordinate.
    """
    model_cfg.num_queries = 30
    model_cfg.backbone.update(depth=18, base_channels=16, init_cfg=None)
    model_cfg.neck.in_channels = STAGE_CHANNELS[1:]
    model_cfg.encoder.num_layers = 1
    # DDQ-DETR needs two decoder layers (its distinct query selection).
    model_cfg.decoder.num_layers = 2
    for layer_cfg in (model_cfg.encoder.layer_cfg,
                      model_cfg.decoder.layer_cfg):
        layer_cfg.ffn_cfg.feedforward_channels = 256
        # Dropout draws random numbers: none, so that runs compare.
        layer_cfg.ffn_cfg.ffn_drop = 0.0
        for name in ('self_attn_cfg', 'cross_attn_cfg'):
            if name in layer_cfg:
                layer_cfg[name].dropout = 0.0
    model_cfg.bbox_head.num_classes = NUM_CLASSES
    if 'dn_cfg' in model_cfg:
        model_cfg.dn_cfg.group_cfg.num_dn_queries = 10
    model_cfg.test_cfg.max_per_img = 20


def _shrink_mask2former(model_cfg) -> None:
    """Mask2Former (instance segmentation) at test size."""
    model_cfg.backbone.update(depth=18, base_channels=16, init_cfg=None)
    head = model_cfg.panoptic_head
    head.in_channels = STAGE_CHANNELS
    head.num_queries = 20
    head.num_things_classes = NUM_CLASSES
    head.loss_cls.class_weight = [1.0] * NUM_CLASSES + [0.1]
    head.pixel_decoder.encoder.num_layers = 1
    head.transformer_decoder.num_layers = 2
    model_cfg.panoptic_fusion_head.num_things_classes = NUM_CLASSES
    model_cfg.train_cfg.num_points = 256
    benchmark.pad_training_batches(model_cfg, 128, 128)
    model_cfg.test_cfg.max_per_image = 20


def build_model(name: str, perturbation: float = 0.02) -> torch.nn.Module:
    """mmdet's model ``name`` at test size, with random weights.

    Args:
        name (str): a key of ``CONFIGS``.
        perturbation (float): standard deviation of the noise added to
            every parameter: mmcv's initialisation zeroes the attention
            weights and offsets' weights, which would hide them from the
            comparison.

    Returns:
        nn.Module: the detector on the CPU.
    """
    shrink = _shrink_mask2former if name == 'mask2former' else _shrink_detr
    torch.manual_seed(0)
    model = benchmark.build_model(CONFIGS[name], shrink)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * perturbation)
    return model


def count_attention_modules(model: torch.nn.Module) -> int:
    """Number of mmcv MultiScaleDeformableAttention modules in ``model``."""
    return sum(
        isinstance(module, MultiScaleDeformableAttention)
        for module in model.modules())


def make_batch(model: torch.nn.Module, training: bool) -> dict:
    """Two random images of different sizes with a box and its mask each,
    preprocessed.

    Returns:
        dict: ``inputs`` (2, 3, H, W) padded and ``data_samples``.
    """
    return benchmark.make_data(model, IMAGE_SIZES, training)


def predictions(model: torch.nn.Module) -> List[Dict[str, torch.Tensor]]:
    """``predict`` on the padded batch: per image, its result tensors."""
    data = make_batch(model, training=False)
    model.eval()
    with torch.no_grad():
        results = model.predict(data['inputs'], data['data_samples'])
    outputs = []
    for result in results:
        instances = result.pred_instances
        outputs.append({
            key: instances[key].float()
            for key in ('scores', 'labels', 'bboxes', 'masks')
            if key in instances
        })
    return outputs


def losses_and_gradients(
    model: torch.nn.Module
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """``loss`` and ``backward`` on the padded batch.

    The random numbers the loss draws (DINO's denoising queries,
    Mask2Former's sampled points) are seeded the same for every call.

    Returns:
        tuple[dict, dict]: every loss term (a tensor), and the gradient of
        every parameter that has one.
    """
    data = make_batch(model, training=True)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    losses = model.loss(data['inputs'], data['data_samples'])
    total, _ = model.parse_losses(losses)
    total.backward()
    gradients = {
        name: parameter.grad.clone()
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }
    # A term may be a list (DDQ-DETR's auxiliary head: one per layer).
    losses = {
        key: torch.stack(value) if isinstance(value, list) else value
        for key, value in losses.items()
    }
    return {key: value.detach() for key, value in losses.items()}, gradients


def run_model(model: torch.nn.Module) -> dict:
    """Predictions, losses and gradients of one run."""
    losses, gradients = losses_and_gradients(model)
    return dict(
        predictions=predictions(model), losses=losses, gradients=gradients)


def counting_calls(module, name: str) -> Tuple[Callable, List[int]]:
    """A wrapper of ``module.name`` that counts its calls.

    Returns:
        tuple: the wrapper (to set in place of ``module.name``) and a
        one-element list holding the count.
    """
    original = getattr(module, name)
    count = [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    return counted, count
