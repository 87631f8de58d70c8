"""Gather what the GPU check needs that a bare GPU machine lacks.

The GPU machine has torch, nvcc, Triton and pytest but no network, no mmcv
and no deformops, so this runs beforehand, on a machine that can reach the
package registry, and fills an ignored folder of the checkout (default
``.gpu_check_payload/``) that travels with it:

- ``mmcv/``: from mmcv 2.1.0's source distribution, its LICENSE (Apache
  2.0) and the four files of its multi-scale deformable attention CUDA
  kernel, compiled there by ``build_mmcv_msda.py``;
- ``wheels/``: the ``deformops`` 3.0.1 wheel (pure Python, Python >= 3.12,
  MIT, its license inside) and a ``ninja`` wheel, which
  ``torch.utils.cpp_extension.load`` needs;
- ``MANIFEST.json``: the SHA-256 of every file and where it came from.

Third-party code stays in that folder, with its license, and the package
never imports it. ``--verify`` checks a payload against its manifest.

Examples:
    python tools/misc/gpu_check/prepare_payload.py .gpu_check_payload
    python tools/misc/gpu_check/prepare_payload.py .gpu_check_payload \
        --verify
"""
import argparse
import glob
import hashlib
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Dict, List, Optional, Sequence

MMCV_SDIST = 'mmcv-2.1.0.tar.gz'
# Files taken from the sdist, relative to its top folder mmcv-2.1.0/.
MMCV_FILES = [
    'LICENSE',
    'mmcv/ops/csrc/common/pytorch_cuda_helper.hpp',
    'mmcv/ops/csrc/common/cuda/common_cuda_helper.hpp',
    'mmcv/ops/csrc/common/cuda/ms_deform_attn_cuda_kernel.cuh',
    'mmcv/ops/csrc/pytorch/cuda/ms_deform_attn_cuda.cu',
]
# pip download arguments of each download (the GPU machine runs Python
# 3.12 on x86-64 Linux).
DOWNLOADS = {
    'mmcv': ['--no-binary', ':all:', 'mmcv==2.1.0'],
    'deformops':
    ['--only-binary=:all:', '--python-version', '3.12', 'deformops==3.0.1'],
    'ninja': [
        '--only-binary=:all:', '--python-version', '3.12', '--platform',
        'manylinux2014_x86_64', 'ninja'
    ],
}
MANIFEST = 'MANIFEST.json'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('payload', help='folder to fill (or to verify)')
    parser.add_argument(
        '--verify',
        action='store_true',
        help='check the payload against its manifest instead')
    parser.add_argument(
        '--downloads',
        default=None,
        help='folder already holding the downloads (skips pip)')
    return parser.parse_args(argv)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def download(folder: str) -> None:
    """pip download (no dependencies) of every file into ``folder``."""
    for name, arguments in DOWNLOADS.items():
        command = [
            sys.executable, '-m', 'pip', 'download', '--no-deps', '-d', folder,
            *arguments
        ]
        print(f'prepare_payload: {" ".join(command)}', flush=True)
        subprocess.run(command, check=True)


def one_file(folder: str, pattern: str) -> str:
    matches = sorted(glob.glob(osp.join(folder, pattern)))
    if len(matches) != 1:
        raise SystemExit(f'prepare_payload: expected one {pattern} in '
                         f'{folder}, found {matches}')
    return matches[0]


def extract_mmcv(sdist: str, payload: str) -> None:
    """Copy MMCV_FILES from the sdist into payload/mmcv/."""
    with tarfile.open(sdist) as archive:
        for name in MMCV_FILES:
            member = archive.getmember(f'mmcv-2.1.0/{name}')
            target = osp.join(payload, 'mmcv', name)
            os.makedirs(osp.dirname(target), exist_ok=True)
            with archive.extractfile(member) as source, open(target,
                                                             'wb') as out:
                shutil.copyfileobj(source, out)


def payload_files(payload: str) -> List[str]:
    paths = []
    for root, _, names in os.walk(payload):
        for name in names:
            path = osp.relpath(osp.join(root, name), payload)
            if path != MANIFEST:
                paths.append(path)
    return sorted(paths)


def prepare(payload: str, downloads: Optional[str]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = downloads or scratch
        if downloads is None:
            download(folder)
        if osp.isdir(payload):
            shutil.rmtree(payload)
        os.makedirs(osp.join(payload, 'wheels'))
        sdist = one_file(folder, MMCV_SDIST)
        extract_mmcv(sdist, payload)
        sources: Dict[str, str] = {
            'mmcv': f'{MMCV_SDIST} sha256 {sha256(sdist)}'
        }
        for name in ('deformops', 'ninja'):
            wheel = one_file(folder, f'{name}-*.whl')
            shutil.copy(wheel, osp.join(payload, 'wheels'))
            sources[name] = osp.basename(wheel)
    manifest = {
        'sources': sources,
        'files': {
            path: sha256(osp.join(payload, path))
            for path in payload_files(payload)
        },
    }
    with open(osp.join(payload, MANIFEST), 'w') as file:
        json.dump(manifest, file, indent=2)
    print(f'prepare_payload: {len(manifest["files"])} files in {payload}')


def verify(payload: str) -> List[str]:
    """Problems of the payload (empty when it matches its manifest)."""
    path = osp.join(payload, MANIFEST)
    if not osp.isfile(path):
        return [f'no {path}: run tools/misc/gpu_check.sh prepare']
    with open(path) as file:
        manifest = json.load(file)
    problems = []
    expected = manifest.get('files', {})
    for name, digest in expected.items():
        full = osp.join(payload, name)
        if not osp.isfile(full):
            problems.append(f'missing {name}')
        elif sha256(full) != digest:
            problems.append(f'{name} differs from its manifest checksum')
    for name in payload_files(payload):
        if name not in expected:
            problems.append(f'{name} is not in the manifest')
    needed = [osp.join('mmcv', name) for name in MMCV_FILES]
    problems += [
        f'manifest lacks {name}' for name in needed if name not in expected
    ]
    for wheel in ('deformops', 'ninja'):
        if not glob.glob(osp.join(payload, 'wheels', f'{wheel}-*.whl')):
            problems.append(f'no {wheel} wheel in wheels/')
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.verify:
        problems = verify(args.payload)
        for problem in problems:
            print(f'prepare_payload: {args.payload}: {problem}')
        if not problems:
            print(f'prepare_payload: {args.payload} matches its manifest')
        return 1 if problems else 0
    prepare(args.payload, args.downloads)
    return 0


if __name__ == '__main__':
    sys.exit(main())
