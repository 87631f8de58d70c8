"""Sine positional encodings of feature maps and of proposal boxes.

The encoder knows where a feature sits only through these encodings: each
position gets sines and cosines of its (y, x) coordinates at geometrically
spaced frequencies, as in DETR.
"""
import math
from typing import Optional

import torch
from mmengine.model import BaseModule
from torch import Tensor

from ddetr_plugin.registry import MODELS


def _interleave_sin_cos(angles: Tensor) -> Tensor:
    """Sine of even channels and cosine of odd ones, interleaved.

    Args:
        angles (Tensor): (..., num_feats), ``num_feats`` even.

    Returns:
        Tensor: (..., num_feats): sin(a0), cos(a1), sin(a2), cos(a3), ...
    """
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()),
                       dim=-1).flatten(-2)


def _frequencies(num_feats: int, temperature: float,
                 device: torch.device) -> Tensor:
    """(num_feats,) divisors; channels 2i and 2i+1 share one frequency."""
    channel = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature**(2 * (channel // 2) / num_feats)


@MODELS.register_module()
class SinePositionalEncoding(BaseModule):
    """Sine encoding of the (y, x) position of every valid pixel.

    Coordinates count valid pixels only (a cumulative sum over the unmasked
    area), so padding does not shift the encoding of an image.

    Args:
        num_feats (int): Channels per axis; the output has ``2 * num_feats``
            channels, y's first.
        temperature (float): Base of the frequencies. Defaults to 10000.
        normalize (bool): Whether to rescale coordinates to
            [0, ``scale``] over each image's valid extent. Defaults to False.
        scale (float): Range of normalised coordinates. Defaults to 2 * pi.
        eps (float): Added to the extent before dividing. Defaults to 1e-6.
        offset (float): Added to the 1-based coordinates before normalising;
            -0.5 puts them at pixel centres, as Deformable DETR does.
            Defaults to 0.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 num_feats: int,
                 temperature: float = 10000,
                 normalize: bool = False,
                 scale: float = 2 * math.pi,
                 eps: float = 1e-6,
                 offset: float = 0.,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        # Checked here: a wrong type (e.g. scale=(3.,) from a config) would
        # otherwise build and fail only inside the first forward pass.
        if (isinstance(num_feats, bool) or not isinstance(num_feats, int)
                or num_feats <= 0 or num_feats % 2 != 0):
            raise ValueError(
                'SinePositionalEncoding needs num_feats to be a positive even '
                f'int (sine/cosine pairs); got {num_feats!r}.')
        for name, value in (('temperature', temperature), ('scale', scale),
                            ('eps', eps), ('offset', offset)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f'SinePositionalEncoding: {name} must be a number, got '
                    f'{value!r} of type {type(value).__name__}.')
            if not math.isfinite(value):
                raise ValueError(f'SinePositionalEncoding: {name} must be '
                                 f'finite, got {value!r}.')
        if temperature <= 0:
            raise ValueError('SinePositionalEncoding: temperature must be '
                             f'positive, got {temperature!r}.')
        if eps < 0:
            raise ValueError('SinePositionalEncoding: eps must not be '
                             f'negative, got {eps!r}.')
        if not isinstance(normalize, bool):
            raise TypeError('SinePositionalEncoding: normalize must be a '
                            f'bool, got {normalize!r}.')
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        """Encode every position of a batch of padded feature maps.

        Args:
            mask (Tensor): (bs, h, w), True (or non-zero) at padded
                positions: bool, or integer / floating 0-1 as MMDetection
                accepts.

        Returns:
            Tensor: (bs, 2 * num_feats, h, w).
        """
        if mask.dim() != 3:
            raise ValueError('SinePositionalEncoding expects a mask of shape '
                             f'(bs, h, w), got {tuple(mask.shape)}.')
        # ``mask == 0`` rather than ``~mask``: on an integer tensor ``~`` is
        # a bitwise not (~0 == -1), which would count padding as valid.
        valid = (mask == 0).to(torch.float32)
        y_embed = valid.cumsum(1)
        x_embed = valid.cumsum(2)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] +
                                                 self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] +
                                                 self.eps) * self.scale
        frequencies = _frequencies(self.num_feats, self.temperature,
                                   mask.device)
        pos_x = _interleave_sin_cos(x_embed[..., None] / frequencies)
        pos_y = _interleave_sin_cos(y_embed[..., None] / frequencies)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)

    def forward_unpadded(self, batch_size: int, height: int, width: int,
                         device: torch.device) -> Tensor:
        """The encoding of maps without padding, ``forward`` of an
        all-False mask, to the bit.

        Without padding a row's coordinate is its index, so each axis is
        encoded once (h + w positions instead of 2 * h * w) and broadcast.
        This also keeps ``torch.export`` fast: on dynamic sizes every op on
        an (h, w) tensor costs symbolic shape arithmetic.

        Args:
            batch_size (int): Images.
            height (int): Map height.
            width (int): Map width.
            device (torch.device): Device of the result.

        Returns:
            Tensor: (bs, 2 * num_feats, h, w).
        """
        # 1-based coordinates, as the cumulative sum of a valid row gives.
        y_embed = torch.arange(
            1, height + 1, dtype=torch.float32, device=device)
        x_embed = torch.arange(
            1, width + 1, dtype=torch.float32, device=device)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[-1:] +
                                                 self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[-1:] +
                                                 self.eps) * self.scale
        frequencies = _frequencies(self.num_feats, self.temperature, device)
        # (h, num_feats) and (w, num_feats)
        pos_y = _interleave_sin_cos(y_embed[:, None] / frequencies)
        pos_x = _interleave_sin_cos(x_embed[:, None] / frequencies)
        pos_y = pos_y.t()[None, :, :, None].expand(batch_size, -1, -1, width)
        pos_x = pos_x.t()[None, :, None, :].expand(batch_size, -1, height, -1)
        return torch.cat((pos_y, pos_x), dim=1)


def proposal_positional_encoding(proposals: Tensor,
                                 num_feats: int = 128,
                                 temperature: float = 10000) -> Tensor:
    """Sine encoding of proposal boxes, used by two-stage query selection.

    Args:
        proposals (Tensor): (bs, num_queries, 4) unnormalised (before
            sigmoid) (cx, cy, w, h).
        num_feats (int): Channels per box coordinate. Defaults to 128, the
            official model's value whatever its embed_dims.
        temperature (float): Base of the frequencies. Defaults to 10000.

    Returns:
        Tensor: (bs, num_queries, 4 * num_feats), cx's channels first.
    """
    frequencies = _frequencies(num_feats, temperature, proposals.device)
    angles = proposals.sigmoid() * (2 * math.pi)
    return _interleave_sin_cos(angles[..., None] / frequencies).flatten(2)


def point_positional_encoding(points: Tensor,
                              num_feats: int = 128,
                              temperature: float = 10000) -> Tensor:
    """Sine encoding of normalised points, the encoding of a map's pixels.

    A point at normalised (x, y) gets the channels a pixel at that place
    gets from :class:`SinePositionalEncoding` with ``normalize=True``
    (scale 2 pi, y's channels first), so queries and keys compare their
    positions in one embedding (Conditional DETR's spatial query).

    Args:
        points (Tensor): (..., 2) normalised (x, y) in [0, 1].
        num_feats (int): Channels per axis. Defaults to 128.
        temperature (float): Base of the frequencies. Defaults to 10000.

    Returns:
        Tensor: (..., 2 * num_feats), y's channels first.
    """
    if points.shape[-1] != 2:
        raise ValueError('point_positional_encoding expects (..., 2) '
                         f'points (x, y), got shape {tuple(points.shape)}.')
    frequencies = _frequencies(num_feats, temperature, points.device)
    angles = points * (2 * math.pi)
    pos_x = _interleave_sin_cos(angles[..., 0, None] / frequencies)
    pos_y = _interleave_sin_cos(angles[..., 1, None] / frequencies)
    return torch.cat((pos_y, pos_x), dim=-1)
