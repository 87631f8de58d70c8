"""The picture of one detection's Conditional DETR attention maps.

Left, the image with the detected box and the query's reference point.
Right, one row per head and one column per map (spatial, content,
combined, as in Figures 1 and 4 of Meng et al., ICCV 2021): the map,
resampled at every pixel of the original image, over the image in grey,
with the box, the reference point and the map's peak. Each column has
its own colour bar in attention weight (a map sums to 1 over the image's
cells): the content maps are far flatter than the spatial ones, and one
scale for all would hide them.
"""
from typing import Dict

import matplotlib

matplotlib.use('Agg')  # headless: only files are written
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .conditional_attention_maps import MAP_KINDS  # noqa: E402
from .detector_probe import Detection  # noqa: E402
from .drawing import DPI, _draw_box, _save  # noqa: E402

MAP_COLOURS = 'turbo'
# Inches per map panel; the detection panel is twice as large.
PANEL_SIZE = 2.3
COLUMN_TITLES = dict(
    spatial='spatial: softmax of p_q . p_k',
    content='content: softmax of c_q . c_k',
    combined='combined: softmax of the sum\n(the weights the layer applied)')
BOX_COLOUR = 'lime'
REFERENCE_COLOUR = 'magenta'
PEAK_COLOUR = 'white'
# A dark outline keeps the white peak marker visible on light maps and on
# the legend's white background.
PEAK_OUTLINE = [patheffects.withStroke(linewidth=3.5, foreground='black')]


def _show_grey(axes, grey: np.ndarray) -> None:
    height, width = grey.shape
    # Pixel (0, 0) covers [0, 1) x [0, 1), the convention of the boxes.
    axes.imshow(
        grey,
        cmap='gray',
        vmin=0,
        vmax=255,
        extent=(0, width, height, 0),
        interpolation='nearest')
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)


def _mark_reference(axes, reference: np.ndarray, size: float) -> None:
    axes.plot(
        reference[0],
        reference[1],
        marker='+',
        markersize=size,
        markeredgewidth=size / 6,
        color=REFERENCE_COLOUR,
        zorder=5)


def _legend_handles():
    return [
        Line2D([], [], color=BOX_COLOUR, linewidth=2.5, label='detected box'),
        Line2D([], [],
               linestyle='',
               marker='+',
               markersize=12,
               markeredgewidth=2.5,
               color=REFERENCE_COLOUR,
               label='reference point'),
        Line2D([], [],
               linestyle='',
               marker='o',
               markersize=9,
               markerfacecolor='none',
               markeredgewidth=2,
               markeredgecolor=PEAK_COLOUR,
               path_effects=PEAK_OUTLINE,
               label='peak of the map (heaviest cell)')
    ]


def draw_attention_maps(image: np.ndarray, detection: Detection,
                        reference: np.ndarray, maps: Dict[str, np.ndarray],
                        peaks: Dict[str, np.ndarray], class_name: str,
                        layer: int, query: int, out_file: str) -> None:
    """One detection's picture.

    Args:
        image (np.ndarray): (height, width, 3) RGB original image.
        detection (Detection): The detection.
        reference (np.ndarray): (2,) its query's reference point (x, y) in
            original-image pixels.
        maps (dict[str, np.ndarray]): ``spatial``, ``content`` and
            ``combined``, each (num_heads, height, width): the maps
            resampled at every original-image pixel.
        peaks (dict[str, np.ndarray]): The same keys, each (num_heads, 2)
            (x, y) of the heaviest cell in original-image pixels.
        class_name (str): Name of the detection's class.
        layer (int): The decoder layer, for the title.
        query (int): The query, for the title.
        out_file (str): PNG to write.
    """
    height, width = image.shape[:2]
    num_heads = maps[MAP_KINDS[0]].shape[0]
    aspect = height / width
    detection_rows = min(2, num_heads)
    figure = plt.figure(
        figsize=(PANEL_SIZE * (2 + len(MAP_KINDS)) + 1.2,
                 PANEL_SIZE * aspect * max(num_heads, 2) + 1.9),
        dpi=DPI)
    layout = figure.add_gridspec(
        num_heads + 1,
        1 + len(MAP_KINDS),
        width_ratios=[2] + [1] * len(MAP_KINDS),
        height_ratios=[1] * num_heads + [0.08],
        hspace=0.3,
        wspace=0.12,
        top=1 - 1.0 / figure.get_figheight())
    grey = image.astype(np.float64).mean(-1)
    box = detection.box.numpy()
    label = f'{class_name} {detection.score:.2f}'

    axes = figure.add_subplot(layout[:detection_rows, 0])
    axes.imshow(image, extent=(0, width, height, 0), interpolation='nearest')
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    # The class and score are in the title: a label on the box could hide
    # the reference point.
    _draw_box(axes, box, BOX_COLOUR, None)
    _mark_reference(axes, reference, 16)
    axes.set_title(
        f'{label}\ndecoder layer {layer}, query {query}', fontsize=10)
    axes.tick_params(labelsize=7)
    axes.set_xlabel('x (original-image pixels)', fontsize=8)
    axes.set_ylabel('y (original-image pixels)', fontsize=8)
    legend_axes = figure.add_subplot(layout[detection_rows:num_heads, 0]) \
        if num_heads > detection_rows else None
    (legend_axes or axes).legend(
        handles=_legend_handles(),
        loc='upper center' if legend_axes else 'upper center',
        bbox_to_anchor=(0.5, 1.0) if legend_axes else (0.5, -0.12),
        fontsize=8,
        frameon=False)
    if legend_axes is not None:
        legend_axes.axis('off')

    for column, kind in enumerate(MAP_KINDS, start=1):
        norm = Normalize(vmin=0.0, vmax=max(float(maps[kind].max()), 1e-12))
        for head in range(num_heads):
            axes = figure.add_subplot(layout[head, column])
            _show_grey(axes, grey)
            axes.imshow(
                maps[kind][head],
                cmap=MAP_COLOURS,
                norm=norm,
                alpha=0.6,
                extent=(0, width, height, 0),
                interpolation='nearest')
            axes.add_patch(
                Rectangle((box[0], box[1]),
                          box[2] - box[0],
                          box[3] - box[1],
                          fill=False,
                          linewidth=1.2,
                          edgecolor=BOX_COLOUR,
                          zorder=2))
            _mark_reference(axes, reference, 9)
            peak = peaks[kind][head]
            axes.plot(
                peak[0],
                peak[1],
                marker='o',
                markersize=9,
                markerfacecolor='none',
                markeredgewidth=1.8,
                markeredgecolor=PEAK_COLOUR,
                path_effects=PEAK_OUTLINE,
                zorder=6)
            axes.set_xticks([])
            axes.set_yticks([])
            if head == 0:
                axes.set_title(COLUMN_TITLES[kind], fontsize=9)
            if column == 1:
                axes.set_ylabel(f'head {head}', fontsize=10)
        bar = figure.colorbar(
            ScalarMappable(norm=norm, cmap=MAP_COLOURS),
            cax=figure.add_subplot(layout[num_heads, column]),
            orientation='horizontal')
        bar.set_label(f'{kind} attention weight', fontsize=8)
        bar.ax.tick_params(labelsize=7)
    figure.suptitle(
        'Where Conditional DETR\'s cross-attention looks: per head, weights '
        'over the feature map\'s cells (each map sums to 1)',
        fontsize=11,
        y=1 - 0.25 / figure.get_figheight())
    _save(figure, out_file)
