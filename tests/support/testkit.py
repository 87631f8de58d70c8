"""Pieces the test files share: paths, script loading, config text, skips.

Tests run with ``--import-mode=importlib``, so a test module cannot import
a sibling or a conftest. This folder is on ``sys.path`` instead (pytest's
``pythonpath`` option in pyproject.toml, read by every xdist worker too),
and a test imports what it needs with ``from testkit import ...``.
``needs_extension`` marks a test that needs the compiled op.

Importing this module imports neither mmdet nor CUDA: the GPU machine runs
the op tests with torch alone.
"""
import importlib.util
import os.path as osp
from contextlib import contextmanager
from types import ModuleType

import pytest

# The checkout's root: tests/support/ is two folders below it.
REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

# The plugin's "two lines" on top of a config of mmdet's ({base}: a path or
# ``mmdet::`` name), as the README tells users to write them.
PLUGIN_LINES = """_base_ = {base!r}
custom_imports = dict(imports=['ddetr_plugin'], allow_failed_imports=False)
model = dict(_scope_='ddetr_plugin')
"""


def repo_path(*parts: str) -> str:
    """``parts`` joined below the checkout's root."""
    return osp.join(REPO, *parts)


def load_script(path: str, name: str = None) -> ModuleType:
    """Import a script that is not in a package (a tool, a test file) by
    its path.

    Args:
        path (str): The file, absolute or relative to the checkout's root.
        name (str, optional): The module's ``__name__``; the file's stem
            by default. The module is not put into ``sys.modules``.

    Returns:
        module: The executed module.
    """
    path = path if osp.isabs(path) else repo_path(path)
    name = name or osp.splitext(osp.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mmdet_mim(*parts: str) -> str:
    """``parts`` below mmdet's installed ``.mim`` folder (its ``configs``
    and ``tools``, as ``mim`` runs them)."""
    import mmdet
    return osp.join(osp.dirname(mmdet.__file__), '.mim', *parts)


@contextmanager
def mmdet_scope():
    """mmdet's registries as the default scope, as mmdet's own tools set
    them: mmdet's config types name mmdet's classes inside."""
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmdet'):
        yield


def build_in_mmdet_scope(model_cfg):
    """mmdet's own model of ``model_cfg`` (a config dict), built in mmdet's
    scope."""
    from mmdet.registry import MODELS
    with mmdet_scope():
        return MODELS.build(model_cfg)


def extension_missing_reason():
    """Why the compiled op (``ddetr_plugin._C``) cannot run here, or None."""
    from ddetr_plugin.ops.extension import extension_error, extension_loaded
    if extension_loaded():
        return None
    return f'ddetr_plugin._C did not load: {extension_error()}'


def cuda_kernel_missing_reason():
    """Why the op's CUDA kernels cannot run here, or None. Touches CUDA
    only when called (from a fixture or test), never at import."""
    import torch
    if not torch.cuda.is_available():
        return 'no CUDA device (torch.cuda.is_available() is False)'
    reason = extension_missing_reason()
    if reason is not None:
        return reason
    if not torch._C._dispatch_has_kernel_for_dispatch_key(
            'ddetr_plugin::ms_deform_attn_forward', 'CUDA'):
        return ('ddetr_plugin._C has no CUDA kernel (built without CUDA); '
                'rebuild with nvcc and a CUDA build of torch')
    return None


def __getattr__(name: str):
    # ``needs_extension`` loads the op, so it is made on first use: the
    # tool tests import this module without loading ddetr_plugin.
    if name == 'needs_extension':
        reason = extension_missing_reason()
        return pytest.mark.skipif(reason is not None, reason=str(reason))
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
