"""The position-wise feed-forward block of the transformer layers."""
from typing import Optional

from mmengine.model import BaseModule
from torch import Tensor, nn


class FeedForward(BaseModule):
    """Two linear layers with ReLU and dropout, plus an identity shortcut.

    The dropout sits after the activation and after the second linear
    layer, where mmcv's ``FFN`` has it, so converted weights and dropout
    rates behave the same.

    Args:
        embed_dims (int): Input and output channels. Defaults to 256.
        feedforward_channels (int): Hidden channels. Defaults to 1024.
        ffn_drop (float): Dropout probability. Defaults to 0.
        num_fcs (int): Must be 2; accepted so mmdet-style ``ffn_cfg`` dicts
            work unchanged. Defaults to 2.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int = 256,
                 feedforward_channels: int = 1024,
                 ffn_drop: float = 0.,
                 num_fcs: int = 2,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if num_fcs != 2:
            raise ValueError('FeedForward has exactly two linear layers, as '
                             f'in Deformable DETR; got num_fcs={num_fcs}.')
        self.embed_dims = embed_dims
        self.linear1 = nn.Linear(embed_dims, feedforward_channels)
        self.activation = nn.ReLU(inplace=True)
        self.dropout1 = nn.Dropout(ffn_drop)
        self.linear2 = nn.Linear(feedforward_channels, embed_dims)
        self.dropout2 = nn.Dropout(ffn_drop)

    def forward(self, query: Tensor) -> Tensor:
        """Transform every position independently.

        Args:
            query (Tensor): (bs, num_queries, embed_dims).

        Returns:
            Tensor: (bs, num_queries, embed_dims), shortcut included.
        """
        hidden = self.dropout1(self.activation(self.linear1(query)))
        return query + self.dropout2(self.linear2(hidden))
