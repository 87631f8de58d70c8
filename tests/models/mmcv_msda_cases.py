"""MMDetection's own models at test size, for the tests of the switch.

Each model is built from mmdet 3.3.0's own config file (DINO, DDQ-DETR,
Mask2Former, Deformable DETR), shrunk the same way for every run that is
compared (ResNet-18 of width 16, one or two layers, few queries, small
images) and without pretrained weights. ``run_model`` records what a model
predicts, loses and backpropagates on a padded batch of two images, so a
test can compare a run with the switch off against one with it on.
"""
import os.path as osp
from typing import Callable, Dict, List, Tuple

import mmdet
import numpy as np
import torch
from mmcv.ops import MultiScaleDeformableAttention
from mmdet.structures import DetDataSample
from mmdet.structures.mask import BitmapMasks
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

MMDET_CONFIGS = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs')
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
    # Training pads every batch to this size (1024 in the config).
    model_cfg.data_preprocessor.batch_augments[0].size = (128, 128)
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
    model_cfg = Config.fromfile(osp.join(MMDET_CONFIGS, CONFIGS[name])).model
    if name == 'mask2former':
        _shrink_mask2former(model_cfg)
    else:
        _shrink_detr(model_cfg)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        model = MODELS.build(model_cfg)
    model.init_weights()
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
    """Two random images with two boxes (and masks) each, preprocessed.

    Returns:
        dict: ``inputs`` (2, 3, H, W) padded and ``data_samples``.
    """
    generator = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for height, width in IMAGE_SIZES:
        inputs.append(
            torch.randint(0, 256, (3, height, width),
                          generator=generator).byte())
        boxes = torch.tensor(
            [[0.1 * width, 0.2 * height, 0.6 * width, 0.7 * height],
             [0.4 * width, 0.1 * height, 0.9 * width, 0.5 * height]])
        masks = np.zeros((2, height, width), dtype=np.uint8)
        for index, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[index, y1:y2, x1:x2] = 1
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(height, width),
                ori_shape=(height, width),
                scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=boxes,
            labels=torch.tensor([1, 3]),
            masks=BitmapMasks(masks, height, width))
        samples.append(sample)
    return model.data_preprocessor(
        dict(inputs=inputs, data_samples=samples), training)


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
