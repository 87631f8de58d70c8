"""The Deformable DETR transformer: everything between the neck and the head.

Four stages, each a method the detector calls in turn:

1. :meth:`DeformableDetrTransformer.flatten_levels`: feature maps and padding
   masks of all levels become one sequence with positional and level
   encodings;
2. :meth:`encode`: the deformable encoder turns it into the memory;
3. :meth:`initial_queries`: learned object queries and reference points, or,
   in two-stage mode, the top-scoring encoder positions as proposals;
4. :meth:`decode`: the decoder turns the queries into hidden states for the
   head, refining the references layer by layer if asked.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from ddetr_plugin.registry import MODELS
from .decoder import DeformableDetrDecoder
from .encoder import DeformableDetrEncoder, LevelShapes
from .ms_deform_attn import MultiScaleDeformableAttention
from .positional_encoding import (SinePositionalEncoding,
                                  proposal_positional_encoding)


class MultiScaleInputs(NamedTuple):
    """All feature levels as one sequence, and what locates each position.

    Attributes:
        features (Tensor): (bs, num_keys, embed_dims), levels flattened one
            after another, each row-major.
        positions (Tensor): (bs, num_keys, embed_dims), sine positional
            encoding plus the level's embedding.
        padding_mask (Tensor, optional): (bs, num_keys) bool, True at padded
            positions; None when no image of the batch is padded.
        spatial_shapes (Tensor): (num_levels, 2) int64, (h, w) per level.
        level_start_index (Tensor): (num_levels,) int64.
        valid_sizes (Tensor): (bs, num_levels, 2) int64, unpadded (w, h) of
            each image on each level.
        valid_ratios (Tensor): (bs, num_levels, 2), ``valid_sizes`` divided
            by (w, h) of the level.
        level_shapes (tuple[tuple[int, int]]): ``spatial_shapes`` as
            integers from the feature maps' shapes: code that sizes tensors
            by level reads these, which ``torch.export`` keeps symbolic,
            rather than tensor values. Empty when built without them.
    """
    features: Tensor
    positions: Tensor
    padding_mask: Optional[Tensor]
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_sizes: Tensor
    valid_ratios: Tensor
    level_shapes: LevelShapes = ()


class Queries(NamedTuple):
    """What the decoder starts from.

    Attributes:
        query (Tensor): (bs, num_queries, embed_dims) content queries.
        query_pos (Tensor): (bs, num_queries, embed_dims) positional queries.
        reference_points (Tensor): (bs, num_queries, 2) normalised (x, y),
            or (bs, num_queries, 4) normalised (cx, cy, w, h) in two-stage.
        enc_outputs_class (Tensor, optional): (bs, num_keys, num_classes)
            logits of every encoder position, two-stage only.
        enc_outputs_coord (Tensor, optional): (bs, num_keys, 4) normalised
            proposal boxes of every encoder position, two-stage only.
    """
    query: Tensor
    query_pos: Tensor
    reference_points: Tensor
    enc_outputs_class: Optional[Tensor] = None
    enc_outputs_coord: Optional[Tensor] = None


@MODELS.register_module()
class DeformableDetrTransformer(BaseModule):
    """Encoder, decoder, encodings and query initialisation.

    Args:
        encoder (dict): Arguments of :class:`DeformableDetrEncoder`.
        decoder (dict): Arguments of :class:`DeformableDetrDecoder`.
        positional_encoding (dict): Arguments of
            :class:`SinePositionalEncoding`; ``2 * num_feats`` must equal the
            encoder's ``embed_dims``.
        num_feature_levels (int): Levels coming from the neck. Defaults to 4.
        num_queries (int): Object queries (or proposals). Defaults to 300.
        as_two_stage (bool): Whether queries come from encoder proposals.
            Defaults to False.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 encoder: dict,
                 decoder: dict,
                 positional_encoding: dict,
                 num_feature_levels: int = 4,
                 num_queries: int = 300,
                 as_two_stage: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.encoder = DeformableDetrEncoder(**encoder)
        self.decoder = DeformableDetrDecoder(**decoder)
        self.positional_encoding = SinePositionalEncoding(
            **positional_encoding)
        self.embed_dims = self.encoder.embed_dims
        self.num_feature_levels = num_feature_levels
        self.num_queries = num_queries
        self.as_two_stage = as_two_stage
        self._check_config()

        # Drawn now as well as in init_weights, so that a model used without
        # init_weights never computes on uninitialised memory.
        self.level_embed = nn.Parameter(
            torch.randn(num_feature_levels, self.embed_dims))
        if as_two_stage:
            self.memory_trans_fc = nn.Linear(self.embed_dims, self.embed_dims)
            self.memory_trans_norm = nn.LayerNorm(self.embed_dims)
            self.pos_trans_fc = nn.Linear(self.embed_dims * 2,
                                          self.embed_dims * 2)
            self.pos_trans_norm = nn.LayerNorm(self.embed_dims * 2)
        else:
            # Each query is a (positional, content) pair of embeddings.
            self.query_embedding = nn.Embedding(num_queries,
                                                self.embed_dims * 2)
            self.reference_points_fc = nn.Linear(self.embed_dims, 2)
        self.reset_parameters()

    def _check_config(self) -> None:
        """Raise a ValueError when the components disagree."""
        levels = dict(
            num_feature_levels=self.num_feature_levels,
            encoder_num_levels=self.encoder.num_levels,
            decoder_num_levels=self.decoder.num_levels)
        if len(set(levels.values())) != 1:
            raise ValueError(
                'DeformableDetrTransformer: the detector\'s num_feature_levels'
                ' and num_levels of the encoder\'s self_attn_cfg and the '
                'decoder\'s cross_attn_cfg must be equal; got '
                f'{levels}.')
        if self.decoder.embed_dims != self.embed_dims or \
                2 * self.positional_encoding.num_feats != self.embed_dims:
            raise ValueError(
                'DeformableDetrTransformer: encoder and decoder embed_dims '
                'and 2 * positional_encoding.num_feats must be equal; got '
                f'{self.embed_dims}, {self.decoder.embed_dims} and '
                f'{2 * self.positional_encoding.num_feats}.')

    def init_weights(self) -> None:
        """Children's init configs first, then :meth:`reset_parameters`."""
        super().init_weights()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for every matrix, the paper's init for the attention.

        Called at construction too, so a model that is never passed through
        ``init_weights`` still starts from this initialisation.
        """
        for coder in (self.encoder, self.decoder):
            for parameter in coder.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.init_weights()
        if self.as_two_stage:
            nn.init.xavier_uniform_(self.memory_trans_fc.weight)
            nn.init.xavier_uniform_(self.pos_trans_fc.weight)
        else:
            nn.init.xavier_uniform_(self.reference_points_fc.weight)
            nn.init.zeros_(self.reference_points_fc.bias)
        nn.init.normal_(self.level_embed)

    def flatten_levels(self, features: List[Tensor],
                       masks: Optional[List[Tensor]]) -> MultiScaleInputs:
        """Stage 1: one sequence of all levels, with encodings.

        Args:
            features (list[Tensor]): num_levels maps (bs, embed_dims, h, w).
            masks (list[Tensor], optional): num_levels masks (bs, h, w) bool,
                True at padding; None when no image is padded.

        Returns:
            MultiScaleInputs: The flattened inputs.
        """
        if len(features) != self.num_feature_levels:
            raise ValueError(
                f'DeformableDetrTransformer was built for '
                f'num_feature_levels={self.num_feature_levels} but the neck '
                f'gave {len(features)} levels; make the neck\'s num_outs '
                'equal to num_feature_levels.')
        batch_size = features[0].shape[0]
        device = features[0].device
        flat_features, flat_positions, flat_masks, valid_sizes = [], [], [], []
        # Unpadded maps are encoded per axis when the encoding can (the
        # plugin's SinePositionalEncoding): same values, less work.
        encode_unpadded = getattr(self.positional_encoding, 'forward_unpadded',
                                  None)
        for level, feature in enumerate(features):
            height, width = feature.shape[-2:]
            if masks is None:
                mask = torch.zeros((batch_size, height, width),
                                   dtype=torch.bool,
                                   device=device)
            else:
                mask = masks[level]
                flat_masks.append(mask.flatten(1))
            if masks is None and encode_unpadded is not None:
                position = encode_unpadded(batch_size, height, width, device)
            else:
                position = self.positional_encoding(mask)
            position = position.to(feature.dtype)
            # (bs, c, h, w) -> (bs, h * w, c)
            flat_features.append(feature.flatten(2).transpose(1, 2))
            flat_positions.append(
                position.flatten(2).transpose(1, 2) + self.level_embed[level])
            # Unpadded extent: the first column and row tell it all.
            valid_sizes.append(
                torch.stack(((~mask[:, 0, :]).sum(1), (~mask[:, :, 0]).sum(1)),
                            -1))
        level_shapes = tuple(
            (feature.shape[-2], feature.shape[-1]) for feature in features)
        spatial_shapes = torch.tensor(
            level_shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1),
                                       spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_sizes = torch.stack(valid_sizes, 1)
        return MultiScaleInputs(
            features=torch.cat(flat_features, 1),
            positions=torch.cat(flat_positions, 1),
            padding_mask=torch.cat(flat_masks, 1) if masks else None,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_sizes=valid_sizes,
            valid_ratios=valid_sizes.to(torch.float32) /
            spatial_shapes.flip(-1),
            level_shapes=level_shapes)

    def encode(self, inputs: MultiScaleInputs) -> Tensor:
        """Stage 2: the encoder's memory.

        Args:
            inputs (MultiScaleInputs): From :meth:`flatten_levels`.

        Returns:
            Tensor: (bs, num_keys, embed_dims).
        """
        return self.encoder(inputs.features, inputs.positions,
                            inputs.padding_mask, inputs.spatial_shapes,
                            inputs.level_start_index, inputs.valid_ratios,
                            inputs.level_shapes or None)

    def initial_queries(
            self,
            memory: Tensor,
            inputs: MultiScaleInputs,
            proposal_cls_branch: Optional[nn.Module] = None,
            proposal_reg_branch: Optional[nn.Module] = None) -> Queries:
        """Stage 3: the decoder's starting queries and references.

        Args:
            memory (Tensor): (bs, num_keys, embed_dims), encoder output.
            inputs (MultiScaleInputs): From :meth:`flatten_levels`.
            proposal_cls_branch (nn.Module, optional): Two-stage only: scores
                every encoder position, (..., embed_dims) -> (...,
                num_classes); the head's extra classification branch.
            proposal_reg_branch (nn.Module, optional): Two-stage only: box
                deltas of every position, (..., embed_dims) -> (..., 4).

        Returns:
            Queries: Queries, references and, in two-stage, the encoder's
            dense predictions.
        """
        batch_size = memory.shape[0]
        if not self.as_two_stage:
            query_pos, query = self.query_embedding.weight.split(
                self.embed_dims, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch_size, -1, -1)
            query = query.unsqueeze(0).expand(batch_size, -1, -1)
            return Queries(query, query_pos,
                           self.reference_points_fc(query_pos).sigmoid())
        if proposal_cls_branch is None or proposal_reg_branch is None:
            raise ValueError('A two-stage DeformableDetrTransformer needs the '
                             'head\'s proposal_cls_branch and '
                             'proposal_reg_branch; got None.')
        num_keys = memory.shape[1]
        if num_keys < self.num_queries:
            # Plain ints in the message: the shapes are a tensor, whose
            # printed form would not read as sizes.
            level_sizes = ', '.join(
                f'{height}x{width}'
                for height, width in inputs.spatial_shapes.tolist())
            raise ValueError(
                f'Two-stage Deformable DETR selects num_queries='
                f'{self.num_queries} proposals among the encoder\'s '
                f'positions, but the padded batch gives only {num_keys} '
                f'positions over its {len(inputs.spatial_shapes)} feature '
                f'levels (height x width: {level_sizes}); use larger images '
                '(or pad them, e.g. data_preprocessor.pad_size_divisor) or '
                'lower num_queries (model.num_queries in the config).')
        proposal_memory, proposals = self._encoder_proposals(memory, inputs)
        enc_outputs_class = proposal_cls_branch(proposal_memory)
        enc_outputs_coord_logits = proposal_reg_branch(
            proposal_memory) + proposals
        # Channel 0 is the proposal's "object" score: the head trains the
        # encoder's predictions class-agnostically, as the official model.
        top_indices = enc_outputs_class[..., 0].topk(
            self.num_queries, dim=1)[1]
        top_logits = enc_outputs_coord_logits.gather(
            1,
            top_indices.unsqueeze(-1).expand(-1, -1, 4)).detach()
        query_pos, query = self.pos_trans_norm(
            self.pos_trans_fc(
                proposal_positional_encoding(top_logits,
                                             self.embed_dims // 2))).split(
                                                 self.embed_dims, dim=2)
        return Queries(query, query_pos, top_logits.sigmoid(),
                       enc_outputs_class, enc_outputs_coord_logits.sigmoid())

    def _encoder_proposals(self, memory: Tensor,
                           inputs: MultiScaleInputs) -> Tuple[Tensor, Tensor]:
        """One proposal box per encoder position, and the memory to score it.

        Every position proposes a box centred on it, of side 0.05 * 2^level
        of the image. Boxes near the border and padded positions are
        disabled: their logits are +inf and their memory is zero.

        Args:
            memory (Tensor): (bs, num_keys, embed_dims).
            inputs (MultiScaleInputs): From :meth:`flatten_levels`.

        Returns:
            tuple[Tensor, Tensor]: Transformed memory (bs, num_keys,
            embed_dims) and proposals (bs, num_keys, 4) as logits of
            normalised (cx, cy, w, h).
        """
        batch_size = memory.shape[0]
        proposals = []
        level_shapes = inputs.level_shapes or inputs.spatial_shapes.tolist()
        for level, (height, width) in enumerate(level_shapes):
            # Pixel indices; arange, unlike linspace, takes the symbolic
            # sizes of torch.export.
            options = dict(dtype=torch.float32, device=memory.device)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(height, **options),
                torch.arange(width, **options),
                indexing='ij')
            centres = torch.stack((grid_x, grid_y), -1)
            # (bs, h, w, 2): centres normalised by each image's valid size
            centres = (centres.unsqueeze(0).expand(batch_size, -1, -1, -1) +
                       0.5) / inputs.valid_sizes[:, level].view(
                           batch_size, 1, 1, 2)
            sizes = torch.full_like(centres, 0.05 * (2.0**level))
            proposals.append(
                torch.cat((centres, sizes), -1).view(batch_size, -1, 4))
        proposals = torch.cat(proposals, 1)
        usable = ((proposals > 0.01) & (proposals < 0.99)).all(
            -1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        disabled = ~usable
        if inputs.padding_mask is not None:
            disabled = disabled | inputs.padding_mask.unsqueeze(-1)
        proposals = proposals.masked_fill(disabled, float('inf'))
        memory = memory.masked_fill(disabled, 0.0)
        return self.memory_trans_norm(self.memory_trans_fc(memory)), proposals

    def decode(
        self,
        queries: Queries,
        memory: Tensor,
        inputs: MultiScaleInputs,
        reg_branches: Optional[nn.ModuleList] = None
    ) -> Tuple[Tensor, List[Tensor]]:
        """Stage 4: the decoder's hidden states and references.

        Args:
            queries (Queries): From :meth:`initial_queries`.
            memory (Tensor): (bs, num_keys, embed_dims).
            inputs (MultiScaleInputs): From :meth:`flatten_levels`.
            reg_branches (nn.ModuleList, optional): The head's regression
                branches, given for box refinement only.

        Returns:
            tuple[Tensor, list[Tensor]]: Hidden states (num_layers, bs,
            num_queries, embed_dims) and num_layers + 1 references, the
            initial one first, each (bs, num_queries, 2 or 4).
        """
        hidden_states, references = self.decoder(
            queries.query, queries.query_pos, memory, inputs.padding_mask,
            queries.reference_points, inputs.spatial_shapes,
            inputs.level_start_index, inputs.valid_ratios, reg_branches)
        return hidden_states, [queries.reference_points, *references]
