"""Benchmark the plugin's multi-scale deformable attention against baselines.

Shapes are those of Deformable DETR R50 at 800x1333: four levels
(100, 167), (50, 84), (25, 42), (13, 21) (22223 keys), 8 heads of 32
channels, 4 points per level. ``encoder`` has one query per key, ``decoder``
300 queries over the same value; each at batch 1 and 2. Locations are
uniform in [0, 1] (no spatial locality: the hardest case for caches, for
every implementation) and weights a softmax over levels and points.

For each shape, pass (``forward``; ``forward+backward``, gradients of
value, locations and weights) and dtype the script prints one line per
implementation measured in the same run: the median time, the plugin's
speed-up over it (its time / the plugin's), its peak memory, and the bytes
the pass moves at least once with the bandwidth that makes, against the
device's copy bandwidth, which the script measures itself at the start.

Baselines (``--baselines``; each runs in the plugin's dtype where it can):
    mmcv-pytorch: mmcv's ``multi_scale_deformable_attn_pytorch``
        (``grid_sample``), the CPU default.
    mmcv-cuda: mmcv 2.1.0's compiled CUDA kernel, from mmcv's ops or, with
        ``--mmcv-library``, from the library ``tools/misc/gpu_check.sh``
        compiles out of mmcv's sources (fp32 and fp16 only).
    deformops-triton, deformops-eager: ``deformops.registry.msda`` with
        that backend (deformops 3.0.1, Python >= 3.12).
A baseline that cannot run (not installed, no kernel for the dtype) is
printed as missing, with the reason: nothing stands in for it. Where the
plugin has no compiled kernel for the device its op runs the plain-PyTorch
reference: its rows then say ``ddetr_plugin FALLBACK`` (``"fallback":
true`` in the JSON rows).

Peak memory:
    CPU: the pass is run once more under ``torch.profiler`` with
    ``profile_memory=True``; the peak is the largest "Total Allocated" of
    its memory events above the start, i.e. the most bytes held at once by
    tensors created during the pass (inputs excluded). CUDA:
    ``torch.cuda.max_memory_allocated`` above the memory held before.

Bytes moved: forward reads the value, the locations and weights and writes
the output; backward also reads the output gradient, the value, locations
and weights and writes the three gradients. Value rows gathered several
times are counted once, so this is a lower bound on the traffic.

Example:
    python tools/analysis_tools/benchmark_msda.py --threads 2
    python tools/analysis_tools/benchmark_msda.py --device cuda \
        --dtypes fp32 fp16 bf16 --baselines mmcv-cuda deformops-triton
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

LEVEL_SHAPES = ((100, 167), (50, 84), (25, 42), (13, 21))
NUM_HEADS, HEAD_DIMS, NUM_POINTS = 8, 32, 4
SHAPES = {
    'encoder-bs1': (1, None),
    'encoder-bs2': (2, None),
    'decoder-bs1': (1, 300),
    'decoder-bs2': (2, 300),
}
DTYPES = {
    'fp32': torch.float32,
    'fp16': torch.float16,
    'bf16': torch.bfloat16,
}
BASELINES = ('mmcv-pytorch', 'mmcv-cuda', 'deformops-triton',
             'deformops-eager')


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument(
        '--dtypes',
        nargs='+',
        default=['fp32'],
        choices=list(DTYPES),
        help='dtypes of the value (the plugin and every baseline)')
    parser.add_argument(
        '--baselines',
        nargs='+',
        default=None,
        choices=BASELINES,
        help='default: mmcv-pytorch on cpu; mmcv-cuda, deformops-triton '
        'on cuda')
    parser.add_argument(
        '--mmcv-library',
        default=None,
        help='library registering torch.ops.mmcv_msda (built by '
        'tools/misc/gpu_check/build_mmcv_msda.py)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument(
        '--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument(
        '--json', default=None, help='also write the rows to this file')
    return parser.parse_args()


def make_inputs(batch_size: int,
                num_queries: Optional[int],
                dtype,
                device: str,
                seed: int = 0,
                level_shapes=LEVEL_SHAPES) -> List[Tensor]:
    """value, spatial_shapes, level_start_index, locations, weights.

    ``level_shapes``: (h, w) of each level; other models' shapes
    (benchmark_mmcv_models.py).
    """
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(level_shapes, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_keys = int(sizes.sum())
    num_queries = num_keys if num_queries is None else num_queries
    num_levels = len(level_shapes)
    value = torch.randn(
        batch_size, num_keys, NUM_HEADS, HEAD_DIMS, generator=generator)
    locations = torch.rand(
        batch_size,
        num_queries,
        NUM_HEADS,
        num_levels,
        NUM_POINTS,
        2,
        generator=generator)
    weights = torch.randn(
        batch_size,
        num_queries,
        NUM_HEADS,
        num_levels * NUM_POINTS,
        generator=generator).softmax(-1).view(batch_size, num_queries,
                                              NUM_HEADS, num_levels,
                                              NUM_POINTS)
    return [
        value.to(device, dtype),
        spatial_shapes.to(device),
        level_start_index.to(device),
        locations.to(device),
        weights.to(device)
    ]


class Baseline(NamedTuple):
    """A baseline: ``function`` has the plugin's signature and takes its
    inputs; None with ``missing`` saying why it cannot run."""
    name: str
    function: Optional[Callable]
    missing: Optional[str]
    dtypes: Tuple[torch.dtype, ...] = tuple(DTYPES.values())


def load_mmcv_pytorch() -> Baseline:
    try:
        from mmcv.ops.multi_scale_deform_attn import \
            multi_scale_deformable_attn_pytorch
    except Exception as error:  # mmcv missing or broken
        return Baseline('mmcv-pytorch', None, f'mmcv not importable: {error}')

    def function(value, spatial_shapes, level_start_index, locations, weights):
        # grid_sample needs one dtype for the value and the grid.
        return multi_scale_deformable_attn_pytorch(value, spatial_shapes,
                                                   locations.to(value.dtype),
                                                   weights.to(value.dtype))

    return Baseline('mmcv-pytorch', function, None)


def load_mmcv_cuda(library: Optional[str]) -> Baseline:
    """mmcv's CUDA kernel, from --mmcv-library or from mmcv's own ops."""
    name, half_types = 'mmcv-cuda', (torch.float32, torch.float16)
    if library is not None:
        try:
            torch.ops.load_library(library)
            operators = torch.ops.mmcv_msda
        except Exception as error:  # the build failed or is stale
            return Baseline(name, None, f'cannot load {library}: {error}')

        def function(value, spatial_shapes, level_start_index, locations,
                     weights):
            return _MmcvFunction.apply(operators, value, spatial_shapes,
                                       level_start_index,
                                       locations.to(value.dtype),
                                       weights.to(value.dtype))

        return Baseline(name, function, None, half_types)
    try:
        from mmcv.ops.multi_scale_deform_attn import \
            MultiScaleDeformableAttnFunction
        from mmcv.utils import ext_loader
        ext_loader.load_ext('_ext', ['ms_deform_attn_forward'])
    except Exception as error:  # mmcv missing or built without CUDA ops
        return Baseline(
            name, None, f'mmcv\'s CUDA ops not available ({error}); pass '
            '--mmcv-library')

    def mmcv_function(value, spatial_shapes, level_start_index, locations,
                      weights):
        return MultiScaleDeformableAttnFunction.apply(
            value, spatial_shapes, level_start_index,
            locations.to(value.dtype), weights.to(value.dtype), value.shape[0])

    return Baseline(name, mmcv_function, None, half_types)


class _MmcvFunction(torch.autograd.Function):
    """Autograd around torch.ops.mmcv_msda (im2col_step = batch size)."""

    @staticmethod
    def forward(ctx, operators, value, spatial_shapes, level_start_index,
                locations, weights):
        ctx.operators = operators
        ctx.save_for_backward(value, spatial_shapes, level_start_index,
                              locations, weights)
        return operators.forward(value, spatial_shapes, level_start_index,
                                 locations, weights, value.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        inputs = ctx.saved_tensors
        grads = ctx.operators.backward(*inputs, grad_output,
                                       inputs[0].shape[0])
        return (None, grads[0], None, None, grads[1], grads[2])


def load_deformops(backend_name: str) -> Baseline:
    name = f'deformops-{backend_name}'
    if sys.version_info < (3, 12):
        return Baseline(
            name, None, 'deformops 3.0.1 needs Python >= 3.12, this is '
            f'{sys.version.split()[0]}')
    try:
        from deformops.registry import Backend, msda
        backend = getattr(Backend, backend_name.upper())
    except Exception as error:  # not installed, or Python < 3.12
        return Baseline(name, None, f'deformops not importable: {error!r}')

    def function(value, spatial_shapes, level_start_index, locations, weights):
        # deformops reads the weights in the value's dtype.
        return msda(
            value,
            spatial_shapes,
            level_start_index,
            locations,
            weights.to(value.dtype),
            backend=backend).flatten(2)

    return Baseline(name, function, None)


def load_baselines(names: List[str], library: Optional[str]) -> List:
    loaders = {
        'mmcv-pytorch': load_mmcv_pytorch,
        'mmcv-cuda': lambda: load_mmcv_cuda(library),
        'deformops-triton': lambda: load_deformops('triton'),
        'deformops-eager': lambda: load_deformops('eager'),
    }
    return [loaders[name]() for name in names]


def copy_gbps(device: str) -> float:
    """Bandwidth of a plain copy of 512 MiB (64 MiB on a CPU) on the
    device, read plus write, in GB/s."""
    mebibytes = 512 if device == 'cuda' else 64
    source = torch.empty(mebibytes << 18, device=device)  # float32
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), lambda: None,
                             device, 2, 5)
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def make_pass(function: Callable, inputs: List[Tensor],
              backward: bool) -> Tuple[Callable[[], None], Callable[[], None]]:
    """(run, reset): run one forward (and backward) pass; reset drops the
    gradients of the previous pass, outside the timed or profiled region
    so that freeing them is not counted."""
    if not backward:

        def run():
            with torch.no_grad():
                function(*inputs)

        return run, lambda: None
    leaves = [
        tensor.detach().clone().requires_grad_(tensor.is_floating_point())
        for tensor in inputs
    ]

    def run():
        output = function(*leaves)
        output.backward(torch.ones_like(output))

    def reset():
        for leaf in leaves:
            leaf.grad = None

    return run, reset


def synchronize(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def median_seconds(run: Callable[[], None], reset: Callable[[], None],
                   device: str, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        reset()
        run()
    times = []
    for _ in range(repeat):
        reset()
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(run: Callable[[], None], reset: Callable[[], None],
               device: str) -> int:
    """Most bytes held at once by tensors allocated during ``run``."""
    reset()
    if device == 'cuda':
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        run()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'trace.json')
        p.export_chrome_trace(path)
        with open(path) as file:
            events = json.load(file)['traceEvents']
    memory = sorted((event
                     for event in events if event.get('name') == '[memory]'
                     and 'Total Allocated' in event.get('args', {})),
                    key=lambda event: event['ts'])
    if not memory:
        return 0
    # "Total Allocated" is the allocator's running total, which does not
    # start at zero with the profiler: measure from its value at the start.
    first = memory[0]['args']
    start = first['Total Allocated'] - first['Bytes']
    return max(event['args']['Total Allocated'] for event in memory) - start


def moved_bytes(inputs: List[Tensor], backward: bool) -> int:
    """Lower bound of the bytes a pass reads and writes (see docstring)."""
    value, _, _, locations, weights = inputs
    num_queries = locations.shape[1]
    output = (
        value.shape[0] * num_queries * value.shape[2] * value.shape[3] *
        value.element_size())
    # The kernels read locations and weights in float32 with a half value.
    location_size = max(locations.element_size(), 4)
    samples = (weights.numel() + locations.numel()) * location_size
    value_bytes = value.numel() * value.element_size()
    forward = value_bytes + samples + output
    if not backward:
        return forward
    # grad_output, value, samples read; grad value and sample grads written.
    return forward + output + 2 * value_bytes + 2 * samples


def measure(function: Callable, inputs: List[Tensor], backward: bool,
            args: argparse.Namespace) -> Dict:
    run, reset = make_pass(function, inputs, backward)
    seconds = median_seconds(run, reset, args.device, args.warmup, args.repeat)
    return dict(
        ms=seconds * 1e3, mib=peak_bytes(run, reset, args.device) / 2**20)


def try_measure(
        function: Callable, inputs: List[Tensor], backward: bool,
        args: argparse.Namespace) -> Tuple[Optional[Dict], Optional[str]]:
    """(measurement, None), or (None, why it failed): one implementation
    failing at run time must not cost the others' rows."""
    try:
        return measure(function, inputs, backward, args), None
    except Exception as error:  # reported in its row, the run goes on
        message = str(error).strip().splitlines()
        return None, (f'failed: {type(error).__name__}: '
                      f'{message[0] if message else ""}')


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda given but torch sees no CUDA device')
    from ddetr_plugin.ops import (extension_error, extension_loaded,
                                  ms_deform_attn)
    from ddetr_plugin.ops.extension import kernel_device_types
    names = args.baselines or (['mmcv-pytorch'] if args.device == 'cpu' else
                               ['mmcv-cuda', 'deformops-triton'])
    baselines = load_baselines(names, args.mmcv_library)
    print(f'torch {torch.__version__}, device {args.device}, '
          f'threads {torch.get_num_threads()}')
    if args.device == 'cuda':
        print(f'GPU: {torch.cuda.get_device_name()}')
    compiled = extension_loaded() and args.device in kernel_device_types()
    print('plugin: ddetr_plugin.ops.ms_deform_attn ('
          f'{"compiled kernel" if compiled else "NO compiled kernel: "}'
          f'{"" if extension_loaded() else extension_error()})')
    # Without a kernel the op runs the plain-PyTorch reference: every row
    # says so, not only this header.
    plugin_label = 'ddetr_plugin' if compiled else 'ddetr_plugin FALLBACK'
    if not compiled:
        print('plugin rows labelled FALLBACK time the plain-PyTorch '
              'reference, not a compiled kernel')
    for baseline in baselines:
        state = 'MISSING: ' + baseline.missing if baseline.missing else 'ok'
        print(f'baseline {baseline.name}: {state}')
    bandwidth = copy_gbps(args.device)
    print(f'copy bandwidth (measured): {bandwidth:.1f} GB/s')
    print(f'{"shape":<12} {"pass":<17} {"dtype":<5} {"implementation":<21} '
          f'{"ms":>9} {"speed-up":>9} {"MiB peak":>9} {"MB moved":>9} '
          f'{"GB/s":>8} {"% copy":>7}')
    rows: List[Dict] = []
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            inputs = make_inputs(*SHAPES[shape], dtype, args.device)
            for backward in (False, True):
                pass_name = 'forward+backward' if backward else 'forward'
                megabytes = moved_bytes(inputs, backward) / 1e6
                prefix = f'{shape:<12} {pass_name:<17} {dtype_name:<5}'
                plugin, failure = try_measure(ms_deform_attn, inputs, backward,
                                              args)
                results = [('ddetr_plugin', plugin, failure)]
                for baseline in baselines:
                    missing = baseline.missing
                    if missing is None and dtype not in baseline.dtypes:
                        missing = f'no {dtype_name} kernel'
                    if missing is not None:
                        results.append((baseline.name, None, missing))
                        continue
                    results.append((baseline.name, *try_measure(
                        baseline.function, inputs, backward, args)))
                for name, result, missing in results:
                    row = dict(
                        shape=shape,
                        pass_=pass_name,
                        dtype=dtype_name,
                        implementation=name,
                        mb_moved=megabytes,
                        copy_gbps=bandwidth,
                        missing=missing)
                    label = name
                    if name == 'ddetr_plugin':
                        row['fallback'] = not compiled
                        label = plugin_label
                    if result is None:
                        print(f'{prefix} {label:<21} missing ({missing})')
                        rows.append(row)
                        continue
                    gbps = megabytes / result['ms']
                    speed_up = (
                        result['ms'] /
                        plugin['ms'] if plugin else float('nan'))
                    row.update(result, speed_up=speed_up, gbps=gbps)
                    print(
                        f'{prefix} {label:<21} {result["ms"]:>9.3f} '
                        f'{speed_up:>8.2f}x {result["mib"]:>9.1f} '
                        f'{megabytes:>9.1f} {gbps:>8.1f} '
                        f'{100 * gbps / bandwidth:>6.1f}%',
                        flush=True)
                    rows.append(row)
                if args.json:  # after each pass: a cut run keeps its rows
                    with open(args.json, 'w') as file:
                        json.dump(rows, file, indent=2)


if __name__ == '__main__':
    main()
