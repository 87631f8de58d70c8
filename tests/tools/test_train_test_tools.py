"""tools/train.py, tools/test.py, the plot and the demo, end to end.

One tiny model is trained for two epochs on eight toy images; the other
tests evaluate, plot and draw with its checkpoint.
"""
import json
import os
import os.path as osp
import pickle

import pytest
import torch
from PIL import Image

from ddetr_plugin.engine.visualization_hook import DEFAULT_MIN_SIZE

pytestmark = pytest.mark.slow

TABLE_FIRST_LINE = (' Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all'
                    ' | maxDets=100 ]')


@pytest.fixture(scope='module')
def trained(helpers, toy_data, tmp_path_factory):
    """(config, work dir) of a finished two-epoch training run."""
    folder = str(tmp_path_factory.mktemp('trained'))
    config = helpers.write_tiny_config(folder, toy_data, max_epochs=2)
    work_dir = osp.join(folder, 'work')
    helpers.run_tool(['tools/train.py', config, '--work-dir', work_dir])
    return config, work_dir


def test_training_leaves_checkpoints_logs_and_scalars(trained):
    _, work_dir = trained
    with open(osp.join(work_dir, 'last_checkpoint')) as file:
        assert file.read().strip() == osp.join(work_dir, 'epoch_2.pth')
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    runs = [
        name for name in os.listdir(work_dir)
        if osp.isfile(osp.join(work_dir, name, 'vis_data', 'scalars.json'))
    ]
    assert len(runs) == 1
    with open(osp.join(work_dir, runs[0], 'vis_data', 'scalars.json')) as file:
        records = [json.loads(line) for line in file]
    losses = [record['loss'] for record in records if 'loss' in record]
    assert len(losses) == 8 and all(loss > 0 for loss in losses)
    maps = [
        record['coco/bbox_mAP'] for record in records
        if 'coco/bbox_mAP' in record
    ]
    assert len(maps) == 2 and all(0 <= value <= 1 for value in maps)


def test_test_tool_writes_table_results_json_pickle_and_drawings(
        helpers, trained, toy_data, tmp_path):
    from pycocotools.coco import COCO
    config, work_dir = trained
    out_dir = str(tmp_path)
    prefix = osp.join(out_dir, 'results')
    result = helpers.run_tool([
        'tools/test.py', config,
        osp.join(work_dir, 'epoch_2.pth'), '--work-dir', out_dir, '--out',
        osp.join(out_dir, 'predictions.pkl'), '--show-dir', 'drawn',
        '--cfg-options', f'test_evaluator.outfile_prefix={prefix}'
    ])
    # The standard 12-line COCO table is printed and saved.
    assert TABLE_FIRST_LINE in result.stdout
    with open(osp.join(out_dir, 'coco_bbox_table.txt')) as file:
        table = file.read().splitlines()
    assert table[0].startswith(TABLE_FIRST_LINE) and len(table) == 12
    with open(osp.join(out_dir, 'test_metrics.json')) as file:
        metrics = json.load(file)
    assert 0 <= metrics['coco/bbox_mAP'] <= 1
    # The COCO result file loads in pycocotools against the ground truth.
    ground_truth = COCO(
        osp.join(toy_data, 'annotations', 'instances_val.json'))
    detections = ground_truth.loadRes(prefix + '.bbox.json')
    assert set(detections.getImgIds()) <= set(ground_truth.getImgIds())
    assert len(detections.anns) > 0
    with open(osp.join(out_dir, 'predictions.pkl'), 'rb') as file:
        predictions = pickle.load(file)
    assert len(predictions) == 4
    assert predictions[0]['pred_instances']['bboxes'].shape[-1] == 4
    drawn = [
        name for root, _, names in os.walk(out_dir) for name in names
        if root.endswith('drawn') and name.endswith('.png')
    ]
    assert len(drawn) == 4


def test_test_tool_refuses_a_checkpoint_of_another_model(
        helpers, trained, tmp_path):
    config, work_dir = trained
    checkpoint = torch.load(
        osp.join(work_dir, 'epoch_2.pth'), weights_only=False)
    state = checkpoint['state_dict']
    # Another model: one layer less, one unknown layer, one other width.
    dropped = sorted(key for key in state if key.startswith('neck.'))[0]
    del state[dropped]
    state['mask_head.conv.weight'] = torch.zeros(3)
    reshaped = next(key for key in state if key.endswith('.weight'))
    state[reshaped] = torch.zeros(2, 2)
    other = str(tmp_path / 'other_model.pth')
    torch.save(dict(state_dict=state), other)

    result = helpers.run_tool(
        ['tools/test.py', config, other, '--work-dir',
         str(tmp_path)],
        check=False)
    assert result.returncode != 0
    assert 'CheckpointMismatchError' in result.stdout
    assert 'other_model.pth' in result.stdout
    assert dropped in result.stdout
    assert 'mask_head.conv.weight' in result.stdout
    assert f'{reshaped}: (2, 2) in the checkpoint' in result.stdout
    assert not osp.exists(str(tmp_path / 'test_metrics.json'))


def test_resume_with_another_models_checkpoint_stops_before_training(
        helpers, trained, tmp_path):
    # MMEngine would load it non-strictly and crash in the first optimizer
    # step; the tool checks it as tools/test.py does, before training.
    config, work_dir = trained
    train_dir = tmp_path / 'train'
    result = helpers.run_tool([
        'tools/train.py', config, '--work-dir',
        str(train_dir), '--resume',
        osp.join(work_dir, 'epoch_2.pth'), '--cfg-options',
        'model.transformer.encoder.layer_cfg.ffn_cfg.feedforward_channels=16'
    ],
                              check=False)
    assert result.returncode != 0
    assert 'epoch_2.pth' in result.stdout and 'does not fit' in result.stdout
    assert 'transformer.encoder.layers.0.ffn.linear1.weight' in result.stdout
    assert not list(train_dir.glob('*.pth'))


def test_train_tool_names_a_missing_data_root(helpers, trained, tmp_path):
    config, _ = trained
    missing = str(tmp_path / 'no_such_data')
    result = helpers.run_tool([
        'tools/train.py', config, '--work-dir',
        str(tmp_path / 'work'), '--cfg-options',
        f'train_dataloader.dataset.data_root={missing}'
    ],
                              check=False)
    assert result.returncode != 0
    assert 'FileNotFoundError' in result.stdout
    assert f"data_root '{missing}'" in result.stdout


def test_plot_training_draws_the_curves(helpers, trained):
    _, work_dir = trained
    helpers.run_tool(['tools/analysis_tools/plot_training.py', work_dir])
    with open(osp.join(work_dir, 'training_curves.png'), 'rb') as file:
        assert file.read(8) == b'\x89PNG\r\n\x1a\n'


def test_image_demo_draws_detections(helpers, trained, toy_data, tmp_path):
    config, work_dir = trained
    image = osp.join(toy_data, 'val', '000000.png')
    result = helpers.run_tool([
        'demo/image_demo.py', image, config, '--weights',
        osp.join(work_dir, 'epoch_2.pth'), '--out-dir',
        str(tmp_path), '--score-thr', '0.0'
    ])
    assert '000000.png' in result.stdout
    with open(tmp_path / '000000.png', 'rb') as file:
        assert file.read(8) == b'\x89PNG\r\n\x1a\n'
    # Drawn scaled up, as tools/test.py --show-dir draws, in proportion.
    with Image.open(image) as original, \
            Image.open(tmp_path / '000000.png') as drawn:
        assert max(drawn.size) == DEFAULT_MIN_SIZE > max(original.size)
        assert drawn.size[0] * original.size[1] == \
            drawn.size[1] * original.size[0]
