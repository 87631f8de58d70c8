"""Build and install ddetr_plugin.

The compiled op ``ddetr_plugin._C`` is always built: with its CUDA kernels
where a CUDA compiler and a CUDA build of torch are present (or when
``FORCE_CUDA=1``), CPU-only otherwise. Nothing here needs a GPU.
"""
import glob
import os
import os.path as osp

from setuptools import find_packages, setup

ROOT = osp.dirname(osp.abspath(__file__))
CSRC = osp.join('ddetr_plugin', 'ops', 'csrc')


def read_version() -> str:
    scope = {}
    with open(osp.join(ROOT, 'ddetr_plugin', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def want_cuda() -> bool:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME
    if os.getenv('FORCE_CUDA', '0') == '1':
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and (
        torch.cuda.is_available() or 'TORCH_CUDA_ARCH_LIST' in os.environ)


def make_extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension
    sources = sorted(
        glob.glob(osp.join(CSRC, '*.cpp')) +
        glob.glob(osp.join(CSRC, 'cpu', '*.cpp')))
    cxx_flags = ['-O3', '-std=c++17', '-fopenmp']
    define_macros = []
    extension = CppExtension
    extra_compile_args = {'cxx': cxx_flags}
    if want_cuda():
        extension = CUDAExtension
        sources += sorted(glob.glob(osp.join(CSRC, 'cuda', '*.cu')))
        define_macros.append(('WITH_CUDA', None))
        extra_compile_args['nvcc'] = ['-O3', '-std=c++17', '--use_fast_math']
    return [
        extension(
            name='ddetr_plugin._C',
            sources=sources,
            include_dirs=[osp.join(ROOT, CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=['-fopenmp'])
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension
    setup(
        name='ddetr_plugin',
        version=read_version(),
        description='Deformable DETR for MMDetection 3.x with its own '
        'multi-scale deformable attention op',
        packages=find_packages(
            exclude=('tests', 'tests.*', 'configs', 'tools', 'demo')),
        python_requires='>=3.9',
        ext_modules=make_extensions(),
        cmdclass={'build_ext': BuildExtension.with_options(use_ninja=True)},
        zip_safe=False)


if __name__ == '__main__':
    main()
