"""What the plugin's DETR-family detectors share.

A detector here is backbone -> neck -> ``run_transformer`` -> head; the
subclass defines ``run_transformer`` (features to the head's inputs) and
builds its components; this base runs the stages for training, inference
and the raw forward, masks the padding of batched images, and loads
weights saved in MMDetection's layout (renamed in memory).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmdet.models.detectors.base import BaseDetector
from mmdet.structures import OptSampleList, SampleList
from mmengine.logging import print_log
from torch import Tensor

from ddetr_plugin.converters.in_memory import convert_in_place
from ddetr_plugin.registry import MODELS
from .backbone_folding import BackboneInference
from .config_checks import check_flag, check_training_classes


def build_with(cfg: dict, required: dict, component: str,
               flag_hint: str) -> object:
    """Build ``cfg`` with ``required`` arguments, refusing contradictions.

    Args:
        cfg (dict): The component's config.
        required (dict): Arguments the detector's flags fix.
        component (str): Config path of the component, for the message.
        flag_hint (str): Which detector flags fix them, for the message.

    Returns:
        The built module.
    """
    cfg = dict(cfg)
    for name, value in required.items():
        if name in cfg and cfg[name] != value:
            raise ValueError(
                f'{component}.{name}={cfg[name]!r} contradicts the '
                f'detector, which needs {name}={value!r} ({flag_hint}); '
                f'remove {name} from {component} or make it {value!r}.')
        cfg[name] = value
    return MODELS.build(cfg)


def _convert_foreign_weights(module, state_dict, prefix, *args) -> None:
    """Load-time hook: rename mmdet-layout weights for ``module``.

    Runs for every loader (``load_state_dict``, MMEngine's ``load_from``,
    ``--resume``, DetInferencer, init_detector) before the weights are
    matched to parameters.
    """
    message = convert_in_place(state_dict, prefix, module)
    if message is not None:
        print_log(message, logger='current')


class DetrDetectorBase(BaseDetector):
    """Stages shared by the DETR-family detectors.

    Subclasses build ``backbone``, ``neck`` and ``bbox_head`` and define
    :meth:`run_transformer`, whose dict holds the head's inputs (at least
    ``hidden_states`` and ``references``).

    Args:
        data_preprocessor (dict, optional): Data preprocessor config.
        init_cfg (dict, optional): Initialisation config.
        fast_backbone_inference (bool): Run the backbone, in eval mode on
            the CPU, with its batch norms folded into the convolutions and
            channels-last memory (the same function to float rounding;
            see :mod:`.backbone_folding`). False runs it as built.
            Defaults to True.
    """

    def __init__(self,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None,
                 fast_backbone_inference: bool = True) -> None:
        check_flag('model.fast_backbone_inference', fast_backbone_inference)
        super().__init__(
            data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        # Not a module: holds a traced graph of the backbone's own modules.
        self.backbone_inference = BackboneInference(fast_backbone_inference)
        self.register_load_state_dict_pre_hook(_convert_foreign_weights)
        # Configs without DatasetCheckHook (mmdet's) still stop at once.
        self.register_forward_pre_hook(check_training_classes)

    def run_transformer(self, features: Tuple[Tensor, ...],
                        batch_data_samples: OptSampleList) -> Dict:
        """From neck features to the head's inputs (``hidden_states``,
        ``references`` and whatever else the head's ``loss`` takes)."""
        raise NotImplementedError

    # Stage 0: features.
    def extract_feat(self, batch_inputs: Tensor) -> Tuple[Tensor, ...]:
        """Backbone and neck.

        Args:
            batch_inputs (Tensor): (bs, 3, h, w) normalised, padded images.

        Returns:
            tuple[Tensor]: The neck's maps (bs, embed_dims, h_l, w_l).
        """
        return self.neck(self.backbone_inference(self.backbone, batch_inputs))

    # Stage 1: padding masks.
    @classmethod
    def padding_masks(
            cls, features: Tuple[Tensor, ...],
            batch_data_samples: OptSampleList) -> Optional[List[Tensor]]:
        """Per-level masks of the padding added to batch the images.

        Args:
            features (tuple[Tensor]): Maps (bs, embed_dims, h_l, w_l).
            batch_data_samples (list[DetDataSample], optional): Give each
                image's ``img_shape`` and the ``batch_input_shape``.

        Returns:
            list[Tensor] or None: Masks (bs, h_l, w_l) bool, True at padding;
            None when no image is padded, which spares the masking work.
        """
        if not batch_data_samples:
            return None
        if 'batch_input_shape' not in batch_data_samples[0]:
            raise ValueError(
                f'{cls.__name__} needs batch_input_shape in the data samples '
                'to mask the padding; got samples without it. Pass the batch '
                'through model.data_preprocessor (DetDataPreprocessor) '
                'first, or call the model with mode=... as the runner does.')
        padded_height, padded_width = batch_data_samples[0].batch_input_shape
        image_shapes = [sample.img_shape[:2] for sample in batch_data_samples]
        if all(shape == (padded_height, padded_width)
               for shape in map(tuple, image_shapes)):
            return None
        return cls.masks_of_image_shapes(
            features, torch.as_tensor(image_shapes, device=features[0].device),
            (padded_height, padded_width))

    @staticmethod
    def masks_of_image_shapes(features: Sequence[Tensor], image_shapes: Tensor,
                              padded_shape: Tuple[int, int]) -> List[Tensor]:
        """Per-level padding masks from each image's unpadded size.

        Tensor arithmetic only, so that an exported model builds the masks
        from image sizes given at run time.

        Args:
            features (Sequence[Tensor]): Maps (bs, embed_dims, h_l, w_l).
            image_shapes (Tensor): (bs, 2), (height, width) of each image,
                at the top left of the padded batch.
            padded_shape (tuple[int, int]): (height, width) of the padded
                batch (symbolic under ``torch.export``).

        Returns:
            list[Tensor]: Masks (bs, h_l, w_l) bool, True at padding.
        """
        padded_height, padded_width = padded_shape
        device = features[0].device
        rows = torch.arange(padded_height, device=device).view(1, -1, 1)
        columns = torch.arange(padded_width, device=device).view(1, 1, -1)
        masks = (rows >= image_shapes[:, 0].view(-1, 1, 1)) | (
            columns >= image_shapes[:, 1].view(-1, 1, 1))
        masks = masks.to(features[0].dtype)
        # Nearest resizing keeps at least one valid row and column per
        # image on every level, however small the image.
        return [
            F.interpolate(masks[None],
                          size=feature.shape[-2:]).to(torch.bool)[0]
            for feature in features
        ]

    # Last stage: the head.
    def loss(self, batch_inputs: Tensor,
             batch_data_samples: SampleList) -> Dict[str, Tensor]:
        """Losses of a batch with ground truth.

        Args:
            batch_inputs (Tensor): (bs, 3, h, w) normalised, padded images.
            batch_data_samples (list[DetDataSample]): Ground truth and shapes.

        Returns:
            dict[str, Tensor]: Loss terms of every decoder layer (and of the
            encoder's proposals in two-stage Deformable DETR).
        """
        head_inputs = self.run_transformer(
            self.extract_feat(batch_inputs), batch_data_samples)
        return self.bbox_head.loss(
            **head_inputs, batch_data_samples=batch_data_samples)

    def predict(self,
                batch_inputs: Tensor,
                batch_data_samples: SampleList,
                rescale: bool = True) -> SampleList:
        """Detections of a batch.

        Args:
            batch_inputs (Tensor): (bs, 3, h, w) normalised, padded images.
            batch_data_samples (list[DetDataSample]): Image metadata.
            rescale (bool): Whether boxes are in original image pixels.
                Defaults to True.

        Returns:
            list[DetDataSample]: The samples with ``pred_instances`` (scores,
            labels, bboxes as (x1, y1, x2, y2)).
        """
        head_inputs = self.run_transformer(
            self.extract_feat(batch_inputs), batch_data_samples)
        results = self.bbox_head.predict(
            head_inputs['hidden_states'],
            head_inputs['references'],
            batch_data_samples=batch_data_samples,
            rescale=rescale)
        return self.add_pred_to_datasample(batch_data_samples, results)

    def _forward(self,
                 batch_inputs: Tensor,
                 batch_data_samples: OptSampleList = None) -> Tuple[Tensor]:
        """Raw head outputs, without post-processing.

        Args:
            batch_inputs (Tensor): (bs, 3, h, w) normalised, padded images.
            batch_data_samples (list[DetDataSample], optional): Image
                metadata; without it the images count as unpadded.

        Returns:
            tuple[Tensor]: The head's ``forward`` outputs: every decoder
            layer's class logits and normalised boxes.
        """
        head_inputs = self.run_transformer(
            self.extract_feat(batch_inputs), batch_data_samples)
        return self.bbox_head.forward(head_inputs['hidden_states'],
                                      head_inputs['references'])
