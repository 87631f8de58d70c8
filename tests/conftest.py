"""Run order of the test files: the longest first.

``make test`` runs the files on two workers, one file per worker at a time
(``--dist loadfile --no-loadscope-reorder``, so the files are handed out
in the order collected here). Whatever order they come in, each file takes
as long; but a long file handed out last keeps one worker busy while the
other has nothing left to do. Longest first, the run ends with short files
and both workers finish at about the same time. The order changes no
test: every file still runs whole, in its own order.
"""
from typing import List

import pytest

# The files that took longest on two busy cores (seconds per file, from
# ``pytest --durations``, 2026-12-02), longest first. A file not listed
# runs after these, in collection order; a renamed file just loses its
# place, so the list only ever costs wall time, never a test.
LONGEST_FILES = (
    'tests/ops/test_cuda_value_gradient_precision.py',  # 96 s
    'tests/tools/test_train_test_tools.py',  # 80 s
    'tests/tools/test_mmdet_checkpoints.py',  # 78 s
    'tests/tools/test_dist_train.py',  # 71 s
    'tests/tools/test_resume.py',  # 62 s
    'tests/models/test_converter_official.py',  # 54 s
    'tests/tools/test_entry_points.py',  # 45 s
    'tests/ops/test_gpu_check.py',  # 40 s
    'tests/tools/test_dataset_check_tools.py',  # 36 s
    'tests/ops/test_ms_deform_attn.py',  # 25 s
    'tests/tools/test_vis_sampling_points.py',  # 15 s
    'tests/models/test_converter_mmdet.py',  # 15 s
    'tests/ops/test_check.py',  # 12 s
)


def _file_of(item: pytest.Item) -> str:
    """``tests/...py`` of a collected test, as in LONGEST_FILES."""
    return item.nodeid.split('::', 1)[0]


def pytest_collection_modifyitems(config: pytest.Config,
                                  items: List[pytest.Item]) -> None:
    """Put the files of LONGEST_FILES first, in that order (a stable sort:
    the tests of a file, and the other files, keep their order)."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(_file_of(item), len(rank)))
