"""Plot the loss and validation mAP of training runs.

    python tools/analysis_tools/plot_training.py WORK_DIR [--out FILE]
    python tools/analysis_tools/plot_training.py WORK_DIR WORK_DIR ... \
        [--labels NAME ...] [--out FILE] [--table FILE]

MMEngine writes one ``WORK_DIR/<timestamp>/vis_data/scalars.json`` per run,
a JSON object per line: training lines carry ``loss`` and ``step`` (the
iteration), validation lines carry ``coco/bbox_mAP`` and ``step`` (the
epoch). The newest run that trained (its file has a ``loss``) is plotted
into ``WORK_DIR/training_curves.png``: the losses over iterations on the
left, bbox mAP over epochs on the right.

Several work dirs are compared (a convergence study): their newest
training runs are overlaid in one picture, bbox mAP and small-object mAP
against epoch, and ``--table`` writes a Markdown table with each run's best
mAP and AP small and the first epoch at which it reaches the final mAP of
the first run (the baseline).
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
# What a comparison of runs plots, one panel each.
COMPARED_KEYS = (('coco/bbox_mAP', 'bbox mAP'), ('coco/bbox_mAP_s',
                                                 'bbox mAP, small objects'))


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


def training_runs(work_dir: str) -> List[str]:
    """Every ``scalars.json`` under ``work_dir`` that holds a loss, oldest
    first (a resumed run writes a new one that continues the old)."""
    pattern = osp.join(glob.escape(work_dir), '*', 'vis_data', 'scalars.json')
    return [
        path for path in sorted(glob.glob(pattern))
        if any('loss' in record for record in read_scalars(path))
    ]


def validation_by_epoch(work_dir: str) -> Dict[int, Dict]:
    """The validation records of the training in ``work_dir``, by epoch.

    Records of all its training runs are joined, so that a run interrupted
    and resumed counts as one; where two runs validated the same epoch, the
    later one wins.
    """
    epochs = {}
    for path in training_runs(work_dir):
        for record in read_scalars(path):
            if MAP_KEYS[0] in record and 'loss' not in record:
                epochs[int(record['step'])] = record
    if not epochs:
        raise FileNotFoundError(
            f'no validation results ({MAP_KEYS[0]}) in the training runs '
            f'under {work_dir!r}; train with val_interval=1 to compare runs')
    return dict(sorted(epochs.items()))


def first_epoch_reaching(epochs: Dict[int, Dict], bar: float) -> Optional[int]:
    """The first epoch whose mAP is at least ``bar``, or None."""
    for epoch, record in epochs.items():
        if record[MAP_KEYS[0]] >= bar:
            return epoch
    return None


def summary_table(runs: Dict[str, Dict[int, Dict]]) -> str:
    """A Markdown table of the compared runs; the first is the baseline.

    Args:
        runs (dict): label -> :func:`validation_by_epoch` of its work dir.

    Returns:
        str: One row per run: best mAP (and its epoch), best AP small,
        final mAP, and the first epoch reaching the baseline's final mAP.
    """
    baseline_label, baseline = next(iter(runs.items()))
    bar = baseline[max(baseline)][MAP_KEYS[0]]
    lines = [
        '| model | epochs | best mAP (epoch) | best AP small | final mAP '
        f'| first epoch with mAP >= {bar:.3f} ({baseline_label} final) |',
        '| --- | ---: | ---: | ---: | ---: | ---: |'
    ]
    for label, epochs in runs.items():
        best_epoch = max(epochs, key=lambda e: epochs[e][MAP_KEYS[0]])
        small = [
            record['coco/bbox_mAP_s'] for record in epochs.values()
            if 'coco/bbox_mAP_s' in record
        ]
        reached = first_epoch_reaching(epochs, bar)
        lines.append(
            f'| {label} | {max(epochs)} '
            f'| {epochs[best_epoch][MAP_KEYS[0]]:.3f} ({best_epoch}) '
            f'| {max(small):.3f} | {epochs[max(epochs)][MAP_KEYS[0]]:.3f} '
            f'| {reached if reached is not None else "not reached"} |')
    return '\n'.join(lines) + '\n'


def plot_comparison(runs: Dict[str, Dict[int, Dict]], out_file: str) -> None:
    """Overlay the runs' mAP and small-object mAP against epoch."""
    figure, panels = plt.subplots(1, len(COMPARED_KEYS), figsize=(12, 4.5))
    for axes, (key, title) in zip(panels, COMPARED_KEYS):
        for label, epochs in runs.items():
            points = [(epoch, record[key]) for epoch, record in epochs.items()
                      if key in record]
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, marker='o', markersize=3, label=label)
        axes.set_xlabel('epoch')
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(title)
        axes.set_ylim(bottom=0)
        axes.set_title(title)
        axes.grid(alpha=0.3)
    # One legend for both panels, below them, so that no curve is covered.
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        loc='lower center',
        ncol=min(len(labels), 4),
        frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(out_file, dpi=100)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Plot the training curves of a work dir, or compare '
        'the validation curves of several')
    parser.add_argument(
        'work_dirs',
        nargs='+',
        metavar='WORK_DIR',
        help='work dir of tools/train.py; with several, the first is the '
        'baseline of the comparison')
    parser.add_argument(
        '--labels',
        nargs='+',
        help='names of the compared runs (default: the work dirs)')
    parser.add_argument(
        '--out',
        help='image to write (default WORK_DIR/training_curves.png; '
        'required to compare)')
    parser.add_argument(
        '--table', help='Markdown file for the comparison table')
    args = parser.parse_args(argv)
    if len(args.work_dirs) == 1 and (args.labels or args.table):
        parser.error('--labels and --table compare several work dirs; '
                     'one was given')
    if len(args.work_dirs) > 1 and not args.out:
        parser.error('comparing work dirs needs --out FILE')
    if args.labels and len(args.labels) != len(args.work_dirs):
        parser.error(f'{len(args.labels)} --labels for '
                     f'{len(args.work_dirs)} work dirs; give one each')
    names = args.labels or args.work_dirs
    if len(set(names)) != len(names):
        parser.error(f'the compared runs need distinct names, got {names}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for work_dir in args.work_dirs:
        if not osp.isdir(work_dir):
            raise FileNotFoundError(f'work dir {work_dir!r} does not exist')
    if len(args.work_dirs) > 1:
        return compare(args)
    work_dir = args.work_dirs[0]
    scalars = newest_training_run(work_dir)
    if scalars is None:
        raise FileNotFoundError(
            f'no <timestamp>/vis_data/scalars.json with a training loss '
            f'under {work_dir!r}; was it the work dir of a training run '
            'with LocalVisBackend?')
    out_file = args.out or osp.join(work_dir, 'training_curves.png')
    run = osp.basename(osp.dirname(osp.dirname(scalars)))
    plot(read_scalars(scalars), out_file, f'{work_dir} (run {run})')
    print(f'wrote {out_file} from {scalars}')
    return 0


def compare(args) -> int:
    """Overlay several work dirs' validation curves; print the table."""
    labels = args.labels or args.work_dirs
    runs = {
        label: validation_by_epoch(work_dir)
        for label, work_dir in zip(labels, args.work_dirs)
    }
    plot_comparison(runs, args.out)
    table = summary_table(runs)
    print(table, end='')
    if args.table:
        with open(args.table, 'w') as file:
            file.write(table)
        print(f'wrote {args.table}')
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
