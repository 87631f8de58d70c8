"""Whether the op's CUDA kernels can be built here, and if not, why.

``setup.py`` asks before building (it loads this file by path, since the
package may not import yet), and the op asks again when CUDA tensors meet
an extension built without CUDA kernels, so that its warning says what to
change instead of only that the slow path runs.

The CUDA kernels need a CUDA build of torch and an nvcc of the same major
CUDA version: torch refuses to build with a toolkit of another major
version, a common situation (a system toolkit newer than the CUDA that the
torch wheel was built with). Rather than fail the whole install there, the
build leaves the CUDA kernels out and says why; ``FORCE_CUDA=1`` turns that
into an error for those who want the CUDA kernels or nothing.
"""
import os
import os.path as osp
import re
import subprocess
from typing import Mapping, NamedTuple, Optional


class CudaBuildPlan(NamedTuple):
    """The decision: build the CUDA kernels or not, and the reason."""
    build_cuda: bool
    reason: str


def nvcc_release(cuda_home: str) -> Optional[str]:
    """The ``major.minor`` release that ``<cuda_home>/bin/nvcc`` reports,
    or None when it cannot be run or says no release."""
    nvcc = osp.join(cuda_home, 'bin', 'nvcc')
    try:
        result = subprocess.run([nvcc, '--version'],
                                capture_output=True,
                                text=True,
                                timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'release (\d+)\.(\d+)', result.stdout)
    return f'{match.group(1)}.{match.group(2)}' if match else None


def plan_cuda_build(
        environ: Optional[Mapping[str, str]] = None) -> CudaBuildPlan:
    """Decide whether to build the CUDA kernels.

    They are built when torch is a CUDA build, a toolkit is found (torch's
    ``CUDA_HOME``: the ``CUDA_HOME`` variable, else nvcc on PATH, else
    /usr/local/cuda) whose nvcc has torch's major CUDA version, and either
    a GPU is visible or ``TORCH_CUDA_ARCH_LIST`` names the architectures to
    build for.

    Args:
        environ (Mapping[str, str], optional): Environment to read
            ``FORCE_CUDA`` and ``TORCH_CUDA_ARCH_LIST`` from. Defaults to
            ``os.environ``.

    Returns:
        CudaBuildPlan: Whether to build them, and why (not).

    Raises:
        RuntimeError: ``FORCE_CUDA=1`` while they cannot be built; the
            message says why.
    """
    import torch
    from torch.utils import cpp_extension
    environ = os.environ if environ is None else environ
    forced = environ.get('FORCE_CUDA', '0') == '1'
    torch_cuda = torch.version.cuda
    cuda_home = cpp_extension.CUDA_HOME
    if torch_cuda is None:
        reason = (f'torch {torch.__version__} is a CPU build; install a CUDA '
                  'build of torch for the CUDA kernels')
    elif cuda_home is None:
        reason = ('no CUDA toolkit was found; set CUDA_HOME to one (or put '
                  f'its nvcc on PATH), for CUDA {torch_cuda} like torch')
    else:
        release = nvcc_release(cuda_home)
        if release is None:
            reason = f'{osp.join(cuda_home, "bin", "nvcc")} did not run'
        elif release.split('.')[0] != torch_cuda.split('.')[0]:
            major = torch_cuda.split('.')[0]
            reason = (f'nvcc {release} (in {cuda_home}) does not match the '
                      f'CUDA {torch_cuda} torch was built with; install a '
                      f'CUDA {major}.x toolkit and set CUDA_HOME to it, or '
                      f'install a torch built for CUDA {release}')
        elif (not forced and 'TORCH_CUDA_ARCH_LIST' not in environ
              and not torch.cuda.is_available()):
            reason = ('no GPU is visible; set TORCH_CUDA_ARCH_LIST (e.g. '
                      '"8.0;9.0") to build for the GPUs of another machine')
        else:
            return CudaBuildPlan(
                True, f'nvcc {release} (in {cuda_home}) for torch '
                f'{torch.__version__} with CUDA {torch_cuda}')
    if forced:
        raise RuntimeError('FORCE_CUDA=1, but the CUDA kernels of '
                           f'ddetr_plugin cannot be built: {reason}')
    return CudaBuildPlan(False, reason)
