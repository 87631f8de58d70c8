"""Self-check of the compiled op: ``python -m ddetr_plugin.ops.check``.

Prints how ``ddetr_plugin._C`` was built (kernels per device, CUDA version
and architectures, torch versions), then runs a matrix of the compiled
kernels, through the op's front and autograd, against the float64
plain-PyTorch reference on the same (rounded) inputs: fp32, fp16 and bf16;
output and the gradients of value, locations and weights; the R50 encoder
and decoder shapes and small odd ones, with points on borders, outside the
maps and non-finite. ``--benchmark`` also times each case against the
reference. Exit status: 0 when every comparison is within its tolerance,
1 on any mismatch (or when the device has no compiled kernel: the check
never lets the reference stand in), 2 when the device is absent.

Examples:
    python -m ddetr_plugin.ops.check
    python -m ddetr_plugin.ops.check --device cuda --benchmark
"""
import argparse
import importlib
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .extension import extension_error, extension_loaded, kernel_device_types
from .ms_deform_attn import ms_deform_attn
from .reference import ms_deform_attn_reference

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
HALF_TYPES = (torch.float16, torch.bfloat16)

# Largest error allowed, relative to max(1, largest reference magnitude),
# per dtype, of the output, grad_value and the location and weight
# gradients. Half types: one rounding of the output and of grad_value
# (summed in float32), 2^-11 for fp16 and 2^-8 for bf16 of an element; the
# location and weight gradients are float32 sums.
TOLERANCES = {
    torch.float32: dict(output=1e-4, value=1e-4, sampling=1e-4),
    torch.float16: dict(output=2e-3, value=2e-3, sampling=2e-3),
    torch.bfloat16: dict(output=8e-3, value=8e-3, sampling=2e-3),
}

R50_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))


class Case(NamedTuple):
    """One shape of the matrix.

    ``num_queries`` None means one query per key (an encoder);
    ``locations``: 'uniform' in [0, 1], 'outside' in [-0.15, 1.15], or
    'borders' (pixel centres, map borders, just outside, NaN and inf).
    """
    batch_size: int
    level_shapes: tuple
    num_queries: Optional[int]
    num_heads: int
    head_dims: int
    num_points: int
    locations: str


CASES = {
    'r50-encoder': Case(1, R50_LEVELS, None, 8, 32, 4, 'uniform'),
    'r50-decoder': Case(2, R50_LEVELS, 300, 8, 32, 4, 'uniform'),
    'small': Case(2, ((4, 4), (2, 3)), 7, 3, 6, 2, 'outside'),
    'odd': Case(3, ((5, 7), (3, 2), (1, 1)), 9, 3, 71, 3, 'outside'),
    'borders': Case(2, ((4, 8), (2, 2), (1, 4)), 12, 2, 5, 12, 'borders'),
}
# The R50 encoder in float64 on a CPU takes a minute: opt in with --cases.
DEFAULT_CASES = {
    'cpu': ['small', 'odd', 'borders', 'r50-decoder'],
    'cuda': list(CASES),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m ddetr_plugin.ops.check',
        description='Check the compiled multi-scale deformable attention '
        'kernels against the float64 reference.')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument(
        '--cases',
        nargs='+',
        choices=list(CASES),
        help='shapes to check (default: all on cuda, all but r50-encoder '
        'on cpu)')
    parser.add_argument(
        '--dtypes', nargs='+', choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument(
        '--benchmark',
        action='store_true',
        help='also time each case against the reference')
    parser.add_argument(
        '--repeat',
        type=int,
        default=10,
        help='timed repetitions per benchmark (median)')
    return parser.parse_args(argv)


def make_inputs(case: Case,
                dtype: torch.dtype,
                device: str,
                seed: int = 0) -> List[Tensor]:
    """The op's five inputs for ``case``, as the front takes them.

    Returns:
        list[Tensor]: value (bs, nk, nh, hd) in ``dtype``, spatial_shapes
        (nl, 2), level_start_index (nl,), sampling_locations (bs, nq, nh,
        nl, np, 2) and attention_weights (bs, nq, nh, nl, np) in float32
        for half types (the kernels' coordinate dtype), else ``dtype``.
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(case.level_shapes, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = sizes.cumsum(0) - sizes
    num_keys = int(sizes.sum())
    num_queries = case.num_queries or num_keys
    num_levels = len(case.level_shapes)
    sample_shape = (case.batch_size, num_queries, case.num_heads, num_levels,
                    case.num_points)
    value = torch.randn(
        case.batch_size,
        num_keys,
        case.num_heads,
        case.head_dims,
        generator=generator)
    locations = torch.rand(*sample_shape, 2, generator=generator)
    if case.locations == 'outside':
        locations = locations * 1.3 - 0.15
    elif case.locations == 'borders':
        locations = _border_locations(case.level_shapes, sample_shape)
    weights = torch.rand(*sample_shape, generator=generator)
    coordinate_dtype = torch.float32 if dtype in HALF_TYPES else dtype
    return [
        value.to(device, dtype),
        spatial_shapes.to(device),
        level_start_index.to(device),
        locations.to(device, coordinate_dtype),
        weights.to(device, coordinate_dtype),
    ]


def _border_locations(level_shapes: tuple, sample_shape: tuple) -> Tensor:
    """Point ``j`` of every query at a special x, query ``i`` at a special
    y, of each level: pixel centres, the borders (pixel -0.5 and size -
    0.5), just outside (pixel -1 and size), far outside, NaN and inf."""
    batch_size, num_queries, num_heads, _, num_points = sample_shape

    def specials(size: int, count: int) -> Tensor:
        values = [
            0.0, 1.0, -0.5 / size, (size + 0.5) / size, 0.5 / size,
            (size - 0.5) / size, 1.0 / size, -1.0, 2.0, 0.5,
            float('nan'),
            float('inf')
        ]
        return torch.tensor((values * count)[:count])

    levels = []
    for height, width in level_shapes:
        xs = specials(width, num_points)
        ys = specials(height, num_queries)
        # (nq, np, 2): the point picks x, the query picks y.
        levels.append(
            torch.stack(torch.broadcast_tensors(xs[None], ys[:, None]), -1))
    locations = torch.stack(levels, dim=1)  # (nq, nl, np, 2)
    return locations[None, :, None].expand(batch_size, -1, num_heads, -1, -1,
                                           -1).contiguous()


def run_op(function: Callable, inputs: List[Tensor],
           grad_output: Tensor) -> List[Tensor]:
    """Output and the gradients of value, locations and weights."""
    leaves = [
        tensor.detach().clone().requires_grad_(tensor.is_floating_point())
        for tensor in inputs
    ]
    output = function(*leaves)
    output.backward(grad_output.to(output.dtype))
    return [output.detach(), leaves[0].grad, leaves[3].grad, leaves[4].grad]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|), NaN-aware."""
    if expected.numel() == 0:
        return 0.0
    actual = actual.double()
    if not torch.equal(actual.isnan(), expected.isnan()):
        return float('inf')
    difference = (actual - expected).nan_to_num(nan=0.0).abs().max()
    scale = max(1.0, expected.nan_to_num(nan=0.0).abs().max().item())
    return difference.item() / scale


def check_case(name: str, case: Case, dtype: torch.dtype, device: str,
               report: Callable[[str], None]) -> bool:
    """Compare one case in one dtype; report a line per quantity."""
    inputs = make_inputs(case, dtype, device)
    generator = torch.Generator().manual_seed(1)
    grad_output = torch.randn(
        inputs[0].shape[0],
        inputs[3].shape[1],
        case.num_heads * case.head_dims,
        generator=generator).to(device, dtype)
    actual = run_op(ms_deform_attn, inputs, grad_output)
    # The reference in float64 on the very inputs the kernels saw.
    reference_inputs = [
        tensor.double() if tensor.is_floating_point() else tensor
        for tensor in inputs
    ]
    expected = run_op(ms_deform_attn_reference, reference_inputs,
                      grad_output.double())
    near_edges = near_pixel_edges(inputs[3], inputs[1])
    if near_edges.any():
        # The slope jumps there; compare the other samples' gradients.
        for gradients in (actual, expected):
            gradients[2] = gradients[2].masked_fill(near_edges[..., None], 0)
    limits = TOLERANCES[dtype]
    quantities = [('output', limits['output']),
                  ('grad value', limits['value']),
                  ('grad locations', limits['sampling']),
                  ('grad weights', limits['sampling'])]
    passed = True
    dtype_name = _dtype_name(dtype)
    for (quantity, limit), have, want in zip(quantities, actual, expected):
        error = relative_error(have, want)
        ok = error <= limit
        passed &= ok
        note = ''
        if quantity == 'grad locations' and near_edges.any():
            note = (f' ({int(near_edges.sum())} of {near_edges.numel()} '
                    'samples within 1e-4 pixel of an edge left out)')
        report(f'{name:<12} {dtype_name:<5} {quantity:<15} {error:>9.2e} '
               f'{limit:>8.0e}  {"ok" if ok else "MISMATCH"}{note}')
    return passed


def near_pixel_edges(sampling_locations: Tensor,
                     spatial_shapes: Tensor) -> Tensor:
    """Samples whose pixel coordinate is within 1e-4 of an integer, but not
    on it.

    Bilinear sampling has no slope where a pixel coordinate is an integer
    (the corners change). The kernels compute coordinates in float32, the
    reference in float64; within float32 rounding of an integer (about
    1e-5 pixel on a 167-wide map) they may floor to different pixels and
    both be right, with different location gradients. There are about a
    thousand such samples among the R50 encoder's 2.8 million. Exact
    integers (the border cases) floor alike and stay compared.

    Args:
        sampling_locations (Tensor): (bs, nq, nh, nl, np, 2), (x, y).
        spatial_shapes (Tensor): (nl, 2), (h, w) per level.

    Returns:
        Tensor: (bs, nq, nh, nl, np) bool.
    """
    # (nl, 2) as (w, h), the (x, y) order of the locations.
    sizes = spatial_shapes.flip(-1).to(torch.float64).view(-1, 1, 2)
    pixels = sampling_locations.double() * sizes - 0.5
    distance = (pixels - pixels.round()).abs()
    near = (distance > 0) & (distance < 1e-4)
    return near.any(-1)


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def median_ms(run: Callable[[], None], device: str, repeat: int) -> float:
    """Median wall time of ``run`` in milliseconds, after one warm-up."""
    run()
    times = []
    for _ in range(repeat):
        if device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def benchmark_case(name: str, case: Case, dtype: torch.dtype, device: str,
                   repeat: int, report: Callable[[str], None]) -> None:
    """Time the compiled op and the reference (float32 for half types,
    grid_sample's dtype), forward and forward+backward."""
    inputs = make_inputs(case, dtype, device)
    reference_dtype = torch.float32 if dtype in HALF_TYPES else dtype
    reference_inputs = [
        tensor.to(reference_dtype) if tensor.is_floating_point() else tensor
        for tensor in inputs
    ]
    grad_output = torch.ones(
        inputs[0].shape[0],
        inputs[3].shape[1],
        case.num_heads * case.head_dims,
        device=device)
    for label, function, args in (('plugin', ms_deform_attn, inputs),
                                  ('reference', ms_deform_attn_reference,
                                   reference_inputs)):

        def forward():
            with torch.no_grad():
                function(*args)

        def both():
            run_op(function, args, grad_output)

        times = (median_ms(forward, device,
                           repeat), median_ms(both, device, repeat))
        if label == 'plugin':
            plugin_times = times
            continue
        speed_ups = [
            mine and theirs / mine
            for mine, theirs in zip(plugin_times, times)
        ]
        report(f'{name:<12} {_dtype_name(dtype):<5} forward '
               f'{plugin_times[0]:>9.3f} ms vs {times[0]:>9.3f} ms '
               f'({speed_ups[0]:.1f}x); forward+backward '
               f'{plugin_times[1]:>9.3f} ms vs {times[1]:>9.3f} ms '
               f'({speed_ups[1]:.1f}x)')


def describe_build(device: str, report: Callable[[str], None]) -> None:
    """How the extension was built and what this machine has."""
    cuda = torch.version.cuda or 'none (CPU build)'
    report(f'torch {torch.__version__} (CUDA {cuda}), Python '
           f'{sys.version.split()[0]}')
    if not extension_loaded():
        report(f'ddetr_plugin._C: NOT LOADED ({extension_error()})')
        return
    module = importlib.import_module('ddetr_plugin._C')
    info: Dict[str, Optional[str]] = {}
    if hasattr(module, 'build_info'):
        info = module.build_info()
    report(f'ddetr_plugin._C: {module.__file__}')
    report(f'  built against torch {info.get("torch", "unknown")}; CUDA '
           f'kernels: {info.get("cuda") or "none"}; CUDA architectures: '
           f'{info.get("cuda_architectures") or "none"}')
    report(
        f'  kernels for devices: {", ".join(sorted(kernel_device_types()))}')
    if device == 'cuda' and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        report(f'GPU: {torch.cuda.get_device_name()} (sm_{major}{minor})')


def device_problem(device: str) -> Optional[str]:
    """Why the check cannot run on ``device`` at all, or None."""
    if device == 'cuda' and not torch.cuda.is_available():
        if torch.version.cuda is None:
            return (f'CUDA is not available: torch {torch.__version__} is a '
                    'CPU build')
        return ('CUDA is not available: torch sees no CUDA device '
                '(torch.cuda.is_available() is False)')
    return None


def kernel_problem(device: str) -> Optional[str]:
    """Why the op would not run a compiled kernel on ``device``, or None.
    """
    if not extension_loaded():
        return f'ddetr_plugin._C did not load: {extension_error()}'
    if device not in kernel_device_types():
        return (f'ddetr_plugin._C has no {device} kernel (kernels: '
                f'{sorted(kernel_device_types())}); rebuild it, see the '
                'README, "Installing on a GPU machine"')
    return None


def main(argv: Optional[Sequence[str]] = None,
         report: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    describe_build(args.device, report)
    problem = device_problem(args.device)
    if problem is not None:
        report(f'check not run: {problem}')
        return 2
    problem = kernel_problem(args.device)
    if problem is not None:
        report(f'FAILED: {problem}')
        return 1
    cases = args.cases or DEFAULT_CASES[args.device]
    dtypes = [DTYPES[name] for name in args.dtypes]
    report(f'{"case":<12} {"dtype":<5} {"quantity":<15} {"error":>9} '
           f'{"limit":>8}  result')
    failures = 0
    with warnings.catch_warnings():
        # A fallback to the reference would be a failure, not a warning.
        warnings.filterwarnings('error', message='ms_deform_attn:')
        for name in cases:
            for dtype in dtypes:
                failures += not check_case(name, CASES[name], dtype,
                                           args.device, report)
    if args.benchmark:
        report('benchmark: compiled op vs reference, median of '
               f'{args.repeat}')
        for name in cases:
            for dtype in dtypes:
                benchmark_case(name, CASES[name], dtype, args.device,
                               args.repeat, report)
    total = len(cases) * len(dtypes)
    if failures:
        report(f'FAILED: {failures} of {total} case/dtype pairs mismatch')
        return 1
    report(f'passed: all {total} case/dtype pairs within tolerance')
    return 0


if __name__ == '__main__':
    sys.exit(main())
