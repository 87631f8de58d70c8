"""Recording where multi-scale deformable attention samples.

:class:`AttentionCapture` hooks chosen
:class:`~ddetr_plugin.models.layers.MultiScaleDeformableAttention` modules
for the duration of a ``with`` block. It never changes what a module
computes: the hooks only read. The module's own methods recompute the
sampling locations and weights from the very query the module used, so the
record holds exactly what the op received; with the block closed, no hook
is left and nothing is paid.
"""
import inspect
from typing import Dict, List, NamedTuple

import torch
from torch import Tensor, nn

from ddetr_plugin.models.layers.ms_deform_attn import \
    MultiScaleDeformableAttention


class AttentionRecord(NamedTuple):
    """What one call of a deformable attention module sampled.

    Attributes:
        sampling_locations (Tensor): (bs, num_queries, num_heads,
            num_levels, num_points, 2), normalised (x, y) on each level's
            padded feature map, as the op received them.
        attention_weights (Tensor): (bs, num_queries, num_heads, num_levels,
            num_points), as the op received them; a head's weights sum to 1.
        reference_points (Tensor): (bs, num_queries, num_levels, 2)
            normalised points or (bs, num_queries, num_levels, 4) normalised
            (cx, cy, w, h) boxes, as the module received them (already
            scaled by each level's valid ratio).
        spatial_shapes (Tensor): (num_levels, 2), (h, w) per level.
        level_start_index (Tensor): (num_levels,), offset of each level in
            the flattened values.
    """
    sampling_locations: Tensor
    attention_weights: Tensor
    reference_points: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor


class AttentionCapture:
    """Record the sampling of some deformable attention modules.

    Usage::

        modules = dict(last=model.transformer.decoder.layers[-1].cross_attn)
        with AttentionCapture(modules) as capture:
            model.test_step(data)
        record = capture.records['last'][0]

    Args:
        modules (dict[str, MultiScaleDeformableAttention]): The modules to
            watch, by a name of the caller's choice.

    Attributes:
        records (dict[str, list[AttentionRecord]]): One record per call of
            each module, in call order, detached from the graph.
    """

    def __init__(self, modules: Dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            if not isinstance(module, MultiScaleDeformableAttention):
                raise TypeError(
                    f'AttentionCapture watches the plugin\'s '
                    f'MultiScaleDeformableAttention modules; {name!r} is a '
                    f'{type(module).__name__}.')
        self.modules = dict(modules)
        self.records: Dict[str, List[AttentionRecord]] = {
            name: []
            for name in modules
        }
        self._handles = []
        # The query each module last gave its attention_weights layer: the
        # query after query_pos and batch-first transposition, exactly as the
        # module used it.
        self._queries: Dict[str, Tensor] = {}

    def __enter__(self) -> 'AttentionCapture':
        for name, module in self.modules.items():
            self._handles.append(
                module.attention_weights.register_forward_pre_hook(
                    self._query_hook(name)))
            self._handles.append(
                module.register_forward_hook(
                    self._record_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._queries = {}

    def _query_hook(self, name: str):

        def hook(linear: nn.Module, args: tuple) -> None:
            self._queries[name] = args[0]

        return hook

    def _record_hook(self, name: str):

        def hook(module: MultiScaleDeformableAttention, args: tuple,
                 kwargs: dict, output: Tensor) -> None:
            arguments = inspect.signature(module.forward).bind(
                *args, **kwargs).arguments
            query = self._queries[name]
            reference_points = arguments['reference_points']
            spatial_shapes = arguments['spatial_shapes']
            with torch.no_grad():
                # The module's own methods on the module's own inputs: the
                # same operations as in its forward, so the same numbers.
                weights = module._attention_weights(query)
                locations = module._sampling_locations(query, reference_points,
                                                       spatial_shapes)
            # Popped only now: the recomputation above calls the hooked
            # layer again.
            del self._queries[name]
            self.records[name].append(
                AttentionRecord(
                    sampling_locations=locations.detach(),
                    attention_weights=weights.detach(),
                    reference_points=reference_points.detach(),
                    spatial_shapes=spatial_shapes.detach(),
                    level_start_index=arguments['level_start_index'].detach()))

        return hook
