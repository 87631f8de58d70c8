"""Small perceptrons of the DETR family (box branches, reference heads)."""
from torch import nn


def build_mlp(input_dims: int, hidden_dims: int, output_dims: int,
              num_layers: int) -> nn.Sequential:
    """``num_layers`` linear layers with a ReLU between each two.

    The layers sit at even indices (0, 2, 4, ...) of the returned
    ``nn.Sequential``, the ReLUs at odd ones, so checkpoint keys read
    ``NAME.0.weight``, ``NAME.2.weight``...

    Args:
        input_dims (int): Channels of the input (..., input_dims).
        hidden_dims (int): Channels of every hidden layer.
        output_dims (int): Channels of the output (..., output_dims).
        num_layers (int): Linear layers, at least 1.

    Returns:
        nn.Sequential: Maps (..., input_dims) to (..., output_dims).
    """
    if isinstance(num_layers,
                  bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError('build_mlp: num_layers must be an int >= 1, got '
                         f'{num_layers!r}.')
    widths = [input_dims] + [hidden_dims] * (num_layers - 1) + [output_dims]
    modules = []
    for index in range(num_layers):
        if index:
            modules.append(nn.ReLU())
        modules.append(nn.Linear(widths[index], widths[index + 1]))
    return nn.Sequential(*modules)
