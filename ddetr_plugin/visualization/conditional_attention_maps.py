"""Recording where Conditional DETR's cross-attention looks.

Each head of Conditional DETR's cross-attention scores a key by the sum of
a content match and a spatial match, ``(c_q . c_k + p_q . p_k) /
sqrt(2 * head_dims)`` (Meng et al., ICCV 2021, Sec. 3.3). Its Figures 1
and 4 show, per head, the softmax over the keys of each match alone and of
their sum; the last is the weight the layer applied.

:class:`ConditionalAttentionCapture` hooks chosen
:class:`~ddetr_plugin.models.layers.ConditionalAttention` cross-attention
modules for the duration of a ``with`` block. The hooks only read: a
forward pre-hook keeps the inputs as the module received them, a forward
hook recomputes the content and spatial halves with the module's own
:meth:`~ddetr_plugin.models.layers.ConditionalAttention.cross_attention_parts`
(the code its forward runs) and keeps the three maps and the output. With
the block closed no hook is left.

Shape shorthand: ``bs`` images, ``num_heads`` heads, ``num_queries``
object queries, ``num_keys`` positions of the encoder memory (``h * w``
cells of the feature map, row by row).
"""
import inspect
import math
from typing import Dict, List, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ddetr_plugin.models.layers.conditional_attention import \
    ConditionalAttention

# The three maps of the paper's figures, in the order they are drawn.
MAP_KINDS = ('spatial', 'content', 'combined')


class ConditionalAttentionRecord(NamedTuple):
    """What one call of a conditional cross-attention attended to.

    All three maps are softmaxes over the keys of logits scaled by the same
    ``1 / sqrt(2 * head_dims)``, so that the combined logits are exactly
    the spatial plus the content logits. Padded keys get 0 in every map.

    Attributes:
        spatial (Tensor): (bs, num_heads, num_queries, num_keys) softmax of
            the spatial match ``p_q . p_k``.
        content (Tensor): (bs, num_heads, num_queries, num_keys) softmax of
            the content match ``c_q . c_k``.
        combined (Tensor): (bs, num_heads, num_queries, num_keys) softmax
            of their sum: the weights the layer applied to its values.
        key_padding_mask (Tensor, optional): (bs, num_keys) bool, True at
            padding, as the module received it; None when unpadded.
        query (Tensor): (bs, num_queries, embed_dims) the module's input
            query (its shortcut).
        key (Tensor): (bs, num_keys, embed_dims) the encoder memory the
            module's values are projected from.
        output (Tensor): (bs, num_queries, embed_dims) the module's output.
    """
    spatial: Tensor
    content: Tensor
    combined: Tensor
    key_padding_mask: Optional[Tensor]
    query: Tensor
    key: Tensor
    output: Tensor


def attention_maps(module: ConditionalAttention, query: Tensor,
                   query_pos: Tensor, key: Tensor, key_pos: Tensor,
                   key_padding_mask: Optional[Tensor],
                   ref_sine_embed: Tensor) -> Dict[str, Tensor]:
    """The spatial, content and combined attention weights of a module.

    Args:
        module (ConditionalAttention): A cross-attention module.
        query, query_pos, key, key_pos, key_padding_mask, ref_sine_embed:
            The module's forward arguments, see
            :meth:`ConditionalAttention.forward`.

    Returns:
        dict[str, Tensor]: ``spatial``, ``content`` and ``combined``, each
        (bs, num_heads, num_queries, num_keys), summing to 1 over the
        unpadded keys.
    """
    content_query, spatial_query, content_key, spatial_key = \
        module.cross_attention_parts(query, query_pos, key, key_pos,
                                     ref_sine_embed)
    # The scale of the layer's scaled dot product: the query and key
    # channels per head, content and spatial together.
    scale = 1.0 / math.sqrt(content_query.shape[-1] + spatial_query.shape[-1])
    logits = dict(
        spatial=spatial_query @ spatial_key.transpose(-2, -1) * scale,
        content=content_query @ content_key.transpose(-2, -1) * scale)
    logits['combined'] = logits['spatial'] + logits['content']
    maps = {}
    for kind in MAP_KINDS:
        kind_logits = logits[kind]
        if key_padding_mask is not None:
            kind_logits = kind_logits.masked_fill(
                key_padding_mask[:, None, None, :], float('-inf'))
        maps[kind] = kind_logits.softmax(-1)
    return maps


class ConditionalAttentionCapture:
    """Record the attention maps of some conditional cross-attentions.

    Usage::

        layer = model.transformer.decoder.layers[-1]
        with ConditionalAttentionCapture(dict(last=layer.cross_attn)) as \\
                capture:
            model.test_step(data)
        record = capture.records['last'][0]

    Args:
        modules (dict[str, ConditionalAttention]): Cross-attention modules
            to watch, by a name of the caller's choice.

    Attributes:
        records (dict[str, list[ConditionalAttentionRecord]]): One record
            per call of each module, in call order, detached from the graph.

    Raises:
        TypeError: A module is not a cross-attention ``ConditionalAttention``.
        ValueError: A module is in training mode with attention dropout
            (entering the block): the weights it applies would be random.
    """

    def __init__(self, modules: Dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            if not isinstance(module, ConditionalAttention) or \
                    not module.cross_attn:
                raise TypeError(
                    'ConditionalAttentionCapture watches the cross-attention '
                    'ConditionalAttention modules of Conditional DETR\'s '
                    f'decoder; {name!r} is a {type(module).__name__}' +
                    (' without cross_attn' if isinstance(
                        module, ConditionalAttention) else '') + '.')
        self.modules = dict(modules)
        self.records: Dict[str, List[ConditionalAttentionRecord]] = {
            name: []
            for name in modules
        }
        self._handles = []
        # The arguments each module's current call received.
        self._arguments: Dict[str, dict] = {}

    def __enter__(self) -> 'ConditionalAttentionCapture':
        for name, module in self.modules.items():
            if module.training and module.attn_drop > 0:
                raise ValueError(
                    f'{name!r} is in training mode with attn_drop='
                    f'{module.attn_drop}: the weights it applies are '
                    'randomly dropped, not the maps this records; call '
                    'model.eval() first.')
        for name, module in self.modules.items():
            self._handles.append(
                module.register_forward_pre_hook(
                    self._inputs_hook(name), with_kwargs=True))
            self._handles.append(
                module.register_forward_hook(self._record_hook(name)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._arguments = {}

    def _inputs_hook(self, name: str):

        def hook(module: ConditionalAttention, args: tuple,
                 kwargs: dict) -> None:
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            bound.apply_defaults()
            self._arguments[name] = dict(bound.arguments)

        return hook

    def _record_hook(self, name: str):

        def hook(module: ConditionalAttention, args: tuple,
                 output: Tensor) -> None:
            arguments = self._arguments.pop(name)
            with torch.no_grad():
                maps = attention_maps(module, **arguments)
            mask = arguments['key_padding_mask']
            self.records[name].append(
                ConditionalAttentionRecord(
                    spatial=maps['spatial'].detach(),
                    content=maps['content'].detach(),
                    combined=maps['combined'].detach(),
                    key_padding_mask=None if mask is None else mask.detach(),
                    query=arguments['query'].detach(),
                    key=arguments['key'].detach(),
                    output=output.detach()))

        return hook
