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
from typing import Dict, List, Optional, Tuple

from mmdet.structures import OptSampleList
from torch import Tensor

from ddetr_plugin.registry import MODELS
from .config_checks import check_flag, check_positive_int, transformer_config
from .detr_base import DetrDetectorBase, build_with


@MODELS.register_module()
class DeformableDETR(DetrDetectorBase):
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
        fast_backbone_inference (bool): Fold the backbone's batch norms
            for CPU inference (:class:`DetrDetectorBase`). Defaults to True.
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
                 init_cfg: Optional[dict] = None,
                 fast_backbone_inference: bool = True) -> None:
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
            data_preprocessor=data_preprocessor,
            init_cfg=init_cfg,
            fast_backbone_inference=fast_backbone_inference)
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.with_box_refine = with_box_refine
        self.as_two_stage = as_two_stage
        self.train_cfg = train_cfg
        self.test_cfg = test_cfg

        self.backbone = MODELS.build(backbone)
        self.neck = build_with(neck, dict(num_outs=num_feature_levels),
                               'model.neck',
                               'one neck output per feature level')
        self.transformer = build_with(
            transformer,
            dict(
                num_feature_levels=num_feature_levels,
                num_queries=num_queries,
                as_two_stage=as_two_stage), 'model.transformer',
            'set by num_feature_levels, num_queries and as_two_stage of '
            'the detector')
        self.bbox_head = build_with(
            bbox_head, self._head_args(), 'model.bbox_head',
            'set by with_box_refine and as_two_stage of the detector')
        self._check_widths()

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
