"""The position-wise feed-forward block of the transformer layers."""
from typing import Optional

import torch
from mmcv.cnn import build_activation_layer
from mmcv.cnn.bricks.drop import build_dropout
from mmengine.model import BaseModule
from torch import Tensor, nn


class FeedForward(BaseModule):
    """Two linear layers with an activation and dropout, plus a shortcut.

    Takes the arguments of mmcv's ``FFN`` (MMDetection's ``ffn_cfg``), so an
    MMDetection Deformable DETR ``ffn_cfg`` works unchanged. The dropout
    sits after the activation and after the second linear layer, where
    mmcv's ``FFN`` has it, so converted weights and dropout rates behave
    the same.

    Args:
        embed_dims (int): Input and output channels. Defaults to 256.
        feedforward_channels (int): Hidden channels. Defaults to 1024.
        num_fcs (int): Must be 2, the Deformable DETR block; accepted so
            mmdet-style ``ffn_cfg`` dicts work unchanged. Defaults to 2.
        act_cfg (dict): Config of the activation after the first linear
            layer, as in mmcv (``type`` from mmcv's activations, e.g.
            ``'ReLU'``, ``'GELU'``). Defaults to ``dict(type='ReLU',
            inplace=True)``.
        ffn_drop (float): Dropout probability inside the block.
            Defaults to 0.
        dropout_layer (dict, optional): Config of a dropout applied to the
            block's output before the shortcut is added, as in mmcv (e.g.
            ``dict(type='DropPath', drop_prob=0.1)``). Defaults to None
            (none).
        add_identity (bool): Whether to add the shortcut. Defaults to True.
        layer_scale_init_value (float): Initial value of a learnt
            per-channel scale of the block's output; 0 means no scale.
            Defaults to 0.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int = 256,
                 feedforward_channels: int = 1024,
                 num_fcs: int = 2,
                 act_cfg: Optional[dict] = None,
                 ffn_drop: float = 0.,
                 dropout_layer: Optional[dict] = None,
                 add_identity: bool = True,
                 layer_scale_init_value: float = 0.,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if num_fcs != 2:
            raise ValueError('FeedForward has exactly two linear layers, as '
                             f'in Deformable DETR; got num_fcs={num_fcs}.')
        if not isinstance(add_identity, bool):
            raise TypeError('FeedForward: add_identity must be a bool, got '
                            f'{add_identity!r}.')
        if (isinstance(layer_scale_init_value, bool)
                or not isinstance(layer_scale_init_value,
                                  (int, float)) or layer_scale_init_value < 0):
            raise ValueError(
                'FeedForward: layer_scale_init_value must be a number >= 0 '
                f'(0 for no layer scale), got {layer_scale_init_value!r}.')
        if act_cfg is None:
            act_cfg = dict(type='ReLU', inplace=True)
        if not isinstance(act_cfg, dict) or 'type' not in act_cfg:
            raise TypeError('FeedForward: act_cfg must be a dict with a '
                            "'type' (e.g. dict(type='GELU')), got "
                            f'{act_cfg!r}.')
        self.embed_dims = embed_dims
        self.add_identity = add_identity
        self.linear1 = nn.Linear(embed_dims, feedforward_channels)
        self.activation = build_activation_layer(dict(act_cfg))
        self.dropout1 = nn.Dropout(ffn_drop)
        self.linear2 = nn.Linear(feedforward_channels, embed_dims)
        self.dropout2 = nn.Dropout(ffn_drop)
        self.output_dropout = (
            build_dropout(dict(dropout_layer))
            if dropout_layer else nn.Identity())
        if layer_scale_init_value > 0:
            self.layer_scale = nn.Parameter(
                torch.full((embed_dims, ), float(layer_scale_init_value)))
        else:
            self.layer_scale = None

    def forward(self,
                query: Tensor,
                identity: Optional[Tensor] = None) -> Tensor:
        """Transform every position independently.

        Args:
            query (Tensor): (bs, num_queries, embed_dims).
            identity (Tensor, optional): (bs, num_queries, embed_dims)
                shortcut added to the output; defaults to ``query``.

        Returns:
            Tensor: (bs, num_queries, embed_dims), shortcut included when
            ``add_identity``.
        """
        hidden = self.dropout1(self.activation(self.linear1(query)))
        out = self.dropout2(self.linear2(hidden))
        if self.layer_scale is not None:
            out = out * self.layer_scale
        out = self.output_dropout(out)
        if not self.add_identity:
            return out
        return (query if identity is None else identity) + out
