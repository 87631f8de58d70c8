"""The neck of Deformable DETR: backbone levels projected to one width.

Each backbone level goes through a 1x1 convolution and GroupNorm; further,
coarser levels come from stride-2 3x3 convolutions (the first one reading the
backbone's last level, the next ones the previous extra level), again
followed by GroupNorm. There is no activation, as in the official model.
"""
from typing import List, Optional, Sequence, Tuple

from mmengine.model import BaseModule
from torch import Tensor, nn

from ddetr_plugin.registry import MODELS


class ConvGroupNorm(nn.Module):
    """A convolution followed by GroupNorm.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        kernel_size (int): 1 for projections, 3 for extra levels.
        stride (int): 1 for projections, 2 for extra levels.
        num_groups (int): GroupNorm groups; must divide ``out_channels``.
        bias (bool): Whether the convolution has a bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int, num_groups: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=bias)
        self.norm = nn.GroupNorm(num_groups, out_channels)

    def forward(self, feature: Tensor) -> Tensor:
        """(bs, in_channels, h, w) -> (bs, out_channels, h', w')."""
        return self.norm(self.conv(feature))


@MODELS.register_module()
class DeformableDetrNeck(BaseModule):
    """Project backbone levels to ``out_channels`` and add coarser ones.

    Args:
        in_channels (Sequence[int]): Channels of the backbone levels used,
            finest first, e.g. [512, 1024, 2048] for ResNet-50 C3-C5.
        out_channels (int): Channels of every output level (the
            transformer's embed_dims). Defaults to 256.
        num_outs (int): Output levels, at least ``len(in_channels)``; the
            detector's num_feature_levels. Defaults to 4.
        num_groups (int): GroupNorm groups. Defaults to 32.
        bias (bool): Whether the convolutions have biases. The official
            model's do; mmdet's ChannelMapper's do not (its converted weights
            get zero biases, which computes the same). Defaults to True.
        init_cfg (dict, optional): Initialisation config. Defaults to None,
            which gives the official init: Xavier-uniform convolution
            weights and zero biases.
    """

    def __init__(self,
                 in_channels: Sequence[int],
                 out_channels: int = 256,
                 num_outs: int = 4,
                 num_groups: int = 32,
                 bias: bool = True,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        in_channels = list(in_channels)
        if num_outs < len(in_channels):
            raise ValueError(
                f'DeformableDetrNeck: num_outs ({num_outs}) must be at least '
                f'the number of backbone levels in in_channels '
                f'({len(in_channels)}: {in_channels}).')
        if out_channels % num_groups != 0:
            raise ValueError(
                f'DeformableDetrNeck: num_groups ({num_groups}) must divide '
                f'out_channels ({out_channels}).')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_outs = num_outs
        projections = [
            ConvGroupNorm(channels, out_channels, 1, 1, num_groups, bias)
            for channels in in_channels
        ]
        for index in range(num_outs - len(in_channels)):
            channels = in_channels[-1] if index == 0 else out_channels
            projections.append(
                ConvGroupNorm(channels, out_channels, 3, 2, num_groups, bias))
        # One list for all output levels, in output order.
        self.projections = nn.ModuleList(projections)
        if init_cfg is None:
            self._official_init()

    def _official_init(self) -> None:
        """Xavier-uniform convolution weights and zero biases."""
        for projection in self.projections:
            nn.init.xavier_uniform_(projection.conv.weight, gain=1)
            if projection.conv.bias is not None:
                nn.init.zeros_(projection.conv.bias)

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        """Build the multi-scale features.

        Args:
            inputs (Sequence[Tensor]): ``len(in_channels)`` backbone maps,
                finest first, the i-th (bs, in_channels[i], h_i, w_i).

        Returns:
            tuple[Tensor]: ``num_outs`` maps (bs, out_channels, h, w), finest
            first, each extra level half the size (rounded up) of the one
            before.
        """
        if len(inputs) != len(self.in_channels):
            raise ValueError(
                f'DeformableDetrNeck expects {len(self.in_channels)} backbone '
                f'levels (in_channels={self.in_channels}) but got '
                f'{len(inputs)}; make the backbone\'s out_indices match.')
        for index, (feature,
                    channels) in enumerate(zip(inputs, self.in_channels)):
            if feature.shape[1] != channels:
                raise ValueError(
                    f'DeformableDetrNeck: backbone level {index} has '
                    f'{feature.shape[1]} channels but in_channels[{index}] '
                    f'is {channels}.')
        outputs: List[Tensor] = [
            projection(feature)
            for projection, feature in zip(self.projections, inputs)
        ]
        previous = inputs[-1]
        for projection in self.projections[len(inputs):]:
            previous = projection(previous)
            outputs.append(previous)
        return tuple(outputs)
