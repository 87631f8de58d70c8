"""Conditional DETR's decoder (Meng et al., ICCV 2021).

The content queries start at zero; the learnt query embeddings are the
positional queries. Each query predicts one reference point from its
positional query, the same for every layer. In each layer's
cross-attention the spatial query is the sine encoding of that point,
multiplied element-wise by a transformation of the query's content
(``query_scale``, the paper's lambda_q; the identity in the first layer),
so every layer can look at another band of the object around the point.

Shape shorthand: ``bs`` images, ``num_queries`` queries, ``num_keys``
memory positions, ``embed_dims`` channels.
"""
from typing import Optional, Tuple

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from .conditional_attention import ConditionalAttention
from .feedforward import FeedForward
from .mlp import build_mlp
from .positional_encoding import point_positional_encoding


def _check_layer_norm(norm_cfg: Optional[dict], key: str) -> None:
    """Raise unless ``norm_cfg`` is LayerNorm (the only norm used here)."""
    if norm_cfg is not None and dict(norm_cfg).get('type') != 'LN':
        raise ValueError(f'{key} must be dict(type=\'LN\') (LayerNorm, as '
                         f'in Conditional DETR); got {norm_cfg!r}.')


class ConditionalDetrDecoderLayer(BaseModule):
    """Self-attention, conditional cross-attention, feed-forward; post-norm.

    Args:
        self_attn_cfg (dict): Arguments of :class:`ConditionalAttention`
            (``cross_attn`` False).
        cross_attn_cfg (dict): Arguments of :class:`ConditionalAttention`
            (``cross_attn`` True).
        ffn_cfg (dict): Arguments of :class:`FeedForward`.
        norm_cfg (dict, optional): Must be LayerNorm; accepted for mmdet's
            configs.
        is_first (bool): Whether this is the decoder's first layer, whose
            cross-attention adds the positional query. Defaults to False.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 self_attn_cfg: dict,
                 cross_attn_cfg: dict,
                 ffn_cfg: dict,
                 norm_cfg: Optional[dict] = None,
                 is_first: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        _check_layer_norm(norm_cfg, 'decoder.layer_cfg.norm_cfg')
        for key, cfg, cross in (('self_attn_cfg', self_attn_cfg, False),
                                ('cross_attn_cfg', cross_attn_cfg, True)):
            if dict(cfg).get('cross_attn', cross) != cross:
                raise ValueError(
                    f'decoder.layer_cfg.{key}.cross_attn must be {cross}; '
                    f'got {cfg!r}.')
        self.self_attn = ConditionalAttention(
            **dict(self_attn_cfg, cross_attn=False))
        self.embed_dims = self.self_attn.embed_dims
        self.self_attn_norm = nn.LayerNorm(self.embed_dims)
        self.cross_attn = ConditionalAttention(
            **dict(cross_attn_cfg, cross_attn=True, is_first=is_first))
        self.cross_attn_norm = nn.LayerNorm(self.embed_dims)
        self.ffn = FeedForward(**ffn_cfg)
        self.ffn_norm = nn.LayerNorm(self.embed_dims)

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor,
                memory_pos: Tensor, memory_mask: Optional[Tensor],
                ref_sine_embed: Tensor) -> Tensor:
        """Update the object queries once.

        Args:
            query (Tensor): (bs, num_queries, embed_dims) content queries.
            query_pos (Tensor): (bs, num_queries, embed_dims) positional
                queries.
            memory (Tensor): (bs, num_keys, embed_dims) encoder output.
            memory_pos (Tensor): (bs, num_keys, embed_dims) its sine
                encoding.
            memory_mask (Tensor, optional): (bs, num_keys) bool, True at
                padding.
            ref_sine_embed (Tensor): (bs, num_queries, embed_dims) the
                scaled sine encoding of the reference points.

        Returns:
            Tensor: (bs, num_queries, embed_dims).
        """
        query = self.self_attn_norm(self.self_attn(query, query_pos))
        query = self.cross_attn(
            query,
            query_pos,
            key=memory,
            key_pos=memory_pos,
            key_padding_mask=memory_mask,
            ref_sine_embed=ref_sine_embed)
        query = self.cross_attn_norm(query)
        return self.ffn_norm(self.ffn(query))


class ConditionalDetrDecoder(BaseModule):
    """The layers, the reference-point head, lambda_q and a final norm.

    Takes the arguments of mmdet 3.3.0's
    ``ConditionalDetrTransformerDecoder``.

    Args:
        num_layers (int): Number of layers. Defaults to 6.
        layer_cfg (dict): Arguments of every
            :class:`ConditionalDetrDecoderLayer`.
        post_norm_cfg (dict): The norm applied to every layer's output
            for the head; must be LayerNorm. Defaults to LN.
        return_intermediate (bool): Must be True: the head supervises every
            layer. Defaults to True.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 num_layers: int = 6,
                 layer_cfg: Optional[dict] = None,
                 post_norm_cfg: Optional[dict] = dict(type='LN'),
                 return_intermediate: bool = True,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not return_intermediate or post_norm_cfg is None:
            raise ValueError(
                'ConditionalDetrDecoder returns every layer\'s output through '
                'a final LayerNorm; set return_intermediate=True and '
                'post_norm_cfg=dict(type=\'LN\') (got '
                f'{return_intermediate} and {post_norm_cfg}).')
        _check_layer_norm(post_norm_cfg, 'decoder.post_norm_cfg')
        if layer_cfg is None:
            attention = dict(embed_dims=256, num_heads=8, attn_drop=0.1)
            layer_cfg = dict(
                self_attn_cfg=attention,
                cross_attn_cfg=attention,
                ffn_cfg=dict(
                    embed_dims=256, feedforward_channels=2048, ffn_drop=0.1))
        self.layers = nn.ModuleList([
            ConditionalDetrDecoderLayer(**layer_cfg, is_first=index == 0)
            for index in range(num_layers)
        ])
        self.num_layers = num_layers
        self.embed_dims = embed_dims = self.layers[0].embed_dims
        self.post_norm = nn.LayerNorm(embed_dims)
        # lambda_q of the paper: content -> per-channel scale of the
        # spatial query.
        self.query_scale = build_mlp(embed_dims, embed_dims, embed_dims, 2)
        # Positional query -> reference point logits (x, y).
        self.ref_point_head = build_mlp(embed_dims, embed_dims, 2, 2)

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor,
                memory_pos: Tensor,
                memory_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Run every layer.

        Args:
            query (Tensor): (bs, num_queries, embed_dims) content queries
                (zeros).
            query_pos (Tensor): (bs, num_queries, embed_dims) positional
                queries.
            memory (Tensor): (bs, num_keys, embed_dims).
            memory_pos (Tensor): (bs, num_keys, embed_dims).
            memory_mask (Tensor, optional): (bs, num_keys) bool, True at
                padding.

        Returns:
            tuple[Tensor, Tensor]: Hidden states (num_layers, bs,
            num_queries, embed_dims) after the final norm, and the reference
            points (bs, num_queries, 2), normalised (x, y).
        """
        references = self.ref_point_head(query_pos).sigmoid()
        reference_embed = point_positional_encoding(
            references, num_feats=self.embed_dims // 2)
        hidden_states = []
        for index, layer in enumerate(self.layers):
            ref_sine_embed = reference_embed
            if index > 0:
                # The first layer's content is still empty (zeros): it
                # uses the plain encoding.
                ref_sine_embed = reference_embed * self.query_scale(query)
            query = layer(query, query_pos, memory, memory_pos, memory_mask,
                          ref_sine_embed)
            hidden_states.append(self.post_norm(query))
        return torch.stack(hidden_states), references
