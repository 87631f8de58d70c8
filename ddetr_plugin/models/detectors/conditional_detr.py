"""Conditional DETR, the detector (Meng et al., ICCV 2021).

Backbone (C5, or dilated C5 for DC5) -> a 1x1 projection (the neck, one
map) -> :class:`ConditionalDetrTransformer` (DETR's encoder, the
conditional decoder) -> :class:`ConditionalDETRHead`. The stages read top
to bottom in :meth:`ConditionalDETR.run_transformer`.
"""
from typing import Dict, List, Optional, Tuple

from mmdet.structures import OptSampleList
from torch import Tensor

from ddetr_plugin.registry import MODELS
from .config_checks import check_positive_int, transformer_config
from .detr_base import DetrDetectorBase, build_with


@MODELS.register_module()
class ConditionalDETR(DetrDetectorBase):
    """Conditional DETR.

    The constructor also takes mmdet 3.3.0's ``ConditionalDETR``
    arguments (``encoder``, ``decoder`` and ``positional_encoding`` instead
    of ``transformer``), so mmdet's own configs build this model, and
    weights saved from mmdet's model load into it, renamed in memory.

    Args:
        backbone (dict): Backbone config, e.g. mmdet's ResNet with
            ``out_indices=(3, )``.
        neck (dict): Neck config with one output map, e.g. mmdet's
            ``ChannelMapper`` (1x1 convolution with bias, no norm).
        transformer (dict, optional): :class:`ConditionalDetrTransformer`
            config without ``num_queries``, which comes from this detector.
        bbox_head (dict): Head config, ``ConditionalDETRHead``, without
            ``train_cfg`` and ``test_cfg``, which come from this detector.
        encoder (dict, optional): mmdet-style encoder config, instead of
            ``transformer``.
        decoder (dict, optional): mmdet-style decoder config, instead of
            ``transformer``.
        positional_encoding (dict, optional): mmdet-style positional
            encoding config, instead of ``transformer``.
        num_queries (int): Object queries. Defaults to 300.
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
                 train_cfg: Optional[dict] = None,
                 test_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None,
                 fast_backbone_inference: bool = True) -> None:
        check_positive_int('model.num_queries', num_queries)
        if bbox_head is None:
            raise ValueError('ConditionalDETR needs model.bbox_head, e.g. '
                             "dict(type='ConditionalDETRHead', "
                             'num_classes=80).')
        transformer = transformer_config(
            transformer,
            encoder,
            decoder,
            positional_encoding,
            transformer_type='ConditionalDetrTransformer',
            detector='ConditionalDETR')
        super().__init__(
            data_preprocessor=data_preprocessor,
            init_cfg=init_cfg,
            fast_backbone_inference=fast_backbone_inference)
        self.num_queries = num_queries
        self.train_cfg = train_cfg
        self.test_cfg = test_cfg

        self.backbone = MODELS.build(backbone)
        self.neck = build_with(neck, dict(num_outs=1), 'model.neck',
                               'Conditional DETR reads one feature map')
        self.transformer = build_with(transformer,
                                      dict(num_queries=num_queries),
                                      'model.transformer',
                                      'set by num_queries of the detector')
        self.bbox_head = build_with(
            bbox_head, dict(train_cfg=train_cfg, test_cfg=test_cfg),
            'model.bbox_head', 'set by train_cfg and test_cfg of the model')
        widths = dict(transformer=self.transformer.embed_dims)
        for name in ('neck.out_channels', 'bbox_head.embed_dims'):
            module, attribute = name.split('.')
            value = getattr(getattr(self, module), attribute, None)
            if value is not None:
                widths[name] = value
        if len(set(widths.values())) != 1:
            raise ValueError('ConditionalDETR: the neck, the transformer '
                             'and the head must have the same width '
                             f'(embed_dims); got {widths}.')

    def run_transformer(self,
                        features: Tuple[Tensor, ...],
                        batch_data_samples: OptSampleList,
                        masks: Optional[List[Tensor]] = None) -> Dict:
        """From the neck's map to the head's inputs.

        Args:
            features (tuple[Tensor]): One map (bs, embed_dims, h, w).
            batch_data_samples (list[DetDataSample], optional): Image and
                padded shapes.
            masks (list[Tensor], optional): One padding mask (bs, h, w)
                bool, True at padding, given instead of the data samples'
                shapes (an exported model, whose image sizes are an input
                tensor: :meth:`masks_of_image_shapes`).

        Returns:
            dict: ``hidden_states`` (num_decoder_layers, bs, num_queries,
            embed_dims) and ``references`` (bs, num_queries, 2).
        """
        if masks is None:
            masks = self.padding_masks(features, batch_data_samples)
        hidden_states, references = self.transformer(
            features[-1], None if masks is None else masks[-1])
        return dict(hidden_states=hidden_states, references=references)
