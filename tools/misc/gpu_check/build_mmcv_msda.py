"""Build mmcv 2.1.0's multi-scale deformable attention CUDA kernel alone.

The GPU check compares the plugin with mmcv's own CUDA kernel on a machine
without mmcv: the kernel's sources, taken from mmcv's source distribution
into the payload folder by ``prepare_payload.py``, are compiled with a small
binding (``mmcv_msda_binding.cpp``) into a library that registers
``torch.ops.mmcv_msda.forward`` and ``backward``.

Two headers of mmcv's may be missing there:

- ``THC/THCAtomics.cuh``: torch 2.11 ships it, later torch does not; a
  stand-in (``shim_missing/``) is used only when torch lacks it.
- ``ATen/cuda/CUDAContext.h`` includes, through ``CUDAContextLight.h``,
  the headers of cuSPARSE, cuBLAS, cuBLASLt and cuSOLVER
  (``CONTEXT_HEADERS``); when the toolkit lacks any of them, a stand-in
  (``shim_context/``) replaces that header.

``--compile-only`` runs nvcc without linking (any machine with nvcc, no
GPU), the check the CPU mode of gpu_check.sh can do.

Example:
    python tools/misc/gpu_check/build_mmcv_msda.py \
        --payload .gpu_check_payload --build-dir $OUT/mmcv_build \
        --library-path-file $OUT/mmcv_msda_library.txt
"""
import argparse
import glob
import os
import os.path as osp
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence

HERE = osp.dirname(osp.abspath(__file__))
BINDING = osp.join(HERE, 'mmcv_msda_binding.cpp')
# Where prepare_payload.py puts mmcv's files, relative to the payload.
MMCV_CSRC = osp.join('mmcv', 'mmcv', 'ops', 'csrc')
KERNEL_SOURCE = osp.join(MMCV_CSRC, 'pytorch', 'cuda',
                         'ms_deform_attn_cuda.cu')
# What torch's ATen/cuda/CUDAContextLight.h includes from the toolkit's
# libraries (cudss.h only in builds with USE_CUDSS, which wheels are not).
CONTEXT_HEADERS = ('cusparse.h', 'cublas_v2.h', 'cublasLt.h', 'cusolverDn.h')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--payload', required=True)
    parser.add_argument('--build-dir', required=True)
    parser.add_argument(
        '--library-path-file',
        help='write the path of the built library into this file')
    parser.add_argument('--compile-only', action='store_true')
    return parser.parse_args(argv)


def header_dirs(header: str) -> List[str]:
    """The toolkit's include directories holding ``header``. (Those of the
    nvidia-* wheels are not used: they also hold CUDA runtime headers of
    their own version, which would shadow the toolkit's.)"""
    from torch.utils import cpp_extension
    candidates = []
    if cpp_extension.CUDA_HOME:
        candidates.append(osp.join(cpp_extension.CUDA_HOME, 'include'))
        candidates += glob.glob(
            osp.join(cpp_extension.CUDA_HOME, 'targets', '*', 'include'))
    return [
        directory for directory in candidates
        if osp.isfile(osp.join(directory, header))
    ]


def include_dirs(payload: str) -> List[str]:
    """mmcv's include directories plus the headers or stand-ins it needs.
    """
    from torch.utils import cpp_extension
    csrc = osp.join(payload, MMCV_CSRC)
    includes = [osp.join(csrc, 'common'), osp.join(csrc, 'common', 'cuda')]
    found = {header: header_dirs(header) for header in CONTEXT_HEADERS}
    missing = [header for header, dirs in found.items() if not dirs]
    if missing:
        print(f'build_mmcv_msda: no {", ".join(missing)} in the toolkit; '
              'using the CUDAContext.h stand-in')
        includes.insert(0, osp.join(HERE, 'shim_context'))
    else:
        includes += sorted({path for dirs in found.values() for path in dirs})
    torch_has_thc = any(
        osp.isfile(osp.join(path, 'THC', 'THCAtomics.cuh'))
        for path in cpp_extension.include_paths())
    if not torch_has_thc:
        print('build_mmcv_msda: torch has no THC/THCAtomics.cuh; using the '
              'stand-in')
        includes.append(osp.join(HERE, 'shim_missing'))
    return includes


def check_payload(payload: str) -> str:
    source = osp.join(payload, KERNEL_SOURCE)
    if not osp.isfile(source):
        raise SystemExit(f'build_mmcv_msda: expected mmcv\'s kernel at '
                         f'{source}; run tools/misc/gpu_check.sh prepare on '
                         'a machine with network access first')
    return source


def compile_only(source: str, includes: List[str], build_dir: str) -> int:
    """nvcc -c of mmcv's kernel and g++ -fsyntax-only of the binding."""
    sys.path.insert(0, osp.dirname(HERE))
    import cuda_compile_check
    torch_includes, flags = cuda_compile_check.torch_flags()
    nvcc = cuda_compile_check.find_nvcc()
    if nvcc is None:
        print('build_mmcv_msda: nvcc not found')
        return 1
    with tempfile.TemporaryDirectory() as stand_in:
        # The CPU wheel of torch lacks this generated header (see
        # cuda_compile_check.py); never used in a real build.
        header = osp.join(stand_in, cuda_compile_check.STAND_IN_HEADER)
        os.makedirs(osp.dirname(header))
        with open(header, 'w') as file:
            file.write(cuda_compile_check.STAND_IN_TEXT)
        search = ['-I' + path
                  for path in includes] + torch_includes + ['-I' + stand_in]
        commands = [[
            nvcc, '-c', source, '-o',
            osp.join(build_dir, 'ms_deform_attn_cuda.o'), '-std=c++17',
            '-gencode', 'arch=compute_90,code=sm_90', *flags, *search
        ],
                    [
                        'g++', '-fsyntax-only', '-std=c++17', BINDING, *search,
                        *[flag for flag in flags if flag.startswith('-D')]
                    ]]
        for command in commands:
            result = subprocess.run(command, capture_output=True, text=True)
            print(f'{"ok" if result.returncode == 0 else "FAILED"}: '
                  f'{" ".join(command[:3])} ...')
            if result.returncode != 0:
                print(result.stdout + result.stderr)
                return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    source = check_payload(args.payload)
    os.makedirs(args.build_dir, exist_ok=True)
    includes = include_dirs(args.payload)
    if args.compile_only:
        return compile_only(source, includes, args.build_dir)
    from torch.utils import cpp_extension
    cpp_extension.load(
        name='mmcv_msda',
        sources=[BINDING, source],
        extra_include_paths=includes,
        extra_cflags=['-O3', '-std=c++17'],
        extra_cuda_cflags=['-O3', '-std=c++17'],
        build_directory=args.build_dir,
        is_python_module=False,
        verbose=True)
    library = osp.join(args.build_dir, 'mmcv_msda.so')
    if not osp.isfile(library):
        print(f'build_mmcv_msda: expected {library} after the build')
        return 1
    if args.library_path_file:
        with open(args.library_path_file, 'w') as file:
            file.write(library + '\n')
    print(f'build_mmcv_msda: built {library}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
