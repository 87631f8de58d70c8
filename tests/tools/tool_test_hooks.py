"""Hooks that let tests look inside, pause or break a training process.

Not a test module: the end-to-end tests put this folder on ``PYTHONPATH``
and name the module in ``custom_imports`` of the configs they train.

* :class:`StateDumpHook` saves, before training (after MMEngine resumed, if
  it did), the epoch and iteration counters, optimizer and scheduler states
  and the weights into ``WORK_DIR/state_before_train_rank<R>.pth``; after
  training, world size, backend and parameters into
  ``WORK_DIR/state_after_train_rank<R>.pth``.
* :class:`PauseHook` and :class:`InterruptSaveHook` stop a run at a point
  a test chooses through environment variables, and do nothing otherwise.
"""
import io
import os
import os.path as osp
import time

import torch
import torch.distributed as torch_dist
from mmengine.dist import get_dist_info
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ddetr_plugin.registry import HOOKS


def _model(runner):
    model = runner.model
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class StateDumpHook(Hook):
    """Dump the training state before and after training."""

    priority = 'LOWEST'

    def _path(self, runner, stage):
        rank, _ = get_dist_info()
        return osp.join(runner.work_dir, f'state_{stage}_rank{rank}.pth')

    def before_train(self, runner):
        torch.save(
            dict(
                epoch=runner.epoch,
                iter=runner.iter,
                optimizer=runner.optim_wrapper.state_dict(),
                param_schedulers=[
                    scheduler.state_dict()
                    for scheduler in runner.param_schedulers
                ],
                state_dict=_model(runner).state_dict()),
            self._path(runner, 'before_train'))

    def after_train(self, runner):
        _, world_size = get_dist_info()
        backend = (
            torch_dist.get_backend() if torch_dist.is_initialized() else None)
        torch.save(
            dict(
                world_size=world_size,
                backend=backend,
                parameters={
                    name: parameter.detach().clone()
                    for name, parameter in _model(runner).named_parameters()
                }), self._path(runner, 'after_train'))


@HOOKS.register_module()
class PauseHook(Hook):
    """Stop making progress at an iteration, so a test can kill the process
    at a known point. The iteration comes from the environment variable
    ``PAUSE_AT_ITER`` (no pause when unset); ``WORK_DIR/paused`` tells the
    test that the pause began."""

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        pause_at = os.environ.get('PAUSE_AT_ITER')
        if pause_at is not None and runner.iter + 1 == int(pause_at):
            with open(osp.join(runner.work_dir, 'paused'), 'w') as file:
                file.write(str(runner.iter + 1))
            time.sleep(600)


@HOOKS.register_module()
class InterruptSaveHook(Hook):
    """Kill the process in the middle of writing a checkpoint.

    At the end of the epoch named by ``INTERRUPT_SAVE_AT_EPOCH``, the next
    checkpoint write stores only half of its bytes and the process exits
    with status 3 right there, as a power cut or SIGKILL would stop it.
    Runs before the checkpoint hook (higher priority).
    """

    priority = 'HIGHEST'

    def after_train_epoch(self, runner):
        at_epoch = os.environ.get('INTERRUPT_SAVE_AT_EPOCH')
        if at_epoch is None or runner.epoch + 1 != int(at_epoch):
            return
        import mmengine.runner.runner as runner_module

        def write_half_and_die(checkpoint, filename, *args, **kwargs):
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            content = buffer.getvalue()
            with open(filename, 'wb') as file:
                file.write(content[:len(content) // 2])
                file.flush()
                os.fsync(file.fileno())
            os._exit(3)

        runner_module.save_checkpoint = write_half_and_die
