"""Deformable DETR, the detector: backbone, neck, transformer and head.

The forward pass reads top to bottom in :meth:`DeformableDETR.run_transformer`:
prepare multi-scale inputs and padding masks -> encoder -> queries (or
proposals) -> decoder -> head.

The variant flags live here and nowhere else: ``with_box_refine`` and
``as_two_stage`` decide how the head must be built (separate prediction
layers per decoder layer, one extra for the encoder's proposals), so the
detector passes those head arguments explicitly (see :meth:`_head_args`),
and refuses a config that sets them otherwise.
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
from .config_checks import check_flag, check_positive_int, transformer_config


def _build_with(cfg: dict, required: dict, component: str,
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


@MODELS.register_module()
class DeformableDETR(BaseDetector):
    """Deformable DETR (Zhu et al., ICLR 2021).

    The constructor also takes mmdet 3.3.0's ``DeformableDETR`` arguments,
    so that mmdet's own configs build this model: ``encoder``, ``decoder``
    and ``positional_encoding`` instead of ``transformer``, and any neck
    (mmdet's ``ChannelMapper``). Weights saved from mmdet's model load into
    it directly: they are renamed in memory while loading (see
    :mod:`ddetr_plugin.converters.in_memory`).

    Args:
        backbone (dict): Backbone config, e.g. mmdet's ResNet.
        neck (dict): Neck config, e.g. :class:`DeformableDetrNeck`; its
            ``num_outs`` must equal ``num_feature_levels``.
        transformer (dict, optional): :class:`DeformableDetrTransformer`
            config, without ``num_feature_levels``, ``num_queries`` and
            ``as_two_stage``, which come from this detector.
        bbox_head (dict): Head config, e.g. ``DeformableDETRHead``, without
            ``share_pred_layer``, ``num_pred_layer``, ``as_two_stage``,
            ``train_cfg`` and ``test_cfg``, which come from this detector.
        encoder (dict, optional): mmdet-style encoder config, instead of
            ``transformer``.
        decoder (dict, optional): mmdet-style decoder config, instead of
            ``transformer``.
        positional_encoding (dict, optional): mmdet-style positional
            encoding config, instead of ``transformer``.
        num_queries (int): Object queries. Defaults to 300.
        num_feature_levels (int): Feature levels. Defaults to 4.
        with_box_refine (bool): Whether every decoder layer refines the
            boxes of the previous one. Defaults to False.
        as_two_stage (bool): Whether the queries are the encoder's best
            proposals. Defaults to False.
        train_cfg (dict, optional): Training config of the head (assigner).
        test_cfg (dict, optional): Testing config of the head.
        data_preprocessor (dict, optional): Data preprocessor config.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 backbone: dict,
                 neck: dict,
                 transformer: Optional[dict] = None,
                 bbox_head: Optional[dict] = None,
                 encoder: Optional[dict] = None,
                 decoder: Optional[dict] = None,
                 positional_encoding: Optional[dict] = None,
                 num_queries: int = 300,
                 num_feature_levels: int = 4,
                 with_box_refine: bool = False,
                 as_two_stage: bool = False,
                 train_cfg: Optional[dict] = None,
                 test_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        # Checked first: a mistyped --cfg-options value would otherwise
        # fail deep inside a component, far from the key that caused it.
        check_positive_int('model.num_queries', num_queries)
        check_positive_int('model.num_feature_levels', num_feature_levels)
        check_flag('model.with_box_refine', with_box_refine)
        check_flag('model.as_two_stage', as_two_stage)
        if bbox_head is None:
            raise ValueError('DeformableDETR needs model.bbox_head, e.g. '
                             "dict(type='DeformableDETRHead', "
                             'num_classes=80).')
        transformer = transformer_config(transformer, encoder, decoder,
                                         positional_encoding)
        super().__init__(
            data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.with_box_refine = with_box_refine
        self.as_two_stage = as_two_stage
        self.train_cfg = train_cfg
        self.test_cfg = test_cfg

        self.backbone = MODELS.build(backbone)
        self.neck = _build_with(neck, dict(num_outs=num_feature_levels),
                                'model.neck',
                                'one neck output per feature level')
        self.transformer = _build_with(
            transformer,
            dict(
                num_feature_levels=num_feature_levels,
                num_queries=num_queries,
                as_two_stage=as_two_stage), 'model.transformer',
            'set by num_feature_levels, num_queries and as_two_stage of '
            'the detector')
        self.bbox_head = _build_with(
            bbox_head, self._head_args(), 'model.bbox_head',
            'set by with_box_refine and as_two_stage of the detector')
        self._check_widths()
        self.register_load_state_dict_pre_hook(_convert_foreign_weights)

    def _head_args(self) -> dict:
        """Head arguments that follow from the detector's flags."""
        num_decoder_layers = self._decoder_layers()
        return dict(
            # Refinement trains one prediction layer per decoder layer;
            # without it, every decoder layer shares the same layers.
            share_pred_layer=not self.with_box_refine,
            # Two-stage scores the encoder's proposals with one more layer.
            num_pred_layer=num_decoder_layers + int(self.as_two_stage),
            as_two_stage=self.as_two_stage,
            train_cfg=self.train_cfg,
            test_cfg=self.test_cfg)

    def _decoder_layers(self) -> int:
        """Number of decoder layers, known once the transformer is built."""
        return self.transformer.decoder.num_layers

    def _check_widths(self) -> None:
        """Raise a ValueError when the components' widths disagree."""
        widths = dict(transformer=self.transformer.embed_dims)
        if hasattr(self.neck, 'out_channels'):
            widths['neck.out_channels'] = self.neck.out_channels
        if hasattr(self.bbox_head, 'embed_dims'):
            widths['bbox_head.embed_dims'] = self.bbox_head.embed_dims
        if len(set(widths.values())) != 1:
            raise ValueError('DeformableDETR: the neck, the transformer '
                             'and the head must have the same width '
                             f'(embed_dims); got {widths}.')

    # Stage 0: features.
    def extract_feat(self, batch_inputs: Tensor) -> Tuple[Tensor, ...]:
        """Backbone and neck.

        Args:
            batch_inputs (Tensor): (bs, 3, h, w) normalised, padded images.

        Returns:
            tuple[Tensor]: num_feature_levels maps (bs, embed_dims, h_l, w_l).
        """
        return self.neck(self.backbone(batch_inputs))

    # Stage 1: padding masks.
    @staticmethod
    def padding_masks(
            features: Tuple[Tensor, ...],
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
                'DeformableDETR needs batch_input_shape in the data samples '
                'to mask the padding; got samples without it. Pass the batch '
                'through model.data_preprocessor (DetDataPreprocessor) '
                'first, or call the model with mode=... as the runner does.')
        padded_height, padded_width = batch_data_samples[0].batch_input_shape
        image_shapes = [sample.img_shape[:2] for sample in batch_data_samples]
        if all(shape == (padded_height, padded_width)
               for shape in map(tuple, image_shapes)):
            return None
        return DeformableDETR.masks_of_image_shapes(
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

    def run_transformer(self,
                        features: Tuple[Tensor, ...],
                        batch_data_samples: OptSampleList,
                        masks: Optional[List[Tensor]] = None) -> Dict:
        """Stages 1-4: from neck features to the head's inputs.

        Args:
            features (tuple[Tensor]): Maps (bs, embed_dims, h_l, w_l).
            batch_data_samples (list[DetDataSample], optional): Image and
                padded shapes.
            masks (list[Tensor], optional): Padding masks (bs, h_l, w_l)
                bool per level, True at padding, given instead of the data
                samples' shapes (an exported model, whose image sizes are
                an input tensor: :meth:`masks_of_image_shapes`).

        Returns:
            dict: ``hidden_states`` (num_decoder_layers, bs, num_queries,
            embed_dims), ``references`` (num_decoder_layers + 1 tensors
            (bs, num_queries, 2 or 4)), and ``enc_outputs_class``
            (bs, num_keys, num_classes) and ``enc_outputs_coord``
            (bs, num_keys, 4), both None unless two-stage.
        """
        transformer = self.transformer
        if masks is None:
            masks = self.padding_masks(features, batch_data_samples)
        inputs = transformer.flatten_levels(list(features), masks)
        memory = transformer.encode(inputs)
        proposal_branches = {}
        if self.as_two_stage:
            # The head's extra prediction layers score the proposals.
            proposal_branches = dict(
                proposal_cls_branch=self.bbox_head.cls_branches[
                    self._decoder_layers()],
                proposal_reg_branch=self.bbox_head.reg_branches[
                    self._decoder_layers()])
        queries = transformer.initial_queries(memory, inputs,
                                              **proposal_branches)
        hidden_states, references = transformer.decode(
            queries,
            memory,
            inputs,
            reg_branches=self.bbox_head.reg_branches
            if self.with_box_refine else None)
        return dict(
            hidden_states=hidden_states,
            references=references,
            enc_outputs_class=queries.enc_outputs_class,
            enc_outputs_coord=queries.enc_outputs_coord)

    # Stage 5: the head.
    def loss(self, batch_inputs: Tensor,
             batch_data_samples: SampleList) -> Dict[str, Tensor]:
        """Losses of a batch with ground truth.

        Args:
            batch_inputs (Tensor): (bs, 3, h, w) normalised, padded images.
            batch_data_samples (list[DetDataSample]): Ground truth and shapes.

        Returns:
            dict[str, Tensor]: Loss terms of every decoder layer (and of the
            encoder's proposals in two-stage).
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
            tuple[Tensor]: The head's ``forward`` outputs.
        """
        head_inputs = self.run_transformer(
            self.extract_feat(batch_inputs), batch_data_samples)
        return self.bbox_head.forward(head_inputs['hidden_states'],
                                      head_inputs['references'])
