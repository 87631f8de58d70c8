"""Compile-check the CUDA sources of the op without a GPU or a CUDA torch.

Every ``ddetr_plugin/ops/csrc/cuda/*.cu`` is compiled with ``nvcc -c`` for
the listed architectures (sm_80 and sm_90 by default) against the include
directories of the torch in this environment, with the flags the real
extension build uses. Nothing is linked or run: this catches syntax, type
and template errors on machines, such as CI, that have ``nvcc`` but no GPU.

The CPU wheel of torch lacks one generated header,
``c10/cuda/impl/cuda_cmake_macros.h``; a one-line stand-in is written to a
temporary include directory used by this check only, never by the build.

Exit status: 0 when every file compiles (or when ``nvcc`` is missing outside
CI, with a message saying the check was skipped), 1 otherwise. With the
environment variable ``CI=true`` a missing ``nvcc`` is an error, so CI can
never pass without having checked.

Example:
    python tools/misc/cuda_compile_check.py
    python tools/misc/cuda_compile_check.py --archs 90 --nvcc-threads 1
"""
import argparse
import glob
import os
import os.path as osp
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CSRC = osp.join(ROOT, 'ddetr_plugin', 'ops', 'csrc')
CUDA_SOURCES = osp.join(CSRC, 'cuda', '*.cu')
STAND_IN_HEADER = osp.join('c10', 'cuda', 'impl', 'cuda_cmake_macros.h')
# What CMake generates for a shared-library build of c10_cuda, which is how
# every torch wheel is built.
STAND_IN_TEXT = '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Compile-check ddetr_plugin/ops/csrc/cuda/*.cu with '
        'nvcc against the installed torch headers (no GPU needed).')
    parser.add_argument(
        '--archs',
        nargs='+',
        default=['80', '90'],
        help='compute capabilities to compile for, e.g. 80 90')
    parser.add_argument(
        '--nvcc-threads',
        type=int,
        default=2,
        help='threads nvcc may use to compile the architectures of one '
        'file in parallel')
    parser.add_argument(
        '--sources',
        nargs='+',
        default=None,
        help='.cu files to check instead of every file under '
        'ddetr_plugin/ops/csrc/cuda')
    return parser.parse_args(argv)


def find_nvcc():
    """Return the path of nvcc, from PATH or from CUDA_HOME, or None."""
    nvcc = shutil.which('nvcc')
    if nvcc is not None:
        return nvcc
    cuda_home = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
    if cuda_home:
        candidate = osp.join(cuda_home, 'bin', 'nvcc')
        if osp.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def torch_flags():
    """Include directories and macros of the torch extension build.

    Returns:
        tuple[list[str], list[str]]: ``-I`` flags for torch's headers and
        the preprocessor and nvcc flags ``torch.utils.cpp_extension`` passes
        to nvcc for a ``CUDAExtension`` named ``_C``.
    """
    import torch
    from torch.utils import cpp_extension
    includes = ['-I' + path for path in cpp_extension.include_paths()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [
        '-DWITH_CUDA',
        '-DTORCH_EXTENSION_NAME=_C',
        '-DTORCH_API_INCLUDE_EXTENSION_H',
        f'-D_GLIBCXX_USE_CXX11_ABI={abi}',
        # The half/bfloat16 restrictions torch imposes on extensions: code
        # that compiles here compiles in the real build.
        *cpp_extension.COMMON_NVCC_FLAGS,
        '-Xcompiler',
        '-fPIC',
    ]
    return includes, flags


def nvcc_command(nvcc, source, output, includes, flags, archs, threads):
    gencode = []
    for arch in archs:
        gencode += ['-gencode', f'arch=compute_{arch},code=sm_{arch}']
    return [
        nvcc, '-c', source, '-o', output, '-std=c++17', '-O3',
        '--use_fast_math', f'--threads={threads}', *gencode, *flags,
        '-I' + CSRC, *includes
    ]


def check_sources(nvcc, sources, archs, threads):
    """Compile every source; return the list of files that failed."""
    includes, flags = torch_flags()
    failed = []
    with tempfile.TemporaryDirectory(prefix='cuda_compile_check_') as tmp:
        stand_in = osp.join(tmp, 'stand_in_include')
        os.makedirs(osp.dirname(osp.join(stand_in, STAND_IN_HEADER)))
        with open(osp.join(stand_in, STAND_IN_HEADER), 'w') as f:
            f.write(STAND_IN_TEXT)
        # Searched after torch's own directories, so a torch that ships the
        # real header keeps using it.
        includes = includes + ['-I' + stand_in]
        for source in sources:
            name = osp.relpath(source, ROOT)
            output = osp.join(tmp, osp.basename(source) + '.o')
            command = nvcc_command(nvcc, source, output, includes, flags,
                                   archs, threads)
            start = time.monotonic()
            result = subprocess.run(
                command, capture_output=True, text=True, cwd=ROOT)
            seconds = time.monotonic() - start
            if result.returncode == 0:
                print(f'ok      {name} ({seconds:.1f} s)', flush=True)
                continue
            failed.append(name)
            print(
                f'FAILED  {name} ({seconds:.1f} s), nvcc exited with '
                f'{result.returncode}:\n  ' + ' '.join(command),
                flush=True)
            sys.stdout.write(result.stdout)
            sys.stdout.write(result.stderr)
    return failed


def main(argv=None):
    args = parse_args(argv)
    start = time.monotonic()
    nvcc = find_nvcc()
    if nvcc is None:
        if os.environ.get('CI', '').lower() == 'true':
            print(
                'cuda_compile_check: nvcc not found on PATH or under '
                'CUDA_HOME, and CI=true requires the CUDA sources to be '
                'checked',
                file=sys.stderr)
            return 1
        print('cuda_compile_check: SKIPPED, nvcc not found on PATH or under '
              'CUDA_HOME (set CI=true to make this an error)')
        return 0
    sources = sorted(args.sources or glob.glob(CUDA_SOURCES))
    if not sources:
        print(
            f'cuda_compile_check: expected .cu files matching '
            f'{osp.relpath(CUDA_SOURCES, ROOT)}, found none',
            file=sys.stderr)
        return 1
    missing = [source for source in sources if not osp.isfile(source)]
    if missing:
        print(
            f'cuda_compile_check: expected existing .cu files, got '
            f'missing {missing}',
            file=sys.stderr)
        return 1
    archs = ', '.join(f'sm_{arch}' for arch in args.archs)
    print(f'cuda_compile_check: {len(sources)} file(s) for {archs} '
          f'with {nvcc}')
    failed = check_sources(nvcc, sources, args.archs, args.nvcc_threads)
    seconds = time.monotonic() - start
    if failed:
        print(f'cuda_compile_check: {len(failed)} of {len(sources)} file(s) '
              f'failed in {seconds:.1f} s: {", ".join(failed)}')
        return 1
    print(f'cuda_compile_check: all {len(sources)} file(s) compiled in '
          f'{seconds:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
