"""SinePositionalEncoding: arguments checked when built, masks of any
integer or floating type read as MMDetection reads them."""
import math

import pytest
import torch

from ddetr_plugin.models.layers import SinePositionalEncoding


@pytest.mark.parametrize('arguments, error, message', [
    (dict(scale=(3., )), TypeError, r'scale must be a number.*tuple'),
    (dict(temperature='10000'), TypeError, 'temperature must be a number'),
    (dict(temperature=0), ValueError, 'temperature must be positive'),
    (dict(offset=None), TypeError, 'offset must be a number'),
    (dict(eps=-1e-6), ValueError, 'eps must not be negative'),
    (dict(scale=math.inf), ValueError, 'scale must be finite'),
    (dict(normalize='yes'), TypeError, 'normalize must be a bool'),
    (dict(num_feats=15), ValueError, 'positive even int'),
    (dict(num_feats=16.0), ValueError, 'positive even int'),
])
def test_bad_arguments_fail_at_construction(arguments, error, message):
    arguments = dict(dict(num_feats=16, normalize=True), **arguments)
    with pytest.raises(error, match=message):
        SinePositionalEncoding(**arguments)


def _padded_mask():
    """(2, 5, 7) True at padding: the second image is 3 x 4."""
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 4:] = True
    return mask


@pytest.mark.parametrize(
    'dtype', [torch.uint8, torch.int32, torch.int64, torch.float32])
@pytest.mark.parametrize('normalize', [False, True])
def test_integer_and_float_masks_equal_bool_masks(dtype, normalize):
    encoding = SinePositionalEncoding(
        num_feats=8, normalize=normalize, offset=-0.5 if normalize else 0.)
    mask = _padded_mask()
    expected = encoding(mask)
    torch.testing.assert_close(encoding(mask.to(dtype)), expected)


def test_integer_mask_matches_mmdet():
    layers = pytest.importorskip('mmdet.models.layers')
    theirs = layers.SinePositionalEncoding(
        num_feats=8, normalize=True, offset=-0.5)
    ours = SinePositionalEncoding(num_feats=8, normalize=True, offset=-0.5)
    mask = _padded_mask().to(torch.int64)
    torch.testing.assert_close(ours(mask), theirs(mask))


def test_mask_of_wrong_rank_is_refused():
    encoding = SinePositionalEncoding(num_feats=8)
    with pytest.raises(ValueError, match=r'\(bs, h, w\), got \(5, 7\)'):
        encoding(torch.zeros(5, 7, dtype=torch.bool))


@pytest.mark.parametrize('normalize, offset', [(True, -0.5), (False, 0.0)])
def test_unpadded_encoding_is_the_all_valid_mask_to_the_bit(normalize, offset):
    encoding = SinePositionalEncoding(64, normalize=normalize, offset=offset)
    # Odd, single-row/column and R50-like level sizes.
    for height, width in ((1, 1), (1, 17), (7, 13), (25, 38), (100, 152)):
        expected = encoding(torch.zeros(2, height, width, dtype=torch.bool))
        result = encoding.forward_unpadded(2, height, width,
                                           torch.device('cpu'))
        assert result.shape == expected.shape
        assert torch.equal(result, expected), (height, width)
