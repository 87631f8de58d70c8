"""Pictures of where deformable attention samples.

Every picture shows the original image in its own pixel coordinates (the
axes' data coordinates are original-image pixels), enlarged so that a
128-pixel image is still readable: markers and text keep their size while
the image grows. Sampling points are drawn with one marker shape per
feature level, their size and colour by attention weight; points outside
the image are drawn on its border with a red cross and counted in the
legend.
"""
from typing import List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')  # headless: only files are written
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .detector_probe import Detection  # noqa: E402
from .sampling_points import QueryPoints  # noqa: E402

# One marker shape per feature level; levels beyond reuse them.
LEVEL_MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'p', 'h')
# Longest side of the drawn image, in screen pixels: small images are
# enlarged to it, larger ones drawn at their own size.
DRAWN_SIZE = 768
DPI = 100
WEIGHT_COLOURS = 'plasma'
DETECTION_COLOURS = plt.get_cmap('tab10').colors
# Screen pixels between box labels (their coloured margins included).
LABEL_GAP = 4.0


def _canvas(image: np.ndarray, title: str):
    """A figure showing ``image`` (h, w, 3) RGB in its pixel coordinates."""
    height, width = image.shape[:2]
    zoom = max(1.0, DRAWN_SIZE / max(height, width))
    figure, axes = plt.subplots(
        figsize=(width * zoom / DPI + 2.0, height * zoom / DPI + 1.6), dpi=DPI)
    # Pixel (0, 0) covers [0, 1) x [0, 1): the image spans its pixel edges,
    # the convention of the boxes.
    axes.imshow(image, extent=(0, width, height, 0), interpolation='nearest')
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.set_title(title, fontsize=11)
    axes.tick_params(labelsize=8)
    return figure, axes


def _clip(points: np.ndarray, width: int,
          height: int) -> Tuple[np.ndarray, np.ndarray]:
    """Points (n, 2) moved onto the image's border, and which were out."""
    outside = (points[:, 0] < 0) | (points[:, 0] > width) | \
        (points[:, 1] < 0) | (points[:, 1] > height)
    clipped = np.stack(
        (points[:, 0].clip(0, width), points[:, 1].clip(0, height)), 1)
    return clipped, outside


def _marker_sizes(weights: np.ndarray, largest: float) -> np.ndarray:
    # Area grows with the weight; the faintest points stay visible.
    return 12.0 + 220.0 * weights / max(largest, 1e-12)


def _draw_points(axes,
                 query: QueryPoints,
                 image_size: Tuple[int, int],
                 colour: Optional[Sequence[float]] = None,
                 largest: Optional[float] = None):
    """Scatter one query's points; returns (the last scatter, how many
    points lay outside the image)."""
    height, width = image_size
    points = query.points.numpy()
    weights = query.weights.numpy()
    largest = float(weights.max()) if largest is None else largest
    num_levels = points.shape[1]
    scatter, num_outside = None, 0
    for level in range(num_levels):
        # (num_heads, num_points, 2) -> (num_heads * num_points, 2)
        level_points = points[:, level].reshape(-1, 2)
        level_weights = weights[:, level].reshape(-1)
        # Heaviest on top.
        order = np.argsort(level_weights)
        level_points, level_weights = level_points[order], \
            level_weights[order]
        clipped, outside = _clip(level_points, width, height)
        marker = LEVEL_MARKERS[level % len(LEVEL_MARKERS)]
        style = dict(
            c=level_weights, cmap=WEIGHT_COLOURS, vmin=0.0, vmax=largest) \
            if colour is None else dict(color=[colour])
        scatter = axes.scatter(
            clipped[:, 0],
            clipped[:, 1],
            s=_marker_sizes(level_weights, largest),
            marker=marker,
            edgecolors='black',
            linewidths=0.6,
            alpha=0.9,
            zorder=3,
            **style)
        if outside.any():
            num_outside += int(outside.sum())
            axes.scatter(
                clipped[outside, 0],
                clipped[outside, 1],
                s=60,
                marker='x',
                color='red',
                linewidths=1.8,
                zorder=4)
    return scatter, num_outside


def _draw_reference(axes, reference: np.ndarray, colour) -> None:
    """A point as a large plus, a box as a dashed rectangle."""
    if reference.shape[0] == 4:
        x1, y1, x2, y2 = reference
        axes.add_patch(
            Rectangle((x1, y1),
                      x2 - x1,
                      y2 - y1,
                      fill=False,
                      linestyle='--',
                      linewidth=1.5,
                      edgecolor=colour,
                      zorder=2))
        axes.plot(
            (x1 + x2) / 2, (y1 + y2) / 2,
            marker='+',
            markersize=14,
            markeredgewidth=2.5,
            color=colour,
            zorder=5)
    else:
        axes.plot(
            reference[0],
            reference[1],
            marker='+',
            markersize=18,
            markeredgewidth=3,
            color=colour,
            zorder=5)


def _draw_box(axes, box: np.ndarray, colour, text: Optional[str]) -> None:
    x1, y1, x2, y2 = box
    axes.add_patch(
        Rectangle((x1, y1),
                  x2 - x1,
                  y2 - y1,
                  fill=False,
                  linewidth=2.2,
                  edgecolor=colour,
                  zorder=2))
    if text:
        place_box_labels(axes, [(box, text, colour)])


def place_box_labels(axes, labels: Sequence[Tuple[np.ndarray, str, object]]):
    """Write each box's label at its top-left corner, none over another.

    A label sits just above its box, or just inside it when the box
    touches the top of the image; a label that would cover one written
    before moves down, a line at a time, until it is free (overlapping
    detections would otherwise show only the last label).

    Args:
        axes (Axes): Axes showing the image in its pixel coordinates.
        labels (Sequence[tuple]): (box (4,) x1, y1, x2, y2 in image
            pixels, text, colour) of each label, in drawing order.

    Returns:
        list[Annotation]: The labels' text artists, in the same order.
    """
    renderer = axes.figure.canvas.get_renderer()
    top_of_axes = axes.get_window_extent(renderer).y1
    written, artists = [], []
    for box, text, colour in labels:
        artist = axes.annotate(
            text, (box[0], box[1]),
            xytext=(0, 0),
            textcoords='offset pixels',
            fontsize=9,
            color='white',
            va='bottom',
            bbox=dict(facecolor=colour, alpha=0.8, pad=1.5, linewidth=0),
            zorder=6,
            annotation_clip=False)
        extent = artist.get_window_extent(renderer)
        # One line: the text's height and its coloured margin.
        step = extent.height + LABEL_GAP
        shift = -step if extent.y1 > top_of_axes else 0.0
        artist.xyann = (0, shift)
        extent = artist.get_window_extent(renderer).padded(LABEL_GAP / 2)
        while any(extent.overlaps(other) for other in written):
            shift -= step
            artist.xyann = (0, shift)
            extent = artist.get_window_extent(renderer).padded(LABEL_GAP / 2)
        written.append(extent)
        artists.append(artist)
    return artists


def _legend(axes,
            spatial_shapes: np.ndarray,
            reference_is_box: bool,
            num_outside: int,
            extra: Sequence = ()) -> None:
    handles = list(extra)
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        handles.append(
            Line2D([], [],
                   linestyle='',
                   marker=LEVEL_MARKERS[level % len(LEVEL_MARKERS)],
                   markerfacecolor='lightgrey',
                   markeredgecolor='black',
                   markersize=8,
                   label=f'level {level} ({height}x{width})'))
    handles.append(
        Line2D(
            [], [],
            linestyle='--' if reference_is_box else '',
            marker='+',
            color='black',
            markersize=10,
            label='reference box' if reference_is_box else 'reference point'))
    handles.append(
        Line2D([], [],
               linestyle='',
               marker='x',
               color='red',
               markersize=8,
               label=f'outside the image, drawn on its border: '
               f'{num_outside}'))
    axes.legend(
        handles=handles,
        loc='upper center',
        bbox_to_anchor=(0.5, -0.06),
        ncol=3,
        fontsize=8,
        frameon=False)


def _save(figure, out_file: str) -> None:
    figure.savefig(out_file, dpi=DPI, bbox_inches='tight')
    plt.close(figure)


def _weighted_picture(image: np.ndarray, query: QueryPoints, title: str,
                      out_file: str, box: Optional[np.ndarray],
                      box_text: Optional[str]) -> int:
    """One query's points coloured by weight; returns the points outside
    the image."""
    figure, axes = _canvas(image, title)
    if box is not None:
        _draw_box(axes, box, 'lime', box_text)
    _draw_reference(axes, query.reference.numpy(), 'cyan')
    scatter, num_outside = _draw_points(axes, query, image.shape[:2])
    colour_bar = figure.colorbar(scatter, ax=axes, fraction=0.046, pad=0.02)
    colour_bar.set_label('attention weight (a head\'s weights sum to 1)')
    _legend(axes, query.spatial_shapes.numpy(),
            query.reference.numel() == 4, num_outside)
    _save(figure, out_file)
    return num_outside


def draw_detection(image: np.ndarray, detection: Detection, query: QueryPoints,
                   class_name: str, layer: int, out_file: str) -> int:
    """The detected box, its query's reference and sampling points.

    Args:
        image (np.ndarray): (h, w, 3) RGB original image.
        detection (Detection): The detection.
        query (QueryPoints): Its query's points in the chosen layer.
        class_name (str): Name of its class.
        layer (int): The decoder layer, for the title.
        out_file (str): PNG to write.

    Returns:
        int: Sampling points outside the image (drawn on its border).
    """
    num_heads, num_levels, num_points = query.weights.shape
    title = (f'{class_name} {detection.score:.2f}: decoder layer {layer}, '
             f'query {detection.query}\n{num_heads} heads x {num_levels} '
             f'levels x {num_points} points')
    return _weighted_picture(image, query, title, out_file,
                             detection.box.numpy(),
                             f'{class_name} {detection.score:.2f}')


def draw_encoder_query(image: np.ndarray, query: QueryPoints,
                       pixel: Sequence[float], level: int, layer: int,
                       out_file: str) -> int:
    """One encoder query's reference and sampling points on every level.

    Args:
        image (np.ndarray): (h, w, 3) RGB original image.
        query (QueryPoints): The encoder query's points.
        pixel (Sequence[float]): (x, y) asked for, original-image pixels.
        level (int): The query's own level.
        layer (int): The encoder layer, for the title.
        out_file (str): PNG to write.

    Returns:
        int: Sampling points outside the image.
    """
    num_heads, num_levels, num_points = query.weights.shape
    title = (f'encoder layer {layer}, query of pixel ({pixel[0]:g}, '
             f'{pixel[1]:g}) on level {level}\n{num_heads} heads x '
             f'{num_levels} levels x {num_points} points')
    return _weighted_picture(image, query, title, out_file, None, None)


def draw_overview(image: np.ndarray, detections: List[Detection],
                  queries: List[QueryPoints], class_names: Sequence[str],
                  layer: int, out_file: str) -> int:
    """All selected detections, each with its points in its own colour.

    Args:
        image (np.ndarray): (h, w, 3) RGB original image.
        detections (list[Detection]): The detections.
        queries (list[QueryPoints]): Their queries' points, same order.
        class_names (Sequence[str]): Name of each class.
        layer (int): The decoder layer, for the title.
        out_file (str): PNG to write.

    Returns:
        int: Sampling points outside the image, all detections together.
    """
    figure, axes = _canvas(
        image, f'{len(detections)} detections: sampling points of decoder '
        f'layer {layer}\n(marker size by attention weight)')
    largest = max([float(query.weights.max()) for query in queries] + [0.0])
    num_outside, entries, labels = 0, [], []
    for index, (detection, query) in enumerate(zip(detections, queries)):
        colour = DETECTION_COLOURS[index % len(DETECTION_COLOURS)]
        _, outside = _draw_points(axes, query, image.shape[:2], colour,
                                  largest)
        num_outside += outside
        _draw_reference(axes, query.reference.numpy(), colour)
        name = class_names[detection.label]
        _draw_box(axes, detection.box.numpy(), colour, None)
        labels.append((detection.box.numpy(),
                       f'{index}: {name} {detection.score:.2f}', colour))
        entries.append(
            Line2D([], [],
                   color=colour,
                   linewidth=3,
                   label=f'{index}: {name}, query {detection.query}'))
    # Together, so that overlapping detections' labels avoid each other.
    place_box_labels(axes, labels)
    spatial_shapes = queries[0].spatial_shapes.numpy() if queries else \
        np.zeros((0, 2), dtype=np.int64)
    reference_is_box = bool(queries) and queries[0].reference.numel() == 4
    _legend(axes, spatial_shapes, reference_is_box, num_outside, entries)
    _save(figure, out_file)
    return num_outside
