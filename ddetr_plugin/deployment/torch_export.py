"""``torch.export`` of the detector, with dynamic batch, height and width.

In Deformable DETR the plugin's op stays one node,
``ddetr_plugin::ms_deform_attn_forward``: its fake kernel gives the output
shape without running it, and the level sizes the model needs to size
tensors come from the feature maps' shapes, which ``torch.export`` keeps
symbolic. Conditional DETR's attention is dense (torch's
``scaled_dot_product_attention``) and needs no op of the plugin. The
exported program can be saved, loaded (after importing
``ddetr_plugin.ops``, which registers the op) and run, or handed to the
ONNX exporter.
"""
from typing import Optional

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from ddetr_plugin.ops import extension_error, extension_loaded
from .detection_wrapper import TensorDetector, full_image_shapes

# The exported model's inputs and outputs. ``input`` and the outputs are
# named as MMDeploy names them; ``image_shapes`` (bs, 2) gives each
# image's unpadded (height, width), from which the model masks the padding.
INPUT_NAME = 'input'
IMAGE_SHAPES_NAME = 'image_shapes'
INPUT_NAMES = (INPUT_NAME, IMAGE_SHAPES_NAME)
OUTPUT_NAMES = ('dets', 'labels')
# Limits of the dynamic axes. The smallest side is the detector's
# (:func:`min_dynamic_side`): at its largest stride or below, the smallest
# feature map has a side of 1, a size that torch.export specialises.
MAX_DYNAMIC_BATCH = 64
MAX_DYNAMIC_SIDE = 4096
# Side of the blank image that measures the detector's largest stride.
_STRIDE_PROBE_SIDE = 512
# Class name of the attention that runs the plugin's op: the plugin's, and
# mmcv's, which the plugin's op can serve (``ddetr_plugin.mmcv_patch``).
DEFORMABLE_ATTENTION = 'MultiScaleDeformableAttention'


def uses_deformable_attention(detector: nn.Module) -> bool:
    """Whether the detector holds multi-scale deformable attention.

    Only such a detector needs the compiled op to be exported, and only
    its ONNX file depends on how the op is written (``--sampling``);
    Conditional DETR's dense attention needs neither.

    Args:
        detector (nn.Module): The detector to export.

    Returns:
        bool: True for Deformable DETR, False for Conditional DETR.
    """
    return any(
        type(module).__name__ == DEFORMABLE_ATTENTION
        for module in detector.modules())


def check_exportable(detector: nn.Module) -> None:
    """Raise a RuntimeError when the detector cannot be exported as is.

    Args:
        detector (nn.Module): The ``DeformableDETR`` or
            ``ConditionalDETR`` to export.
    """
    if uses_deformable_attention(detector) and not extension_loaded():
        # The plain-PyTorch fallback reads level sizes from tensor values,
        # which torch.export cannot trace.
        raise RuntimeError(
            'Exporting needs the plugin\'s compiled op, which did not load '
            f'({extension_error()}); build it in the checkout with `pip '
            'install --no-build-isolation -e .` (or `make setup`).')
    if detector.training:
        raise RuntimeError('Export the detector in eval mode: call '
                           'detector.eval() first (dropout and batch norm '
                           'statistics differ in training mode).')


def example_images(height: int,
                   width: int,
                   batch_size: int = 1,
                   seed: int = 0) -> Tensor:
    """A random normalised image batch to trace the model with.

    Args:
        height (int): Image height.
        width (int): Image width.
        batch_size (int): Images. Use 2 or more for a dynamic batch:
            ``torch.export`` fixes a dimension it sees with size 1.
        seed (int): Seed of the values.

    Returns:
        Tensor: (batch_size, 3, height, width) float32.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, height, width, generator=generator)


def min_dynamic_side(detector: nn.Module) -> int:
    """Smallest image side a dynamic export of ``detector`` takes.

    One more than the largest stride of its feature maps, so that the
    smallest map keeps a side of at least 2: 65 px for Deformable DETR
    (stride 64), 33 for Conditional DETR R50 (C5, stride 32), 17 for DC5.
    The stride is measured on a blank image, not read from the config,
    so any backbone and neck count.

    Args:
        detector (nn.Module): In eval mode.

    Returns:
        int: The smallest height and width, in pixels.
    """
    side = _STRIDE_PROBE_SIDE
    parameter = next(detector.parameters())
    with torch.no_grad():
        features = detector.extract_feat(parameter.new_zeros(1, 3, side, side))
    smallest = min(min(feature.shape[-2:]) for feature in features)
    return -(-side // smallest) + 1


def check_dynamic_size(height: int, width: int, min_side: int = 1) -> None:
    """Raise a ValueError for an example size a dynamic export refuses.

    Args:
        height (int): Example image height.
        width (int): Example image width.
        min_side (int): The detector's :func:`min_dynamic_side`; the
            default 1 checks only the largest size (before the detector is
            built).
    """
    for name, side in (('height', height), ('width', width)):
        if side > MAX_DYNAMIC_SIDE:
            raise ValueError(
                f'A dynamic export traces images of at most '
                f'{MAX_DYNAMIC_SIDE} px a side, but the example {name} is '
                f'{side} (example {height}x{width}). Give --shape H W with '
                f'both sides at most {MAX_DYNAMIC_SIDE}; the model then takes '
                'any size up to it.')
        if side < min_side:
            raise ValueError(
                f'A dynamic export of this model traces images of '
                f'{min_side} to {MAX_DYNAMIC_SIDE} px a side, but the '
                f'example {name} is {side} (example {height}x{width}): '
                f'below {min_side} px its smallest feature map (stride '
                f'{min_side - 1}) has a side of 1, which torch.export '
                f'fixes. Give --shape H W with both sides in [{min_side}, '
                f'{MAX_DYNAMIC_SIDE}]; the model then takes any size in that '
                'range.')


def dynamic_image_shapes(min_side: int) -> dict:
    """Batch, height and width of the image batch, all dynamic, and the
    batch of ``image_shapes`` with it.

    Args:
        min_side (int): The smallest height and width
            (:func:`min_dynamic_side`).
    """
    batch = Dim('batch', min=1, max=MAX_DYNAMIC_BATCH)
    return {
        'images': {
            0: batch,
            2: Dim('height', min=min_side, max=MAX_DYNAMIC_SIDE),
            3: Dim('width', min=min_side, max=MAX_DYNAMIC_SIDE)
        },
        'image_shapes': {
            0: batch
        }
    }


def export_detector(detector: nn.Module,
                    images: Tensor,
                    dynamic: bool = False,
                    max_per_img: Optional[int] = None,
                    image_shapes: Optional[Tensor] = None) -> ExportedProgram:
    """``torch.export`` the detector's tensor forward.

    Args:
        detector (nn.Module): A ``DeformableDETR`` or ``ConditionalDETR``
            in eval mode, on CPU.
        images (Tensor): (bs, 3, h, w) example batch, normalised; with
            ``dynamic``, bs must be at least 2 and h, w in
            [:func:`min_dynamic_side`, 4096].
        dynamic (bool): Whether batch, height and width are dynamic.
            Defaults to False (the example's shape is fixed).
        max_per_img (int, optional): Detections per image; defaults to the
            head's ``test_cfg.max_per_img``.
        image_shapes (Tensor, optional): (bs, 2) int64 example sizes of the
            unpadded images; defaults to the full size. Only their shape
            is traced: the program takes any sizes.

    Returns:
        ExportedProgram: ``(images, image_shapes)`` -> ``(dets, labels)``,
        see :class:`TensorDetector`.
    """
    check_exportable(detector)
    if images.dim() != 4 or images.shape[1] != 3 or \
            images.dtype != torch.float32:
        raise ValueError('The example images must be a (bs, 3, h, w) '
                         'float32 batch; got '
                         f'{tuple(images.shape)} {images.dtype}.')
    dynamic_shapes = None
    if dynamic:
        if images.shape[0] < 2:
            raise ValueError(
                'A dynamic batch needs an example of at least 2 images '
                '(torch.export fixes a size-1 dimension); got '
                f'{images.shape[0]}.')
        min_side = min_dynamic_side(detector)
        check_dynamic_size(images.shape[2], images.shape[3], min_side)
        dynamic_shapes = dynamic_image_shapes(min_side)
    if image_shapes is None:
        image_shapes = full_image_shapes(images)
    wrapper = TensorDetector(detector, max_per_img).eval()
    with torch.no_grad():
        try:
            return torch.export.export(
                wrapper, (images, image_shapes), dynamic_shapes=dynamic_shapes)
        except Exception as error:
            _explain_backbone_failure(detector, images, error)
            raise


def _explain_backbone_failure(detector: nn.Module, images: Tensor,
                              error: Exception) -> None:
    """Raise a clearer error when the backbone alone cannot export."""
    try:
        torch.export.export(detector.backbone, (images, ))
    except Exception as backbone_error:
        raise RuntimeError(
            f'The backbone {type(detector.backbone).__name__} cannot be '
            f'traced by torch.export ({type(backbone_error).__name__}: '
            f'{str(backbone_error).splitlines()[0]}). Use a backbone whose '
            'forward has no Python control flow on tensor values (e.g. '
            'mmdet\'s ResNet), or fix that forward.') from error


def save_program(program: ExportedProgram, path: str) -> None:
    """Write an exported program to ``path`` (a ``.pt2`` file)."""
    torch.export.save(program, path)


def load_program(path: str) -> ExportedProgram:
    """Read an exported program; registers the plugin's op first.

    Args:
        path (str): A file written by :func:`save_program`.

    Returns:
        ExportedProgram: Call ``.module()(images, image_shapes)`` to run
        it.
    """
    if not extension_loaded():
        raise RuntimeError(
            f'Loading {path!r} needs the plugin\'s compiled op, which did not '
            f'load ({extension_error()}); build it with `pip install '
            '--no-build-isolation -e .`.')
    return torch.export.load(path)
