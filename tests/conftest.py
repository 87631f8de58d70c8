"""How the suite shares two cores: idle threads sleep; longest files first.

``make test`` runs the files on two workers, one file per worker at a time
(``--dist loadfile --no-loadscope-reorder``).

Threads: each worker's torch runs its operators on as many OpenMP threads
as there are cores, so two workers ask for twice the cores there are. GNU
OpenMP's threads spin while they wait for work; with the cores
oversubscribed the spinning threads take the time of the ones with work,
and tests/models/test_parity_mmdet.py took 138 s instead of 50 s beside
one busy core. ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep.
The thread count stays, so every result keeps its bits (one thread would
sum in another order: a parity test's gradient then misses its 1e-4).
It must be set before torch is imported, as here: this file is loaded
before every test module and conftest below it.

Order: the files are handed out in the order collected here. Whatever
order they come in, each file takes as long; but a long file handed out
last keeps one worker busy while the other has nothing left to do.
Longest first, the run ends with short files and both workers finish at
about the same time. The order changes no test: every file still runs
whole, in its own order.
"""
import os
from typing import List

# Before torch is imported anywhere (see above); a value set by the user
# wins. Subprocesses of the tests inherit it.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import pytest  # noqa: E402

# The files that took longest, longest first. Seconds per file: the sum of
# its tests among the slowest 60 of ``pytest --durations`` of the whole
# suite on two workers (2026-12-07, a loaded machine); the Conditional DETR
# export file from a run of its own. A file not listed runs after these, in
# collection order; a renamed file just loses its place, so the list only
# ever costs wall time, never a test.
LONGEST_FILES = (
    'tests/deployment/test_export_parity_plain_refine.py',  # 179 s
    'tests/deployment/test_export_parity.py',  # 169 s
    'tests/ops/test_cuda_value_gradient_precision.py',  # 123 s
    'tests/deployment/test_export_tool_and_demo.py',  # 122 s
    'tests/tools/test_train_test_tools.py',  # 120 s
    'tests/tools/test_mmdet_checkpoints.py',  # 114 s
    'tests/tools/test_resume.py',  # 73 s
    'tests/tools/test_dist_train.py',  # 63 s
    'tests/tools/test_conditional_detr_tools.py',  # 53 s
    'tests/tools/test_entry_points.py',  # 48 s
    'tests/ops/test_ms_deform_attn.py',  # 43 s
    'tests/tools/test_vis_sampling_points.py',  # 40 s
    'tests/tools/test_dataset_check_tools.py',  # 39 s
    'tests/deployment/test_export_conditional_detr.py',  # 36 s (alone)
    'tests/ops/test_gpu_check.py',  # 35 s
    'tests/models/test_converter_official.py',  # 24 s
    'tests/models/test_parity_mmdet.py',  # 18 s
    'tests/ops/test_check.py',  # 16 s
    'tests/tools/test_mmdet_route_training.py',  # 9 s
)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Restore torch's thread count after every test.

    A tool run in-process (a benchmark's ``main`` with ``--threads 1``)
    sets it for the whole worker; the tests that run after it in that
    worker would then sum in another order, and a parity test's gradient
    misses its 1e-4 (seen: test_parity_mmdet.py after test_gpu_check.py).
    """
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _file_of(item: pytest.Item) -> str:
    """``tests/...py`` of a collected test, as in LONGEST_FILES."""
    return item.nodeid.split('::', 1)[0]


def pytest_collection_modifyitems(config: pytest.Config,
                                  items: List[pytest.Item]) -> None:
    """Put the files of LONGEST_FILES first, in that order (a stable sort:
    the tests of a file, and the other files, keep their order)."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(_file_of(item), len(rank)))
