"""Plot the loss and validation mAP of the newest training run in a folder.

    python tools/analysis_tools/plot_training.py WORK_DIR [--out FILE]

MMEngine writes one ``WORK_DIR/<timestamp>/vis_data/scalars.json`` per run,
a JSON object per line: training lines carry ``loss`` and ``step`` (the
iteration), validation lines carry ``coco/bbox_mAP`` and ``step`` (the
epoch). The newest run that trained (its file has a ``loss``) is plotted
into ``WORK_DIR/training_curves.png``: the losses over iterations on the
left, bbox mAP over epochs on the right.
"""
import argparse
import glob
import json
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use('Agg')  # headless: only files are written
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

LOSS_KEYS = ('loss', 'loss_cls', 'loss_bbox', 'loss_iou')
MAP_KEYS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75')


def read_scalars(path: str) -> List[Dict]:
    """The records of one ``scalars.json``; unreadable lines are named."""
    records = []
    with open(path) as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as error:
                raise ValueError(f'{path}, line {number}, is not JSON: '
                                 f'{error}') from error
    return records


def newest_training_run(work_dir: str) -> Optional[str]:
    """The newest ``scalars.json`` under ``work_dir`` that holds a loss."""
    pattern = osp.join(glob.escape(work_dir), '*', 'vis_data', 'scalars.json')
    # Run folders are named by their start time, so names sort by age.
    for path in sorted(glob.glob(pattern), reverse=True):
        if any('loss' in record for record in read_scalars(path)):
            return path
    return None


def plot(records: Sequence[Dict], out_file: str, title: str) -> None:
    """Draw losses over iterations and mAP over epochs into ``out_file``."""
    train = [record for record in records if 'loss' in record]
    val = [record for record in records if MAP_KEYS[0] in record]
    figure, (loss_axes, map_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for key in LOSS_KEYS:
        points = [(record['step'], record[key]) for record in train
                  if key in record]
        if points:
            steps, values = zip(*points)
            loss_axes.plot(steps, values, label=key)
    loss_axes.set_xlabel('iteration')
    loss_axes.set_ylabel('loss')
    loss_axes.set_yscale('log')
    loss_axes.set_title('training loss')
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    if val:
        for key in MAP_KEYS:
            points = [(record['step'], record[key]) for record in val
                      if key in record]
            steps, values = zip(*points)
            map_axes.plot(steps, values, marker='o', label=key)
        map_axes.legend()
    else:
        map_axes.text(0.5, 0.5, 'no validation yet', ha='center', va='center')
    map_axes.set_xlabel('epoch')
    map_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    map_axes.set_ylabel('COCO bbox mAP')
    map_axes.set_ylim(0, 1)
    map_axes.set_title('validation')
    map_axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out_file, dpi=100)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Plot the training curves of a work dir')
    parser.add_argument('work_dir', help='work dir of tools/train.py')
    parser.add_argument(
        '--out', help='image to write (default WORK_DIR/training_curves.png)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not osp.isdir(args.work_dir):
        raise FileNotFoundError(f'work dir {args.work_dir!r} does not exist')
    scalars = newest_training_run(args.work_dir)
    if scalars is None:
        raise FileNotFoundError(
            f'no <timestamp>/vis_data/scalars.json with a training loss '
            f'under {args.work_dir!r}; was it the work dir of a training run '
            'with LocalVisBackend?')
    out_file = args.out or osp.join(args.work_dir, 'training_curves.png')
    run = osp.basename(osp.dirname(osp.dirname(scalars)))
    plot(read_scalars(scalars), out_file, f'{args.work_dir} (run {run})')
    print(f'wrote {out_file} from {scalars}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
