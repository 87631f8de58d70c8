"""Input builders shared by the multi-scale deformable attention tests.

Tests get the builders as fixtures (pytest imports test files with
``--import-mode=importlib``, so they cannot import a sibling module), and
the CPU emulation of the CUDA kernels as the ``emulator`` fixture. Shapes are
kept tiny so the suite stays fast on two CPU cores.
"""
import os
import os.path as osp
from typing import List, Sequence, Tuple

import pytest
import torch
from filelock import FileLock
from torch import Tensor

from testkit import cuda_kernel_missing_reason, load_script


def level_tensors(level_shapes: Sequence[Tuple[int, int]]):
    """(spatial_shapes (nl, 2), level_start_index (nl,), num_keys)."""
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(sizes.sum())


def random_inputs(batch_size: int = 2,
                  level_shapes: Sequence[Tuple[int, int]] = ((3, 5), (1, 1),
                                                             (2, 2)),
                  num_queries: int = 3,
                  num_heads: int = 2,
                  head_dims: int = 4,
                  num_points: int = 2,
                  dtype: torch.dtype = torch.float64,
                  low: float = -0.1,
                  high: float = 1.1,
                  seed: int = 0) -> List[Tensor]:
    """Random inputs; locations uniform in [low, high), so some outside.

    Returns:
        list[Tensor]: value (bs, nk, nh, hd), spatial_shapes (nl, 2),
        level_start_index (nl,), sampling_locations (bs, nq, nh, nl, np, 2),
        attention_weights (bs, nq, nh, nl, np).
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, num_keys = level_tensors(level_shapes)
    num_levels = len(level_shapes)
    value = torch.randn(
        batch_size,
        num_keys,
        num_heads,
        head_dims,
        generator=generator,
        dtype=torch.float64)
    locations = torch.rand(
        batch_size,
        num_queries,
        num_heads,
        num_levels,
        num_points,
        2,
        generator=generator,
        dtype=torch.float64) * (high - low) + low
    weights = torch.rand(
        batch_size,
        num_queries,
        num_heads,
        num_levels,
        num_points,
        generator=generator,
        dtype=torch.float64)
    return [
        value.to(dtype), spatial_shapes, level_start_index,
        locations.to(dtype),
        weights.to(dtype)
    ]


def off_kink_locations(spatial_shapes: Tensor,
                       shape: Sequence[int],
                       seed: int = 0) -> Tensor:
    """Locations whose pixel coordinates stay away from integers.

    Bilinear sampling is not differentiable where a pixel coordinate is an
    integer (a corner changes), so finite differences are only valid away
    from those kinks. Pixel coordinates are ``k + f`` with ``k`` in
    [-1, size - 1] (so some samples straddle the border) and ``f`` in
    [0.25, 0.75].

    Args:
        spatial_shapes (Tensor): (nl, 2), (h, w) per level.
        shape (Sequence[int]): (bs, nq, nh, nl, np) of the locations.

    Returns:
        Tensor: (bs, nq, nh, nl, np, 2) float64 normalised (x, y).
    """
    generator = torch.Generator().manual_seed(seed)
    # (nl, 2) as (w, h), matching the (x, y) order of the locations.
    sizes = spatial_shapes.flip(-1).to(torch.float64)
    sizes = sizes.view(1, 1, 1, -1, 1, 2)
    unit = torch.rand(*shape, 2, generator=generator, dtype=torch.float64)
    whole = (unit * (sizes + 1)).floor() - 1
    fraction = 0.25 + 0.5 * torch.rand(
        *shape, 2, generator=generator, dtype=torch.float64)
    return (whole + fraction + 0.5) / sizes


def border_locations(level_shapes: Sequence[Tuple[int, int]], batch_size: int,
                     num_heads: int) -> Tensor:
    """Locations exactly on pixel centres, map borders and beyond.

    Query ``i`` and point ``j`` sample ``(x, y) = (special[i], special[j])``
    on every level, ``special`` being computed from that level's size.

    Returns:
        Tensor: (bs, nq, nh, nl, np, 2) float64 with nq = np = 10.
    """

    def specials(size: int) -> List[float]:
        # pixel coordinates: -0.5, size - 0.5 (the two map borders), -1 and
        # size (just outside), 0 and size - 1 (edge centres), 0.5, far out on
        # both sides and the centre.
        return [
            0.0, 1.0, -0.5 / size, (size + 0.5) / size, 0.5 / size,
            (size - 0.5) / size, 1.0 / size, -1.0, 2.0, 0.5
        ]

    per_level = []
    for height, width in level_shapes:
        xs = torch.tensor(specials(width), dtype=torch.float64)
        ys = torch.tensor(specials(height), dtype=torch.float64)
        # (nq, np, 2): query picks x, point picks y.
        grid = torch.stack(
            torch.broadcast_tensors(xs[:, None], ys[None, :]), dim=-1)
        per_level.append(grid)
    # (nq, nl, np, 2) -> (bs, nq, nh, nl, np, 2)
    locations = torch.stack(per_level, dim=1)
    return locations[None, :, None].expand(batch_size, -1, num_heads, -1, -1,
                                           -1).contiguous()


@pytest.fixture(name='random_inputs')
def random_inputs_fixture():
    return random_inputs


@pytest.fixture(name='off_kink_locations')
def off_kink_locations_fixture():
    return off_kink_locations


@pytest.fixture(name='border_locations')
def border_locations_fixture():
    return border_locations


@pytest.fixture(name='level_tensors')
def level_tensors_fixture():
    return level_tensors


EMULATION_DIR = osp.join(osp.dirname(osp.abspath(__file__)), 'cuda_emulation')


def load_emulator_module():
    """``cuda_emulation/emulator.py``, imported by path."""
    return load_script(
        osp.join(EMULATION_DIR, 'emulator.py'), 'cuda_emulation')


def build_once_per_run(module, tmp_path_factory) -> str:
    """Build the emulation once per test run; return the library path.

    Under pytest-xdist every worker is its own session, but the workers of
    one run share the parent of their temporary folders: the first worker
    to take the lock builds there (8 s on a busy core), the others wait and
    load the same file. The folder is new for every run, so a changed
    kernel is always rebuilt.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        root = root.parent
    folder = root / 'cuda_emulation'
    with FileLock(str(root / 'cuda_emulation.lock')):
        library = folder / 'emulated_kernels.so'
        if not library.is_file():
            folder.mkdir(exist_ok=True)
            library = module.build(str(folder))
    return str(library)


@pytest.fixture(scope='session', name='emulator')
def emulator_fixture(tmp_path_factory):
    """The CUDA kernels compiled for the CPU (``EmulatedKernels``)."""
    module = load_emulator_module()
    try:
        library = build_once_per_run(module, tmp_path_factory)
    except module.CompilerMissing as error:
        # CI has the compiler the extension build needs: never skip there.
        if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
            raise
        pytest.skip(str(error))
    return module.EmulatedKernels(library)


class CudaKernels:
    """The compiled op's CUDA kernels, called through the dispatcher."""
    device = 'cuda'

    def run(self, inputs, grad_output):
        """Output and the three gradients straight from the kernels."""
        output = torch.ops.ddetr_plugin.ms_deform_attn_forward(*inputs)
        gradients = torch.ops.ddetr_plugin.ms_deform_attn_backward(
            grad_output, *inputs)
        torch.cuda.synchronize()
        return (output, *gradients)


@pytest.fixture(name='cuda_kernel')
def cuda_kernel_fixture():
    """Skips the test, with the reason, unless the CUDA kernels can run."""
    reason = cuda_kernel_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    return CudaKernels()
