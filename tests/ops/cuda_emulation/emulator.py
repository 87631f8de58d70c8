"""Build and call the CPU emulation of the op's CUDA kernels.

``emulated_kernels.cpp`` compiles the unchanged kernel source of
``ddetr_plugin/ops/csrc/cuda`` with a host C++ compiler (``$CXX``, else
``g++``) into a small shared library, called here through ``ctypes`` on CPU
tensors. The tests use it to run the CUDA tests' cases where there is no
GPU; see the C++ file for what the emulation does and does not check.

The library links nothing from torch: the kernels only need c10's
header-only ``Half`` and ``BFloat16`` and ``at::opmath_type``.
"""
import ctypes
import os
import os.path as osp
import shutil
import subprocess
from typing import Dict, List, Tuple

import torch
import torch.utils.cpp_extension
from torch import Tensor

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(osp.dirname(HERE)))
KERNEL_DIR = osp.join(ROOT, 'ddetr_plugin', 'ops', 'csrc', 'cuda')
DTYPE_CODES = {
    torch.float64: 0,
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}
# at::opmath_type of each value dtype: the dtype of the locations, weights
# and every accumulation, grad_value's included.
OPMATH_DTYPES = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}
ERROR_SIZE = 1024
# The fields of the launcher's value-gradient plan, in the C side's order.
PLAN_FIELDS = ('gather', 'num_entries', 'num_rows', 'num_items',
               'sort_key_bits')


class CompilerMissing(RuntimeError):
    """No host C++ compiler to build the emulation with."""


def build(directory: str) -> str:
    """Compile the emulation into ``directory``; return the library path.

    Raises:
        CompilerMissing: neither ``$CXX`` nor ``g++`` is on PATH.
        RuntimeError: the compiler failed; the message holds its output.
    """
    compiler = shutil.which(os.environ.get('CXX', 'g++'))
    if compiler is None:
        raise CompilerMissing(
            f"no C++ compiler: {os.environ.get('CXX', 'g++')!r} is not on "
            'PATH (set CXX to build the CUDA kernel emulation)')
    library = osp.join(directory, 'emulated_kernels.so')
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -O3: the full-size cases run a fifth faster than at -O2. Without
    # -ffast-math it may not reorder floating-point sums: the R50 case gave
    # the same bits as at -O2 (output and all three gradients, both halves).
    # -ffp-contract=off: no a * b + c fused where the source does not say
    # so (with -mfma or -march=native g++ would), as the kernels spell out
    # their fused multiply-adds to give a GPU's bits.
    command = [
        compiler, '-std=c++17', '-O3', '-ffp-contract=off', '-shared', '-fPIC',
        f'-D_GLIBCXX_USE_CXX11_ABI={abi}', '-Wall', '-Wno-unknown-pragmas',
        '-include',
        osp.join(HERE, 'cuda_shim.h'), '-I',
        osp.join(HERE, 'include'), '-I', KERNEL_DIR
    ]
    for include in torch.utils.cpp_extension.include_paths():
        command += ['-I', include]
    command += [osp.join(HERE, 'emulated_kernels.cpp'), '-o', library]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError('building the CUDA kernel emulation failed '
                           f'(exit {result.returncode}):\n'
                           f'{" ".join(command)}\n{result.stderr[-4000:]}')
    return library


def _pointer(tensor: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


# Every output lives in the middle of a larger buffer whose GUARD elements
# on either side hold CANARY: a kernel writing outside an output changes
# them, and the call raises. GUARD is a multiple of 16 elements, so outputs
# keep the alignment of a fresh allocation (and the launcher its packing).
GUARD = 4096
CANARY = 1234


def _guarded(shape: Tuple[int, ...], dtype: torch.dtype,
             fill: float) -> Tuple[Tensor, Tensor]:
    """(buffer, output): ``output`` of ``shape`` filled with ``fill``,
    inside ``buffer`` with canaries on both sides."""
    numel = 1
    for size in shape:
        numel *= size
    buffer = torch.full((numel + 2 * GUARD, ), CANARY, dtype=dtype)
    output = buffer[GUARD:GUARD + numel].view(shape)
    output.fill_(fill)
    return buffer, output


def _check_guards(buffer: Tensor, name: str) -> None:
    """Raise if a kernel wrote into the guard regions of ``buffer``."""
    for side, guard in (('before', buffer[:GUARD]), ('after',
                                                     buffer[-GUARD:])):
        changed = (guard != CANARY).nonzero().flatten()
        if changed.numel():
            raise RuntimeError(
                f'a kernel wrote {changed.numel()} element(s) {side} '
                f'{name}, outside the tensor')


class EmulatedKernels:
    """The CUDA kernels run on the CPU, with the launcher's configuration.

    Inputs follow the compiled op's contract (contiguous, int64 level
    tensors, locations and weights in ``at::opmath_type`` of value's dtype),
    on the CPU. ``max_blocks`` > 0 caps the grid below the launcher's
    choice, so that the grid-stride loops iterate; ``reverse`` runs blocks,
    warps and lanes from the last to the first, ``shuffle_seed`` (> 0) in
    an order shuffled with that seed.

    Outputs the launcher leaves uninitialised (``at::empty``) start as NaN
    here, so that an element the kernels fail to write cannot pass for a
    correct zero.
    """

    def __init__(self, library_path: str):
        self._library = ctypes.CDLL(library_path)
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        int_pointer = ctypes.POINTER(ctypes.c_int)
        self._library.emulate_forward.argtypes = (
            [ctypes.c_int] + [pointer] * 6 + [
                ctypes.POINTER(int64), int64, int64, int_pointer,
                ctypes.c_char_p, int64
            ])
        self._library.emulate_divergent_shuffle_probe.argtypes = [
            ctypes.c_char_p, int64
        ]
        self._library.emulate_backward.argtypes = (
            [ctypes.c_int] + [pointer] * 13 + [
                ctypes.POINTER(int64), int64, int64, ctypes.c_int, int_pointer,
                int_pointer, ctypes.c_char_p, int64
            ])
        self._library.emulate_value_grad_plan.argtypes = [
            ctypes.POINTER(int64), ctypes.c_int,
            ctypes.POINTER(int64)
        ]
        self._library.emulate_empty_launch_probe.argtypes = [
            ctypes.c_char_p, int64
        ]

    @staticmethod
    def _call(function, *arguments) -> None:
        """Call a C entry point whose last two arguments are an error
        buffer and its size; raise its message if it fails."""
        error = ctypes.create_string_buffer(ERROR_SIZE)
        if function(*arguments, error, ERROR_SIZE) != 0:
            raise RuntimeError(error.value.decode())

    @staticmethod
    def _order(reverse: bool, shuffle_seed: int) -> int:
        """The C side's run order: 0 first to last, -1 last to first,
        else a shuffle seed."""
        if shuffle_seed < 0 or (reverse and shuffle_seed):
            raise ValueError('expected reverse or a shuffle_seed > 0, got '
                             f'reverse={reverse}, '
                             f'shuffle_seed={shuffle_seed}')
        return -1 if reverse else shuffle_seed

    @staticmethod
    def _sizes(value: Tensor, sampling_locations: Tensor):
        batch_size, num_keys, num_heads, head_dims = value.shape
        _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
        sizes = (batch_size, num_keys, num_queries, num_heads, head_dims,
                 num_levels, num_points)
        return (ctypes.c_int64 * 7)(*sizes)

    @staticmethod
    def _check(tensors: List[Tensor], value: Tensor):
        if value.dtype not in DTYPE_CODES:
            raise TypeError(f'expected value of dtype {list(DTYPE_CODES)}, '
                            f'got {value.dtype}')
        for tensor in tensors:
            if tensor.device.type != 'cpu' or not tensor.is_contiguous():
                raise ValueError('expected contiguous CPU tensors, got one '
                                 f'on {tensor.device} with strides '
                                 f'{tensor.stride()}')

    def forward(self,
                value: Tensor,
                spatial_shapes: Tensor,
                level_start_index: Tensor,
                sampling_locations: Tensor,
                attention_weights: Tensor,
                max_blocks: int = 0,
                reverse: bool = False,
                shuffle_seed: int = 0) -> Tuple[Tensor, int]:
        """Returns the output (bs, nq, nh * hd) and the channels per thread.
        """
        inputs = [
            value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights
        ]
        self._check(inputs, value)
        batch_size, _, num_heads, head_dims = value.shape
        buffer, output = _guarded(
            (batch_size, sampling_locations.shape[1], num_heads * head_dims),
            value.dtype, float('nan'))
        width = ctypes.c_int(0)
        self._call(self._library.emulate_forward, DTYPE_CODES[value.dtype],
                   *map(_pointer, inputs), _pointer(output),
                   self._sizes(value, sampling_locations), max_blocks,
                   self._order(reverse, shuffle_seed), ctypes.byref(width))
        _check_guards(buffer, 'output')
        return output.clone(), width.value

    def value_grad_plan(self, value: Tensor, sampling_locations: Tensor,
                        deterministic: bool) -> Dict[str, int]:
        """The launcher's plan of the value gradient (``plan_value_grad``
        in ``ms_deform_attn_launch_config.h``): ``gather`` (1 for the
        deterministic gather, 0 for atomics), ``num_entries``, ``num_rows``,
        ``num_items`` and ``sort_key_bits``."""
        plan = (ctypes.c_int64 * len(PLAN_FIELDS))()
        self._library.emulate_value_grad_plan(
            self._sizes(value, sampling_locations), int(deterministic), plan)
        return dict(zip(PLAN_FIELDS, plan))

    def backward(
        self,
        grad_output: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        max_blocks: int = 0,
        reverse: bool = False,
        shuffle_seed: int = 0,
        deterministic: bool = False
    ) -> Tuple[Tensor, Tensor, Tensor, int, int]:
        """Returns the gradients of value, sampling_locations and
        attention_weights, the channels per lane and the lanes per query
        head. ``deterministic``: what ``torch.use_deterministic_algorithms``
        says; the launcher's own rule picks the path from it (see
        ``value_grad_plan``)."""
        inputs = [
            grad_output, value, spatial_shapes, level_start_index,
            sampling_locations, attention_weights
        ]
        self._check(inputs, value)
        plan = self.value_grad_plan(value, sampling_locations, deterministic)
        # The launcher's allocation. Gathered: grad_value written whole in
        # value's dtype. Scattered with atomics: accumulated in a zeroed
        # buffer of the op-math dtype, float32 for half types, rounded to
        # value's dtype at the end. The other two written once per sample.
        if plan['gather']:
            value_buffer, grad_value = _guarded(
                tuple(value.shape), value.dtype, float('nan'))
        else:
            value_buffer, grad_value = _guarded(
                tuple(value.shape), OPMATH_DTYPES[value.dtype], 0.0)
        scratch = self._gather_scratch(plan, value.dtype)
        locations_buffer, grad_locations = _guarded(
            tuple(sampling_locations.shape), sampling_locations.dtype,
            float('nan'))
        weights_buffer, grad_weights = _guarded(
            tuple(attention_weights.shape), attention_weights.dtype,
            float('nan'))
        width, group_size = ctypes.c_int(0), ctypes.c_int(0)
        self._call(self._library.emulate_backward, DTYPE_CODES[value.dtype],
                   *map(_pointer, inputs), _pointer(grad_value),
                   _pointer(grad_locations), _pointer(grad_weights),
                   *(_pointer(tensor) for _, tensor in scratch.values()),
                   self._sizes(value, sampling_locations), max_blocks,
                   self._order(reverse, shuffle_seed), int(deterministic),
                   ctypes.byref(width), ctypes.byref(group_size))
        _check_guards(value_buffer, 'grad_value')
        _check_guards(locations_buffer, 'grad_sampling_locations')
        _check_guards(weights_buffer, 'grad_attention_weights')
        for name, (buffer, _) in scratch.items():
            _check_guards(buffer, name)
        return (grad_value.to(value.dtype), grad_locations.clone(),
                grad_weights.clone(), width.value, group_size.value)

    @staticmethod
    def _gather_scratch(
            plan: Dict[str, int],
            dtype: torch.dtype) -> Dict[str, Tuple[Tensor, Tensor]]:
        """(buffer, tensor) of the gather's scratch as the plan sizes it
        (empty without the gather), in the C side's argument order."""
        entries, rows = (plan['num_entries'], ), (plan['num_rows'] + 1, )
        return {
            'rows': _guarded(entries, torch.int64, -7),
            'scales': _guarded(entries, OPMATH_DTYPES[dtype], float('nan')),
            'order': _guarded(entries, torch.int64, -7),
            'row_offsets': _guarded(rows, torch.int64, -7),
        }

    def empty_launch_probe(self) -> None:
        """Launches a kernel for 0 threads.

        Raises:
            RuntimeError: with the emulation's message, as it should.
        """
        self._call(self._library.emulate_empty_launch_probe)

    def divergent_shuffle_probe(self):
        """Runs a kernel with a divergent full-mask shuffle.

        Raises:
            RuntimeError: with the emulation's message, as it should.
        """
        self._call(self._library.emulate_divergent_shuffle_probe)
