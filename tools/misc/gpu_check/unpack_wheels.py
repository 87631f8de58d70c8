"""Unpack the payload's wheels into a folder for PYTHONPATH, without pip.

A wheel is a zip of the package folders; its ``*.data/scripts/`` entries
(the ``ninja`` executable) go to ``<target>/bin`` and are made executable.

Example:
    python tools/misc/gpu_check/unpack_wheels.py .gpu_check_payload/wheels \
        /tmp/gpu_check_site
"""
import glob
import os
import os.path as osp
import shutil
import sys
import zipfile


def unpack(wheels: str, target: str) -> None:
    """Unpack every wheel of ``wheels`` into ``target``.

    Raises:
        SystemExit: ``wheels`` holds no wheel (the payload is missing), so
            that the stage fails instead of passing with nothing unpacked.
    """
    found = sorted(glob.glob(osp.join(wheels, '*.whl')))
    if not found:
        raise SystemExit(
            f'unpack_wheels: no wheel in {wheels}; run '
            'tools/misc/gpu_check.sh prepare on a machine with network '
            'access first, and carry .gpu_check_payload with the checkout')
    binaries = osp.join(target, 'bin')
    os.makedirs(binaries, exist_ok=True)
    for wheel in found:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        print(f'unpack_wheels: {osp.basename(wheel)}')
    for script in glob.glob(osp.join(target, '*.data', 'scripts', '*')):
        destination = osp.join(binaries, osp.basename(script))
        shutil.move(script, destination)
        os.chmod(destination, 0o755)


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit('usage: unpack_wheels.py WHEELS_FOLDER TARGET_FOLDER')
    unpack(sys.argv[1], sys.argv[2])
