"""Benchmark the plugin's multi-scale deformable attention against mmcv's.

Shapes are those of Deformable DETR R50 at 800x1333: four levels
(100, 167), (50, 84), (25, 42), (13, 21) (22223 keys), 8 heads of 32
channels, 4 points per level. ``encoder`` has one query per key, ``decoder``
300 queries over the same value; each at batch 1 and 2. Locations are
uniform in [0, 1] (no spatial locality: the hardest case for caches, for
both implementations) and weights a softmax over levels and points.

For each shape and pass (``forward``; ``forward+backward``, gradients of
value, locations and weights) the script prints the median time of the
plugin and of the baseline measured in the same run, the speed-up
(baseline time / plugin time), and the peak memory of each with its ratio
(plugin / baseline).

Baseline:
    CPU: mmcv's ``multi_scale_deformable_attn_pytorch`` (``grid_sample``),
    with the same number of threads as the plugin (``--threads``, default
    2). CUDA: mmcv's compiled ``MultiScaleDeformableAttnFunction`` when
    mmcv has its CUDA ops, else the same PyTorch function on the GPU. The
    baseline always runs in float32; ``--dtype`` applies to the plugin.
    Without mmcv the plugin's own reference (the same algorithm) stands in
    and the header says so.

Peak memory:
    CPU: PyTorch's CPU allocator reports every tensor allocation and free
    to the profiler; the pass is run once more under
    ``torch.profiler.profile(profile_memory=True)`` and the peak is the
    largest "Total Allocated" of the trace's memory events, i.e. the most
    bytes held at once by tensors created during the pass (inputs, which
    both share, are excluded; kernel-internal ``std::vector`` scratch of the
    plugin, a few head_dims-sized rows per thread, is not seen). CUDA:
    ``torch.cuda.max_memory_allocated`` above the memory held before the
    pass.

Achieved bandwidth (CUDA only):
    bytes moved at least once, divided by the time: forward reads the value
    and the locations and weights and writes the output; backward reads the
    output gradient, the value, locations and weights and writes the three
    gradients. Value rows gathered several times are counted once, so this
    is a lower bound on the traffic; compare it with ``--peak-gbps`` (the
    device's DRAM bandwidth, e.g. 3350 for an H100 SXM).

Example:
    python tools/analysis_tools/benchmark_msda.py --threads 2
    python tools/analysis_tools/benchmark_msda.py --device cuda \
        --dtype fp16 --peak-gbps 3350
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument(
        '--dtype',
        default='fp32',
        choices=sorted(DTYPES),
        help='dtype of the plugin\'s value (the baseline runs in fp32)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument(
        '--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument(
        '--peak-gbps',
        type=float,
        default=None,
        help='DRAM bandwidth of the GPU in GB/s, to print the fraction '
        'achieved')
    parser.add_argument(
        '--json', default=None, help='also write the rows to this file')
    return parser.parse_args()


def make_inputs(batch_size: int,
                num_queries: Optional[int],
                dtype,
                device: str,
                seed: int = 0) -> List[Tensor]:
    """value, spatial_shapes, level_start_index, locations, weights."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(LEVEL_SHAPES, dtype=torch.int64)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_keys = int(sizes.sum())
    num_queries = num_keys if num_queries is None else num_queries
    num_levels = len(LEVEL_SHAPES)
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


def load_baseline(device: str) -> Tuple[str, Callable]:
    """(description, function with the plugin's signature)."""
    try:
        from mmcv.ops import multi_scale_deform_attn as mmcv_msda
    except Exception as error:  # mmcv missing or its ops not built
        from ddetr_plugin.ops import ms_deform_attn_reference
        return (f'ddetr_plugin reference (mmcv unavailable: {error})',
                ms_deform_attn_reference)
    if device == 'cuda':
        try:
            from mmcv.utils import ext_loader
            ext_loader.load_ext('_ext', ['ms_deform_attn_forward'])
            function = mmcv_msda.MultiScaleDeformableAttnFunction

            def mmcv_cuda(value, spatial_shapes, level_start_index, locations,
                          weights):
                return function.apply(value, spatial_shapes, level_start_index,
                                      locations, weights, 64)

            return 'mmcv MultiScaleDeformableAttnFunction (CUDA)', mmcv_cuda
        except Exception:  # mmcv built without CUDA ops
            pass

    def mmcv_pytorch(value, spatial_shapes, level_start_index, locations,
                     weights):
        return mmcv_msda.multi_scale_deformable_attn_pytorch(
            value, spatial_shapes, locations, weights)

    return 'mmcv multi_scale_deformable_attn_pytorch', mmcv_pytorch


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


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda given but torch sees no CUDA device')
    from ddetr_plugin.ops import (extension_error, extension_loaded,
                                  ms_deform_attn)
    baseline_name, baseline = load_baseline(args.device)
    print(f'torch {torch.__version__}, device {args.device}, '
          f'threads {torch.get_num_threads()}, plugin dtype {args.dtype}')
    if args.device == 'cuda':
        print(f'GPU: {torch.cuda.get_device_name()}')
    print(f'plugin: ddetr_plugin.ops.ms_deform_attn (compiled extension '
          f'loaded: {extension_loaded()}'
          f'{"" if extension_loaded() else ", " + str(extension_error())})')
    print(f'baseline: {baseline_name}, fp32')
    header = (f'{"shape":<12} {"pass":<17} {"plugin ms":>10} '
              f'{"baseline ms":>12} {"speed-up":>9} {"plugin MiB":>11} '
              f'{"baseline MiB":>13} {"mem ratio":>10}')
    if args.device == 'cuda':
        header += f' {"GB/s":>8}'
        if args.peak_gbps:
            header += f' {"% peak":>7}'
    print(header)
    rows: List[Dict] = []
    for shape in args.shapes:
        batch_size, num_queries = SHAPES[shape]
        plugin_inputs = make_inputs(batch_size, num_queries,
                                    DTYPES[args.dtype], args.device)
        baseline_inputs = make_inputs(batch_size, num_queries, torch.float32,
                                      args.device)
        for backward in (False, True):
            plugin_pass = make_pass(ms_deform_attn, plugin_inputs, backward)
            baseline_pass = make_pass(baseline, baseline_inputs, backward)
            plugin_time = median_seconds(*plugin_pass, args.device,
                                         args.warmup, args.repeat)
            baseline_time = median_seconds(*baseline_pass, args.device,
                                           args.warmup, args.repeat)
            plugin_peak = peak_bytes(*plugin_pass, args.device)
            baseline_peak = peak_bytes(*baseline_pass, args.device)
            row = dict(
                shape=shape,
                pass_='forward+backward' if backward else 'forward',
                plugin_ms=plugin_time * 1e3,
                baseline_ms=baseline_time * 1e3,
                speed_up=baseline_time / plugin_time,
                plugin_mib=plugin_peak / 2**20,
                baseline_mib=baseline_peak / 2**20,
                memory_ratio=plugin_peak / max(baseline_peak, 1))
            line = (f'{shape:<12} {row["pass_"]:<17} '
                    f'{row["plugin_ms"]:>10.1f} {row["baseline_ms"]:>12.1f} '
                    f'{row["speed_up"]:>8.2f}x {row["plugin_mib"]:>11.1f} '
                    f'{row["baseline_mib"]:>13.1f} '
                    f'{row["memory_ratio"]:>10.3f}')
            if args.device == 'cuda':
                gbps = moved_bytes(plugin_inputs, backward) / plugin_time / 1e9
                row['plugin_gbps'] = gbps
                line += f' {gbps:>8.1f}'
                if args.peak_gbps:
                    line += f' {100 * gbps / args.peak_gbps:>6.1f}%'
            print(line, flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, 'w') as file:
            json.dump(rows, file, indent=2)


if __name__ == '__main__':
    main()
