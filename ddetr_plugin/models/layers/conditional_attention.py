"""Conditional DETR's attention: content and position projected apart.

Shape shorthand: ``bs`` images, ``num_queries`` object queries,
``num_keys`` positions of the encoder memory, ``embed_dims`` channels,
``num_heads`` heads of ``head_dims = embed_dims // num_heads`` channels.

Self-attention adds the projected content and the projected position of
queries and keys, as DETR does, with separate projections for each.

Cross-attention is the paper's contribution (Meng et al., ICCV 2021,
Sec. 3.3): each head compares a query with a key through the
*concatenation* of a content part and a spatial part, so the dot product
is the sum of a content match and a spatial match
(``c_q . c_k + p_q . p_k``): the spatial query ``p_q`` (the sine
encoding of the query's reference point, scaled by the decoder) picks out
a band of the image without the content embedding having to carry the
location. Queries and keys have ``2 * head_dims`` channels per head; the
values only the content's ``head_dims``. Only the first decoder layer also
adds the positional query (and the keys' positions) to the content halves.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor, nn


class ConditionalAttention(BaseModule):
    """Self- or cross-attention of Conditional DETR's decoder, with its
    shortcut (the output is ``query`` plus the attention's output).

    Takes the arguments of mmdet 3.3.0's ``ConditionalAttention``.

    Args:
        embed_dims (int): Channels of queries, keys and values.
        num_heads (int): Heads; must divide ``embed_dims``.
        attn_drop (float): Dropout on the attention weights. Defaults to 0.
        proj_drop (float): Dropout on the output before the shortcut.
            Defaults to 0.
        cross_attn (bool): Cross-attention (the conditional spatial query)
            instead of self-attention. Defaults to False.
        keep_query_pos (bool): Cross-attention adds the positional query
            to the content query in every layer, not only the first.
            Defaults to False.
        is_first (bool): Whether this is the first decoder layer's
            cross-attention, which adds the positional query. Defaults to
            False.
        batch_first (bool): Must be True; accepted for mmdet's configs.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 attn_drop: float = 0.,
                 proj_drop: float = 0.,
                 cross_attn: bool = False,
                 keep_query_pos: bool = False,
                 is_first: bool = False,
                 batch_first: bool = True,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if batch_first is not True:
            raise ValueError('ConditionalAttention works on (bs, length, '
                             'embed_dims) inputs; set batch_first=True.')
        if embed_dims % num_heads:
            raise ValueError(f'ConditionalAttention: embed_dims={embed_dims}'
                             f' is not divisible by num_heads={num_heads}.')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.cross_attn = cross_attn
        # Self-attention always adds positions; cross-attention only where
        # the paper's first layer does (or every layer with keep_query_pos).
        self.with_query_pos = not cross_attn or is_first or keep_query_pos
        self.query_content_proj = nn.Linear(embed_dims, embed_dims)
        if self.with_query_pos:
            self.query_pos_proj = nn.Linear(embed_dims, embed_dims)
        self.key_content_proj = nn.Linear(embed_dims, embed_dims)
        self.key_pos_proj = nn.Linear(embed_dims, embed_dims)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        if cross_attn:
            self.query_sine_proj = nn.Linear(embed_dims, embed_dims)
        self.out_proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, tensor: Tensor) -> Tensor:
        """(bs, length, embed_dims) -> (bs, num_heads, length, head_dims)."""
        batch_size, length, _ = tensor.shape
        return tensor.view(batch_size, length, self.num_heads,
                           -1).transpose(1, 2)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor]) -> Tensor:
        """Scaled dot-product attention over heads, merged and projected.

        Args:
            query (Tensor): (bs, num_heads, num_queries, query_head_dims).
            key (Tensor): (bs, num_heads, num_keys, query_head_dims).
            value (Tensor): (bs, num_heads, num_keys, head_dims).
            key_padding_mask (Tensor, optional): (bs, num_keys) bool, True
                at padding.

        Returns:
            Tensor: (bs, num_queries, embed_dims).
        """
        attend_mask = None
        if key_padding_mask is not None:
            attend_mask = ~key_padding_mask[:, None, None, :]
        # Scaled by 1/sqrt of the query/key channels per head, which are
        # twice the values' in cross-attention, as in the paper.
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attend_mask,
            dropout_p=self.attn_drop if self.training else 0.0)
        batch_size, _, num_queries, _ = attended.shape
        attended = attended.transpose(1, 2).reshape(batch_size, num_queries,
                                                    self.embed_dims)
        return self.out_proj(attended)

    def cross_attention_parts(
            self, query: Tensor, query_pos: Tensor, key: Tensor,
            key_pos: Tensor,
            ref_sine_embed: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The content and spatial halves of cross-attention's queries and
        keys, per head.

        :meth:`forward` concatenates them; they are a method of their own so
        that :mod:`ddetr_plugin.visualization` can take the spatial and
        content matches apart with the very numbers the layer used.

        Args:
            query, query_pos, key, key_pos, ref_sine_embed: See
                :meth:`forward`.

        Returns:
            tuple[Tensor]: ``content_query`` and ``spatial_query`` (bs,
            num_heads, num_queries, head_dims), ``content_key`` and
            ``spatial_key`` (bs, num_heads, num_keys, head_dims).
        """
        content_query = self.query_content_proj(query)
        content_key = self.key_content_proj(key)
        key_position = self.key_pos_proj(key_pos)
        if self.with_query_pos:
            content_query = content_query + self.query_pos_proj(query_pos)
            content_key = content_key + key_position
        spatial_query = self.query_sine_proj(ref_sine_embed)
        return (self._heads(content_query), self._heads(spatial_query),
                self._heads(content_key), self._heads(key_position))

    def forward(self,
                query: Tensor,
                query_pos: Tensor,
                key: Optional[Tensor] = None,
                key_pos: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None,
                ref_sine_embed: Optional[Tensor] = None) -> Tensor:
        """Attend and add the shortcut.

        Args:
            query (Tensor): (bs, num_queries, embed_dims) content queries.
            query_pos (Tensor): (bs, num_queries, embed_dims) positional
                queries (the learnt query embeddings).
            key (Tensor, optional): (bs, num_keys, embed_dims) encoder
                memory; cross-attention only.
            key_pos (Tensor, optional): (bs, num_keys, embed_dims) sine
                encoding of the memory; cross-attention only.
            key_padding_mask (Tensor, optional): (bs, num_keys) bool, True
                at padding; cross-attention only.
            ref_sine_embed (Tensor, optional): (bs, num_queries, embed_dims)
                the conditional spatial query before its projection;
                cross-attention only.

        Returns:
            Tensor: (bs, num_queries, embed_dims).
        """
        if not self.cross_attn:
            attended = self._attend(
                self._heads(
                    self.query_content_proj(query) +
                    self.query_pos_proj(query_pos)),
                self._heads(
                    self.key_content_proj(query) +
                    self.key_pos_proj(query_pos)),
                self._heads(self.value_proj(query)), None)
            return query + self.proj_drop(attended)

        content_query, spatial_query, content_key, spatial_key = \
            self.cross_attention_parts(query, query_pos, key, key_pos,
                                       ref_sine_embed)
        # Per head: [content, spatial] for queries and keys alike.
        heads_query = torch.cat([content_query, spatial_query], dim=-1)
        heads_key = torch.cat([content_key, spatial_key], dim=-1)
        attended = self._attend(heads_query, heads_key,
                                self._heads(self.value_proj(key)),
                                key_padding_mask)
        return query + self.proj_drop(attended)
