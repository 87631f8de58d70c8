"""Build and install ddetr_plugin.

The compiled op ``ddetr_plugin._C`` is always built: with its CUDA kernels
where a CUDA build of torch and an nvcc of its major CUDA version are
present, CPU-only otherwise (``ddetr_plugin/ops/cuda_build.py`` decides and
says why; ``FORCE_CUDA=1`` makes a missing piece an error). Nothing here
needs a GPU.
"""
import glob
import importlib.util
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
    path = osp.join(ROOT, 'ddetr_plugin', 'ops', 'cuda_build.py')
    spec = importlib.util.spec_from_file_location('cuda_build', path)
    cuda_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_build)
    plan = cuda_build.plan_cuda_build()
    verb = 'with' if plan.build_cuda else 'without'
    print(f'ddetr_plugin: building {verb} CUDA kernels: {plan.reason}')
    return plan.build_cuda


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
