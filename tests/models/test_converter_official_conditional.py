"""Official ConditionalDETR checkpoints converted to mmdet / plugin models.

The fake official checkpoints are written from the official repository's
module structure (Atten4Vis/ConditionalDETR: torchvision ResNet-50 with
frozen batch norm under ``backbone.0.body``, one ``input_proj``
convolution, ``nn.MultiheadAttention`` in the encoder, the decoder's
``sa_*``/``ca_*`` projections with the first layer's ``ca_qpos_proj``
only, ``query_scale`` and ``ref_point_head`` MLPs, the decoder's final
``norm``, a 91-output ``class_embed`` and a three-layer ``bbox_embed``),
independently of the converter's rename table.
"""
import argparse
import os.path as osp
from collections import OrderedDict

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from ddetr_plugin.converters import load_converted
from ddetr_plugin.converters import official as converter
from testkit import REPO, build_in_mmdet_scope, load_script, mmdet_mim

HERE = osp.dirname(osp.abspath(__file__))

MMDET_CONFIG = mmdet_mim('configs', 'conditional_detr',
                         'conditional-detr_r50_8xb2-50e_coco.py')
PLUGIN_CONFIG = osp.join(REPO, 'configs', 'conditional_detr',
                         'conditional-detr_r50_8xb2-50e_coco.py')
DEFORMABLE_CONFIG = osp.join(REPO, 'configs', 'deformable_detr',
                             'deformable-detr_r50_16xb2-50e_coco.py')
EMBED_DIMS, FFN_DIMS, NUM_LAYERS, NUM_QUERIES = 256, 2048, 6, 300

# The fake official Deformable-DETR checkpoints and ResNet-50 shapes.
deformable = load_script(
    osp.join(HERE, 'test_converter_official.py'), 'official_deformable')
tool = load_script('tools/model_converters/official_to_plugin.py')


def official_shapes() -> 'OrderedDict[str, tuple]':
    """Key -> shape of an official R50 Conditional DETR state dict."""
    shapes = deformable.official_resnet50_shapes()

    def linear(name, out_features=EMBED_DIMS, in_features=EMBED_DIMS):
        shapes[f'{name}.weight'] = (out_features, in_features)
        shapes[f'{name}.bias'] = (out_features, )

    def norm(name):
        shapes[f'{name}.weight'] = (EMBED_DIMS, )
        shapes[f'{name}.bias'] = (EMBED_DIMS, )

    def feedforward(name):
        linear(f'{name}.linear1', FFN_DIMS, EMBED_DIMS)
        linear(f'{name}.linear2', EMBED_DIMS, FFN_DIMS)

    shapes['input_proj.weight'] = (EMBED_DIMS, 2048, 1, 1)
    shapes['input_proj.bias'] = (EMBED_DIMS, )
    for index in range(NUM_LAYERS):
        name = f'transformer.encoder.layers.{index}'
        shapes[f'{name}.self_attn.in_proj_weight'] = (3 * EMBED_DIMS,
                                                      EMBED_DIMS)
        shapes[f'{name}.self_attn.in_proj_bias'] = (3 * EMBED_DIMS, )
        linear(f'{name}.self_attn.out_proj')
        feedforward(name)
        norm(f'{name}.norm1')
        norm(f'{name}.norm2')
    for index in range(NUM_LAYERS):
        name = f'transformer.decoder.layers.{index}'
        for part in ('qcontent', 'qpos', 'kcontent', 'kpos', 'v'):
            linear(f'{name}.sa_{part}_proj')
        linear(f'{name}.self_attn.out_proj')
        # Later layers set ca_qpos_proj to None: no weights saved.
        parts = ['qcontent', 'qpos', 'kcontent', 'kpos', 'v', 'qpos_sine']
        for part in parts if index == 0 else parts[:1] + parts[2:]:
            linear(f'{name}.ca_{part}_proj')
        linear(f'{name}.cross_attn.out_proj')
        feedforward(name)
        for number in (1, 2, 3):
            norm(f'{name}.norm{number}')
    norm('transformer.decoder.norm')
    linear('transformer.decoder.query_scale.layers.0')
    linear('transformer.decoder.query_scale.layers.1')
    linear('transformer.decoder.ref_point_head.layers.0')
    linear('transformer.decoder.ref_point_head.layers.1', 2)
    shapes['query_embed.weight'] = (NUM_QUERIES, EMBED_DIMS)
    linear('class_embed', 91)
    linear('bbox_embed.layers.0')
    linear('bbox_embed.layers.1')
    linear('bbox_embed.layers.2', 4)
    return shapes


def fake_official_checkpoint(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    model = OrderedDict((key, torch.randn(shape, generator=generator))
                        for key, shape in official_shapes().items())
    return dict(
        model=model,
        epoch=49,
        args=argparse.Namespace(lr=1e-4, backbone='resnet50', dilation=False))


def test_the_fake_has_the_official_key_count():
    # Counted on the official model (see CONDITIONAL_DETR_NOTES.md).
    assert len(official_shapes()) == 564


@pytest.fixture(scope='module')
def checkpoint():
    return fake_official_checkpoint()


def test_converted_weights_load_strictly_into_mmdet(checkpoint):
    official = checkpoint['model']
    state_dict = converter.official_to_mmdet_state_dict(checkpoint)
    config = Config.fromfile(MMDET_CONFIG)
    config.model.backbone.init_cfg = None
    model = build_in_mmdet_scope(config.model)
    model.load_state_dict(state_dict, strict=True)
    assert len(state_dict) == len(model.state_dict()) == 617
    mmdet_state = model.state_dict()
    # The official decoder layer's norm1 follows self-attention, as
    # mmdet's norms.0 does; its bbox_embed's last layer is mmdet's fc_reg.
    pairs = {
        'decoder.layers.2.norms.0.weight':
        'transformer.decoder.layers.2.norm1.weight',
        'decoder.layers.2.norms.2.bias':
        'transformer.decoder.layers.2.norm3.bias',
        'decoder.layers.0.cross_attn.qpos_proj.weight':
        'transformer.decoder.layers.0.ca_qpos_proj.weight',
        'decoder.layers.4.cross_attn.qpos_sine_proj.bias':
        'transformer.decoder.layers.4.ca_qpos_sine_proj.bias',
        'decoder.layers.1.self_attn.kpos_proj.weight':
        'transformer.decoder.layers.1.sa_kpos_proj.weight',
        'encoder.layers.3.self_attn.attn.in_proj_weight':
        'transformer.encoder.layers.3.self_attn.in_proj_weight',
        'decoder.post_norm.weight':
        'transformer.decoder.norm.weight',
        'decoder.ref_point_head.layers.1.weight':
        'transformer.decoder.ref_point_head.layers.1.weight',
        'neck.convs.0.conv.bias':
        'input_proj.bias',
        'bbox_head.fc_reg.weight':
        'bbox_embed.layers.2.weight',
        'bbox_head.reg_ffn.layers.0.0.bias':
        'bbox_embed.layers.0.bias',
        'query_embedding.weight':
        'query_embed.weight',
        'backbone.layer4.2.bn3.running_var':
        'backbone.0.body.layer4.2.bn3.running_var',
    }
    for mmdet_key, official_key in pairs.items():
        assert torch.equal(mmdet_state[mmdet_key],
                           official[official_key]), mmdet_key
    # The 80 COCO ids, in mmdet's class order.
    ids = converter.COCO_CATEGORY_IDS
    assert torch.equal(mmdet_state['bbox_head.fc_cls.weight'],
                       official['class_embed.weight'][list(ids)])
    assert torch.equal(mmdet_state['bbox_head.fc_cls.bias'][[0, -1]],
                       official['class_embed.bias'][[1, 90]])


def test_converted_weights_load_strictly_into_the_plugin(checkpoint):
    config = Config.fromfile(PLUGIN_CONFIG)
    config.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        from ddetr_plugin.registry import MODELS
        model = MODELS.build(config.model)
    converted = converter.convert_official_state_dict(checkpoint)
    load_converted(model, converted)
    assert torch.equal(
        model.state_dict()['transformer.decoder.query_scale.2.weight'],
        checkpoint['model']['transformer.decoder.query_scale.layers.1.weight'])


def test_tool_checks_the_detector_of_the_config(checkpoint, tmp_path):
    source = str(tmp_path / 'official.pth')
    output = str(tmp_path / 'plugin.pth')
    torch.save(checkpoint, source)
    tool.main([source, output, '--config', PLUGIN_CONFIG])
    saved = torch.load(output, weights_only=True)
    assert saved['meta']['source_layout'] == 'official ConditionalDETR'
    assert saved['state_dict']['bbox_head.cls_branch.weight'].shape[0] == 80

    with pytest.raises(
            converter.OfficialCheckpointError,
            match='builds a DeformableDETR but the checkpoint holds '
            'official ConditionalDETR weights; give a ConditionalDETR '
            r'config \(configs/conditional_detr/'):
        tool.main([source, output, '--config', DEFORMABLE_CONFIG])
    with pytest.raises(
            converter.OfficialCheckpointError,
            match='--variant plain is for Deformable-DETR checkpoints'):
        tool.main([source, output, '--variant', 'plain'])

    deformable_source = str(tmp_path / 'deformable.pth')
    torch.save(deformable.fake_official_checkpoint('plain'), deformable_source)
    with pytest.raises(
            converter.OfficialCheckpointError,
            match='builds a ConditionalDETR but the checkpoint holds '
            'official DeformableDETR weights'):
        tool.main([deformable_source, output, '--config', PLUGIN_CONFIG])
