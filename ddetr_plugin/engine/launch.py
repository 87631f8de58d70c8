"""Preparing a config for ``tools/train.py`` and ``tools/test.py``.

The tools share three duties, kept here so that they stay identical:

* every config runs in the plugin's registry scope, which falls back to
  MMDetection's and MMEngine's for everything the plugin does not define;
* the command-line overrides apply in MMDetection's order (config file, then
  ``--cfg-options``, then ``--work-dir``);
* distributed runs work on machines without CUDA. MMEngine 0.10.7 calls
  ``torch.cuda.set_device`` while setting up any ``pytorch`` or ``slurm``
  launch and wraps the model in ``DistributedDataParallel`` with a device
  id, both of which fail on a CPU-only PyTorch. Without CUDA the process
  group is therefore started here with the ``gloo`` backend (``nccl`` needs
  GPUs), before the runner looks, and the model is wrapped without device
  ids.
"""
import os
import os.path as osp
import subprocess
from typing import Optional, Sequence

import torch
import torch.distributed as torch_dist
from mmengine.config import Config

from ..registry import SCOPE

PLUGIN_IMPORTS = ('ddetr_plugin', 'ddetr_plugin.engine')


def load_config(path: str,
                cfg_options: Optional[dict] = None,
                work_dir: Optional[str] = None,
                launcher: str = 'none') -> Config:
    """Read a config and apply the command-line settings shared by the
    tools.

    Args:
        path (str): Config file.
        cfg_options (dict, optional): ``--cfg-options`` overrides.
        work_dir (str, optional): ``--work-dir``; when neither it nor the
            config sets one, ``./work_dirs/<config name>`` is used.
        launcher (str): ``none``, ``pytorch`` or ``slurm``.

    Returns:
        Config: The config, in the plugin's scope.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {path!r} does not exist')
    cfg = Config.fromfile(path)
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(path))[0])
    use_plugin_scope(cfg)
    return cfg


def use_plugin_scope(cfg: Config) -> None:
    """Make ``cfg`` build its components in the plugin's registry scope.

    A config written for plain MMDetection (``default_scope='mmdet'``) still
    works: the plugin's registries look up MMDetection's for every name they
    do not define themselves.
    """
    if cfg.get('default_scope') != SCOPE:
        print(f'default_scope {cfg.get("default_scope")!r} of the config '
              f'is replaced by {SCOPE!r}, so that the plugin\'s components '
              'are used')
        cfg.default_scope = SCOPE
    imports = list(cfg.get('custom_imports', {}).get('imports', []))
    for module in PLUGIN_IMPORTS:
        if module not in imports:
            imports.append(module)
    cfg.custom_imports = dict(
        cfg.get('custom_imports', {}),
        imports=imports,
        allow_failed_imports=False)


def _slurm_environment() -> None:
    """Translate SLURM's task variables into PyTorch's, as MMEngine does."""
    node_list = os.environ['SLURM_NODELIST']
    os.environ.setdefault('MASTER_PORT', '29500')
    if 'MASTER_ADDR' not in os.environ:
        os.environ['MASTER_ADDR'] = subprocess.getoutput(
            f'scontrol show hostname {node_list} | head -n1')
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    os.environ['RANK'] = os.environ['SLURM_PROCID']
    os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')


def prepare_distributed(cfg: Config) -> None:
    """Start a CPU process group for a distributed launch without CUDA.

    Does nothing for ``launcher='none'`` or when CUDA is available, where
    MMEngine's own set-up works.

    Args:
        cfg (Config): The config; ``launcher``, ``env_cfg.dist_cfg`` and
            ``model_wrapper_cfg`` are read and updated in place.

    Raises:
        ValueError: If the launcher is unknown.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher not in ('none', 'pytorch', 'slurm'):
        raise ValueError("launcher must be one of 'none', 'pytorch' or "
                         f"'slurm', got {launcher!r}")
    if launcher == 'none' or torch.cuda.is_available():
        return
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = dict(env_cfg.get('dist_cfg', {}))
    if dist_cfg.get('backend', 'gloo') != 'gloo':
        print(f'dist_cfg.backend {dist_cfg["backend"]!r} needs GPUs; '
              'without CUDA the gloo backend is used')
    dist_cfg['backend'] = 'gloo'
    env_cfg['dist_cfg'] = dist_cfg
    wrapper_cfg = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper_cfg.setdefault('type', 'MMDistributedDataParallel')
    wrapper_cfg.setdefault('broadcast_buffers', False)
    wrapper_cfg.setdefault('find_unused_parameters',
                           cfg.get('find_unused_parameters', False))
    # A module on the CPU takes no device ids.
    wrapper_cfg['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper_cfg
    if torch_dist.is_initialized():
        return
    if launcher == 'slurm':
        _slurm_environment()
    init_args = {
        key: value
        for key, value in dist_cfg.items()
        if key not in ('backend', 'init_backend')
    }
    if 'timeout' in init_args:
        from datetime import timedelta
        init_args['timeout'] = timedelta(seconds=init_args['timeout'])
    torch_dist.init_process_group(backend='gloo', **init_args)


def set_local_rank(local_rank: int) -> None:
    """Export ``--local-rank`` for launchers that pass it as an argument."""
    os.environ.setdefault('LOCAL_RANK', str(local_rank))


def add_common_arguments(parser,
                         launchers: Sequence[str] = ('none', 'pytorch',
                                                     'slurm')):
    """Flags shared by ``tools/train.py`` and ``tools/test.py``."""
    from mmengine.config import DictAction
    parser.add_argument(
        '--work-dir', help='folder for logs, checkpoints and results')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, as key=value pairs (xxx.yyy=zzz); '
        'a list is written key="[a,b]" or key=a,b, nested tuples '
        'key="[(a,b),(c,d)]", with quotes and without spaces')
    parser.add_argument(
        '--launcher',
        choices=list(launchers),
        default='none',
        help='how the processes were started')
    # torch.distributed.launch passes --local-rank (PyTorch >= 2.0) or
    # --local_rank (older versions).
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)
    return parser
