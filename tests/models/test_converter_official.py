"""Official Deformable-DETR checkpoints converted to mmdet / plugin models.

The fake official checkpoints are written from the official repository's
module structure (torchvision ResNet-50 with frozen batch norm, the
``input_proj`` list, ``DeformableTransformer``, ``class_embed`` and the
``bbox_embed`` MLPs), independently of the converter's rename table.
"""
import argparse
import datetime
import os
import os.path as osp
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from mmdet.datasets import CocoDataset
from mmengine.config import Config
from mmengine.registry import DefaultScope

from ddetr_plugin.converters import official as converter
from testkit import REPO, build_in_mmdet_scope, mmdet_mim

MMDET_CONFIG_DIR = mmdet_mim('configs', 'deformable_detr')
CONFIG_NAMES = {
    'plain': 'deformable-detr_r50_16xb2-50e_coco.py',
    'refine': 'deformable-detr-refine_r50_16xb2-50e_coco.py',
    'two-stage': 'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
}
EMBED_DIMS, FFN_DIMS, NUM_HEADS, NUM_LEVELS, NUM_POINTS = 256, 1024, 8, 4, 4
NUM_LAYERS, NUM_QUERIES, NUM_OFFICIAL_CLASSES = 6, 300, 91


def official_resnet50_shapes() -> dict:
    """torchvision ResNet-50 (frozen BN, no fc) under backbone.0.body."""
    shapes = OrderedDict()

    def batch_norm(name, channels):
        for buffer in ('weight', 'bias', 'running_mean', 'running_var'):
            shapes[f'{name}.{buffer}'] = (channels, )

    shapes['conv1.weight'] = (64, 3, 7, 7)
    batch_norm('bn1', 64)
    in_channels = 64
    for stage, (blocks, planes) in enumerate(
            zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            name = f'layer{stage}.{block}'
            shapes[f'{name}.conv1.weight'] = (planes, in_channels, 1, 1)
            batch_norm(f'{name}.bn1', planes)
            shapes[f'{name}.conv2.weight'] = (planes, planes, 3, 3)
            batch_norm(f'{name}.bn2', planes)
            shapes[f'{name}.conv3.weight'] = (planes * 4, planes, 1, 1)
            batch_norm(f'{name}.bn3', planes * 4)
            if block == 0:
                shapes[f'{name}.downsample.0.weight'] = (planes * 4,
                                                         in_channels, 1, 1)
                batch_norm(f'{name}.downsample.1', planes * 4)
            in_channels = planes * 4
    return OrderedDict(
        (f'backbone.0.body.{key}', shape) for key, shape in shapes.items())


def official_shapes(variant: str) -> 'OrderedDict[str, tuple]':
    """Key -> shape of an official R50 Deformable DETR state dict."""
    shapes = official_resnet50_shapes()

    def linear(name, out_features, in_features):
        shapes[f'{name}.weight'] = (out_features, in_features)
        shapes[f'{name}.bias'] = (out_features, )

    def norm(name, channels=EMBED_DIMS):
        shapes[f'{name}.weight'] = (channels, )
        shapes[f'{name}.bias'] = (channels, )

    def deformable_attention(name):
        linear(f'{name}.sampling_offsets',
               NUM_HEADS * NUM_LEVELS * NUM_POINTS * 2, EMBED_DIMS)
        linear(f'{name}.attention_weights',
               NUM_HEADS * NUM_LEVELS * NUM_POINTS, EMBED_DIMS)
        linear(f'{name}.value_proj', EMBED_DIMS, EMBED_DIMS)
        linear(f'{name}.output_proj', EMBED_DIMS, EMBED_DIMS)

    for level, channels in enumerate((512, 1024, 2048)):
        shapes[f'input_proj.{level}.0.weight'] = (EMBED_DIMS, channels, 1, 1)
        shapes[f'input_proj.{level}.0.bias'] = (EMBED_DIMS, )
        norm(f'input_proj.{level}.1')
    shapes['input_proj.3.0.weight'] = (EMBED_DIMS, 2048, 3, 3)
    shapes['input_proj.3.0.bias'] = (EMBED_DIMS, )
    norm('input_proj.3.1')
    shapes['transformer.level_embed'] = (NUM_LEVELS, EMBED_DIMS)
    for layer in range(NUM_LAYERS):
        name = f'transformer.encoder.layers.{layer}'
        deformable_attention(f'{name}.self_attn')
        norm(f'{name}.norm1')
        linear(f'{name}.linear1', FFN_DIMS, EMBED_DIMS)
        linear(f'{name}.linear2', EMBED_DIMS, FFN_DIMS)
        norm(f'{name}.norm2')
    for layer in range(NUM_LAYERS):
        name = f'transformer.decoder.layers.{layer}'
        deformable_attention(f'{name}.cross_attn')
        norm(f'{name}.norm1')
        shapes[f'{name}.self_attn.in_proj_weight'] = (3 * EMBED_DIMS,
                                                      EMBED_DIMS)
        shapes[f'{name}.self_attn.in_proj_bias'] = (3 * EMBED_DIMS, )
        linear(f'{name}.self_attn.out_proj', EMBED_DIMS, EMBED_DIMS)
        norm(f'{name}.norm2')
        linear(f'{name}.linear1', FFN_DIMS, EMBED_DIMS)
        linear(f'{name}.linear2', EMBED_DIMS, FFN_DIMS)
        norm(f'{name}.norm3')
    if variant == 'two-stage':
        linear('transformer.enc_output', EMBED_DIMS, EMBED_DIMS)
        norm('transformer.enc_output_norm')
        linear('transformer.pos_trans', 2 * EMBED_DIMS, 2 * EMBED_DIMS)
        norm('transformer.pos_trans_norm', 2 * EMBED_DIMS)
    else:
        linear('transformer.reference_points', 2, EMBED_DIMS)
        shapes['query_embed.weight'] = (NUM_QUERIES, 2 * EMBED_DIMS)
    num_pred = NUM_LAYERS + 1 if variant == 'two-stage' else NUM_LAYERS
    heads = OrderedDict()
    for index in range(num_pred):
        heads[f'class_embed.{index}.weight'] = (NUM_OFFICIAL_CLASSES,
                                                EMBED_DIMS)
        heads[f'class_embed.{index}.bias'] = (NUM_OFFICIAL_CLASSES, )
        for layer, out_features in enumerate((EMBED_DIMS, EMBED_DIMS, 4)):
            heads[f'bbox_embed.{index}.layers.{layer}.weight'] = (out_features,
                                                                  EMBED_DIMS)
            heads[f'bbox_embed.{index}.layers.{layer}.bias'] = (out_features, )
    shapes.update(heads)
    # Refinement and two-stage alias the branches into the decoder.
    if variant != 'plain':
        for key, shape in heads.items():
            if key.startswith('bbox_embed') or variant == 'two-stage':
                shapes[f'transformer.decoder.{key}'] = shape
    return shapes


def fake_official_state_dict(variant: str, seed: int = 0) -> OrderedDict:
    """Random weights in the official layout; shared branches are shared."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = OrderedDict()
    for key, shape in official_shapes(variant).items():
        state_dict[key] = torch.randn(shape, generator=generator)
    if variant == 'plain':
        for key in state_dict:
            if key.startswith(('class_embed.', 'bbox_embed.')):
                first = key.split('.', 2)
                state_dict[key] = state_dict[f'{first[0]}.0.{first[2]}']
    else:
        for key in state_dict:
            if key.startswith('transformer.decoder.class_embed') or \
                    key.startswith('transformer.decoder.bbox_embed'):
                state_dict[key] = state_dict[key[len('transformer.decoder.'):]]
    return state_dict


def fake_official_checkpoint(variant: str) -> dict:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    return dict(
        model=fake_official_state_dict(variant),
        optimizer=optimizer.state_dict(),
        lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer,
                                                     40).state_dict(),
        epoch=49,
        args=argparse.Namespace(
            lr=2e-4,
            backbone='resnet50',
            with_box_refine=variant != 'plain',
            two_stage=variant == 'two-stage',
            num_queries=300,
            lr_drop_epochs=None))


def build_mmdet_model(variant: str):
    """mmdet 3.3.0's model, whose neck keeps the official conv biases."""
    config = Config.fromfile(osp.join(MMDET_CONFIG_DIR, CONFIG_NAMES[variant]))
    config.model.backbone.init_cfg = None
    config.model.neck.bias = True
    return build_in_mmdet_scope(config.model)


@pytest.fixture(scope='module', params=list(CONFIG_NAMES))
def converted(request):
    """(variant, fake official state dict, mmdet-layout conversion)."""
    variant = request.param
    official = fake_official_state_dict(variant)
    checkpoint = dict(model=official, epoch=49, args=argparse.Namespace())
    return variant, official, converter.official_to_mmdet_state_dict(
        checkpoint)


def test_converted_weights_load_strictly_into_mmdet(converted):
    variant, official, state_dict = converted
    model = build_mmdet_model(variant)
    problems = converter.compare_state_dicts(state_dict, model.state_dict())
    assert problems == dict(missing=[], unexpected=[], shape=[])
    model.load_state_dict(state_dict, strict=True)
    loaded = model.state_dict()
    # Hand-checked correspondences.
    pairs = {
        'backbone.conv1.weight': 'backbone.0.body.conv1.weight',
        'backbone.layer3.5.bn2.running_var':
        'backbone.0.body.layer3.5.bn2.running_var',
        'backbone.layer4.0.downsample.1.weight':
        'backbone.0.body.layer4.0.downsample.1.weight',
        'neck.convs.1.conv.bias': 'input_proj.1.0.bias',
        'neck.convs.2.gn.weight': 'input_proj.2.1.weight',
        'neck.extra_convs.0.conv.weight': 'input_proj.3.0.weight',
        'neck.extra_convs.0.gn.bias': 'input_proj.3.1.bias',
        'level_embed': 'transformer.level_embed',
        'encoder.layers.2.self_attn.sampling_offsets.weight':
        'transformer.encoder.layers.2.self_attn.sampling_offsets.weight',
        'encoder.layers.5.ffn.layers.0.0.weight':
        'transformer.encoder.layers.5.linear1.weight',
        'encoder.layers.5.ffn.layers.1.bias':
        'transformer.encoder.layers.5.linear2.bias',
        'encoder.layers.0.norms.0.weight':
        'transformer.encoder.layers.0.norm1.weight',
        'encoder.layers.0.norms.1.bias':
        'transformer.encoder.layers.0.norm2.bias',
        'decoder.layers.3.self_attn.attn.in_proj_weight':
        'transformer.decoder.layers.3.self_attn.in_proj_weight',
        'decoder.layers.3.self_attn.attn.out_proj.bias':
        'transformer.decoder.layers.3.self_attn.out_proj.bias',
        'decoder.layers.3.cross_attn.value_proj.weight':
        'transformer.decoder.layers.3.cross_attn.value_proj.weight',
        # Self-attention is followed by norm2, cross-attention by norm1.
        'decoder.layers.3.norms.0.weight':
        'transformer.decoder.layers.3.norm2.weight',
        'decoder.layers.3.norms.1.weight':
        'transformer.decoder.layers.3.norm1.weight',
        'decoder.layers.3.norms.2.bias':
        'transformer.decoder.layers.3.norm3.bias',
        'bbox_head.reg_branches.2.0.weight': 'bbox_embed.2.layers.0.weight',
        'bbox_head.reg_branches.2.2.bias': 'bbox_embed.2.layers.1.bias',
        'bbox_head.reg_branches.5.4.weight': 'bbox_embed.5.layers.2.weight',
    }
    if variant == 'two-stage':
        pairs.update({
            'memory_trans_fc.weight':
            'transformer.enc_output.weight',
            'memory_trans_norm.bias':
            'transformer.enc_output_norm.bias',
            'pos_trans_fc.weight':
            'transformer.pos_trans.weight',
            'pos_trans_norm.weight':
            'transformer.pos_trans_norm.weight',
            'bbox_head.reg_branches.6.4.bias':
            'bbox_embed.6.layers.2.bias',
        })
    else:
        pairs.update({
            'query_embedding.weight':
            'query_embed.weight',
            'reference_points_fc.weight':
            'transformer.reference_points.weight',
        })
    for mmdet_key, official_key in pairs.items():
        assert torch.equal(loaded[mmdet_key],
                           official[official_key]), (mmdet_key, official_key)
    assert loaded['backbone.layer1.0.bn1.num_batches_tracked'] == 0
    assert not any('transformer.' in key for key in state_dict)


def test_classifier_keeps_the_80_coco_ids_in_mmdet_order(converted):
    variant, official, state_dict = converted
    classes = CocoDataset.METAINFO['classes']
    assert len(converter.COCO_CATEGORY_IDS) == len(classes) == 80
    # Category ids of a few classes, from the COCO annotation files.
    known_ids = {
        'person': 1,
        'stop sign': 13,
        'backpack': 27,
        'bottle': 44,
        'dining table': 67,
        'toilet': 70,
        'book': 84,
        'toothbrush': 90
    }
    num_decoder_branches = NUM_LAYERS
    for name, category_id in known_ids.items():
        row = classes.index(name)
        for index in range(num_decoder_branches):
            weight = state_dict[f'bbox_head.cls_branches.{index}.weight']
            bias = state_dict[f'bbox_head.cls_branches.{index}.bias']
            assert weight.shape == (80, EMBED_DIMS)
            assert torch.equal(
                weight[row],
                official[f'class_embed.{index}.weight'][category_id]), (name,
                                                                        index)
            assert bias[row] == official[f'class_embed.{index}.bias'][
                category_id]
    if variant == 'two-stage':
        # The encoder's proposal classifier is trained on output 0.
        encoder_weight = state_dict['bbox_head.cls_branches.6.weight']
        assert torch.equal(encoder_weight[0],
                           official['class_embed.6.weight'][0])
        assert torch.equal(encoder_weight[5],
                           official['class_embed.6.weight'][6])


def test_keep_classes_leaves_the_classifier_alone():
    official = fake_official_state_dict('refine')
    state_dict = converter.official_to_mmdet_state_dict(
        official, category_ids=None)
    assert torch.equal(state_dict['bbox_head.cls_branches.3.weight'],
                       official['class_embed.3.weight'])


def test_variant_is_detected_and_checked():
    for variant in CONFIG_NAMES:
        assert converter.detect_variant(
            fake_official_state_dict(variant)) == variant
    refine = fake_official_state_dict('refine')
    without_aliases = OrderedDict(
        (key, value) for key, value in refine.items()
        if not key.startswith('transformer.decoder.bbox_embed'))
    assert converter.detect_variant(without_aliases) == 'refine'
    with pytest.raises(
            converter.OfficialCheckpointError, match="is a 'refine'"):
        converter.check_variant(refine, 'plain')
    with pytest.raises(ValueError, match='variant must be one of'):
        converter.check_variant(refine, 'refined')


def test_variant_of_model_config():
    for variant, name in CONFIG_NAMES.items():
        config = Config.fromfile(osp.join(MMDET_CONFIG_DIR, name))
        assert converter.variant_of_model_config(config.model) == variant
    with pytest.raises(
            converter.OfficialCheckpointError, match='with_box_refine=True'):
        converter.variant_of_model_config(
            dict(with_box_refine=False, as_two_stage=True))


def test_foreign_state_dicts_are_refused():
    with pytest.raises(converter.OfficialCheckpointError, match='transformer'):
        converter.official_to_mmdet_state_dict({'conv.weight': torch.zeros(1)})
    state_dict = fake_official_state_dict('plain')
    state_dict['transformer.mystery.weight'] = torch.zeros(1)
    with pytest.raises(
            converter.OfficialCheckpointError,
            match='transformer.mystery.weight'):
        converter.official_to_mmdet_state_dict(state_dict)
    small = fake_official_state_dict('plain')
    small['class_embed.0.weight'] = torch.zeros(21, EMBED_DIMS)
    with pytest.raises(
            converter.OfficialCheckpointError, match='21 class outputs'):
        converter.official_to_mmdet_state_dict(small)


@pytest.mark.parametrize('zip_format', [True, False])
def test_checkpoint_files_load_without_unpickling_code(tmp_path, zip_format):
    path = str(tmp_path / 'official.pth')
    torch.save(
        fake_official_checkpoint('plain'),
        path,
        _use_new_zipfile_serialization=zip_format)
    checkpoint = converter.load_official_checkpoint(path)
    assert checkpoint['args'].backbone == 'resnet50'
    assert set(checkpoint['model']) == set(official_shapes('plain'))

    unsafe = str(tmp_path / 'unsafe.pth')
    torch.save(dict(model={}, made=datetime.datetime(2020, 10, 1)), unsafe)
    with pytest.raises(
            converter.OfficialCheckpointError, match='--trust-pickle'):
        converter.load_official_checkpoint(unsafe)
    assert converter.load_official_checkpoint(
        unsafe, trusted=True)['made'].year == 2020
    with pytest.raises(FileNotFoundError):
        converter.load_official_checkpoint(str(tmp_path / 'missing.pth'))


def build_plugin_model(variant: str):
    from ddetr_plugin.registry import MODELS
    config = Config.fromfile(
        osp.join(REPO, 'configs', 'deformable_detr', CONFIG_NAMES[variant]))
    config.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        return MODELS.build(config.model)


def test_converted_weights_load_strictly_into_the_plugin(converted):
    from ddetr_plugin.converters import load_converted
    variant, official, _ = converted
    state_dict = converter.convert_official_state_dict(
        official, variant=variant)
    model = build_plugin_model(variant)
    load_converted(model, state_dict)
    loaded = model.state_dict()
    classes = CocoDataset.METAINFO['classes']
    assert torch.equal(
        loaded['bbox_head.cls_branches.0.weight'][classes.index('stop sign')],
        official['class_embed.0.weight'][13])
    assert torch.equal(loaded['backbone.conv1.weight'],
                       official['backbone.0.body.conv1.weight'])


def test_command_line_tool(tmp_path):
    source = str(tmp_path / 'official.pth')
    output = str(tmp_path / 'plugin.pth')
    torch.save(fake_official_checkpoint('refine'), source)
    script = osp.join(REPO, 'tools', 'model_converters',
                      'official_to_plugin.py')
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run(
        [sys.executable, script, source, output, '--variant', 'refine'],
        env=env,
        capture_output=True,
        text=True)
    assert done.returncode == 0, done.stderr
    saved = torch.load(output, weights_only=True)
    expected = converter.convert_official_state_dict(
        fake_official_checkpoint('refine'))
    assert set(saved['state_dict']) == set(expected)
    assert saved['meta']['variant'] == 'refine'

    plain_config = osp.join(REPO, 'configs', 'deformable_detr',
                            CONFIG_NAMES['plain'])
    mismatch = subprocess.run(
        [sys.executable, script, source, output, '--config', plain_config],
        env=env,
        capture_output=True,
        text=True)
    assert mismatch.returncode != 0
    assert "builds a 'plain' Deformable DETR" in mismatch.stderr

    wrong = subprocess.run(
        [sys.executable, script, source, output, '--variant', 'two-stage'],
        env=env,
        capture_output=True,
        text=True)
    assert wrong.returncode != 0
    assert "is a 'refine'" in wrong.stderr
