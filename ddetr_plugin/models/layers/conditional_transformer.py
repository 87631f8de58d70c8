"""Conditional DETR's transformer: one feature map in, decoded queries out.

Stages: flatten the map and encode its positions -> encoder -> queries
(zero content, learnt positional queries) -> decoder.
"""
from typing import Optional, Tuple

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from ddetr_plugin.registry import MODELS
from .conditional_decoder import ConditionalDetrDecoder
from .detr_encoder import DetrEncoder
from .positional_encoding import SinePositionalEncoding


@MODELS.register_module()
class ConditionalDetrTransformer(BaseModule):
    """DETR's encoder, the conditional decoder, the query embeddings.

    Args:
        encoder (dict): Arguments of :class:`DetrEncoder`.
        decoder (dict): Arguments of :class:`ConditionalDetrDecoder`.
        positional_encoding (dict): Arguments of
            :class:`SinePositionalEncoding`; ``2 * num_feats`` must equal
            ``embed_dims``. Conditional DETR normalises with offset 0
            (Deformable DETR uses -0.5).
        num_queries (int): Object queries. Defaults to 300.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 encoder: dict,
                 decoder: dict,
                 positional_encoding: dict,
                 num_queries: int = 300,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.encoder = DetrEncoder(**encoder)
        self.decoder = ConditionalDetrDecoder(**decoder)
        self.positional_encoding = SinePositionalEncoding(
            **positional_encoding)
        self.embed_dims = self.encoder.embed_dims
        widths = dict(
            encoder=self.embed_dims,
            decoder=self.decoder.embed_dims,
            positional_encoding=2 * self.positional_encoding.num_feats)
        if len(set(widths.values())) != 1:
            raise ValueError(
                'ConditionalDetrTransformer: encoder and decoder embed_dims '
                'and 2 * positional_encoding.num_feats must be equal; got '
                f'{widths}.')
        self.num_queries = num_queries
        # The positional queries; their content counterparts start at 0.
        self.query_embedding = nn.Embedding(num_queries, self.embed_dims)
        self.reset_parameters()

    def init_weights(self) -> None:
        """Children's init configs first, then :meth:`reset_parameters`."""
        super().init_weights()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier for every matrix of the encoder and decoder, as DETR.

        Called at construction too, so a model that is never passed through
        ``init_weights`` starts from this initialisation.
        """
        for coder in (self.encoder, self.decoder):
            for parameter in coder.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)

    def forward(self, feature: Tensor,
                mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Encode the map and decode the queries.

        Args:
            feature (Tensor): (bs, embed_dims, h, w) the neck's map.
            mask (Tensor, optional): (bs, h, w) bool, True at padding; None
                when no image of the batch is padded.

        Returns:
            tuple[Tensor, Tensor]: ``hidden_states`` (num_decoder_layers,
            bs, num_queries, embed_dims) and ``references``
            (bs, num_queries, 2) normalised (x, y).
        """
        batch_size, channels, height, width = feature.shape
        if mask is None:
            position = self.positional_encoding.forward_unpadded(
                batch_size, height, width, feature.device)
        else:
            position = self.positional_encoding(mask)
            mask = mask.flatten(1)
        # (bs, c, h, w) -> (bs, h * w, c)
        memory = feature.flatten(2).transpose(1, 2)
        position = position.to(feature.dtype).flatten(2).transpose(1, 2)
        memory = self.encoder(memory, position, mask)
        query_pos = self.query_embedding.weight[None].expand(
            batch_size, -1, -1)
        query = torch.zeros_like(query_pos)
        return self.decoder(query, query_pos, memory, position, mask)
