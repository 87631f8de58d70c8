"""A checkpoint hook whose files survive a kill at any instant.

MMEngine's ``CheckpointHook`` writes ``epoch_N.pth`` and ``last_checkpoint``
in place and deletes the oldest checkpoint (``max_keep_ckpts``) *before*
writing the new one. Killed in the middle, a run can therefore leave a
truncated checkpoint, a ``last_checkpoint`` naming it, or a
``last_checkpoint`` naming a file already deleted; ``--resume`` then fails.

:class:`AtomicCheckpointHook` keeps every option and the saved contents of
``CheckpointHook`` and changes only the order and manner of the writes on a
local disk:

1. the checkpoint is written under a temporary name in the same folder,
   flushed, and renamed to ``epoch_N.pth`` (or ``iter_N.pth``);
2. ``last_checkpoint`` is then replaced the same way, so it only ever names
   a complete file;
3. only then is the outdated checkpoint deleted.

The best checkpoint (``save_best``) is written the same way: the new best
is complete under its final name before the previous best is deleted.

Temporary files left by a killed run are deleted when training starts.
Checkpoints sent to remote storage (``backend_args``, URIs) go through
MMEngine's own code, as a remote put is the storage's business.

Configs ask for it by name (``type='AtomicCheckpointHook'``, as the
plugin's ``_base_/default_runtime.py`` does); ``CheckpointHook`` keeps naming
MMEngine's hook in every scope, so nothing changes behind a user's back.
"""
import difflib
import inspect
import os.path as osp
from typing import Optional

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook

from ..registry import HOOKS
from .atomic_io import (atomic_write_text, commit, remove_leftovers,
                        temporary_path)

# Arguments whose type a typo in a config or --cfg-options gets wrong; the
# others (save_best, rule, out_dir...) are checked by CheckpointHook itself.
_INT_ARGUMENTS = ('interval', 'max_keep_ckpts', 'save_begin')
_BOOL_ARGUMENTS = ('by_epoch', 'save_optimizer', 'save_param_scheduler',
                   'save_last')


def check_arguments(arguments: dict, extra: dict) -> None:
    """Refuse arguments ``CheckpointHook`` would only trip over at its
    first save, after a whole epoch of training.

    Args:
        arguments (dict): The named arguments of ``CheckpointHook``.
        extra (dict): Any other keyword arguments. ``CheckpointHook`` keeps
            them for ``Runner.save_checkpoint``, which takes none beyond
            those the hook passes itself.

    Raises:
        TypeError: Naming the argument, the type expected and what came,
            or the unknown arguments with the closest known names.
    """
    if extra:
        known = sorted(arguments)
        hints = []
        for name in sorted(extra):
            close = difflib.get_close_matches(name, known, n=1)
            hints.append(f'{name!r}' +
                         (f' (did you mean {close[0]!r}?)' if close else ''))
        raise TypeError(
            'AtomicCheckpointHook (default_hooks.checkpoint) got unknown '
            f'arguments {", ".join(hints)}; it takes {known}.')
    for name in _INT_ARGUMENTS:
        value = arguments[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f'default_hooks.checkpoint.{name} must be an int, got '
                f'{value!r} ({type(value).__name__}).')
    for name in _BOOL_ARGUMENTS:
        value = arguments[name]
        if not isinstance(value, bool):
            raise TypeError(
                f'default_hooks.checkpoint.{name} must be True or False, '
                f'got {value!r} ({type(value).__name__}).')


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` with atomic checkpoint and ``last_checkpoint``
    writes. Takes the same arguments as MMEngine's ``CheckpointHook``,
    checked when the hook is built rather than at its first save."""

    def __init__(self, *args, **kwargs) -> None:
        bound = inspect.signature(CheckpointHook.__init__).bind(
            self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop('self')
        check_arguments(arguments, arguments.pop('kwargs'))
        super().__init__(*args, **kwargs)

    def _writes_locally(self) -> bool:
        return (self.file_client_args is None
                and isinstance(self.file_backend, LocalBackend))

    def before_train(self, runner) -> None:
        """Set up as ``CheckpointHook`` does, then delete the temporary
        files of runs killed while saving."""
        super().before_train(runner)
        if self._writes_locally() and is_main_process():
            for folder in {self.out_dir, runner.work_dir}:
                for path in remove_leftovers(folder):
                    runner.logger.warning(
                        f'Deleted {path}, an unfinished checkpoint write of '
                        'an earlier, interrupted run.')

    def _advance_kept_steps(self, runner, step: int) -> Optional[int]:
        """Record ``step`` among the kept checkpoints.

        Returns:
            int, optional: The step whose checkpoint is now outdated and must
            be deleted once the new one is safely on the disk.
        """
        if self.max_keep_ckpts <= 0:
            return None
        # An epoch can save the same step twice (latest and best).
        if self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step:
            return None
        outdated = None
        if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
            outdated = self.keep_ckpt_ids.popleft()
        self.keep_ckpt_ids.append(step)
        # The message hub is saved inside the checkpoint, so that a resumed
        # run knows which files it may delete.
        runner.message_hub.update_info('keep_ckpt_ids',
                                       list(self.keep_ckpt_ids))
        return outdated

    def _remove_checkpoint(self, step: int) -> None:
        self._remove_path(
            self.file_backend.join_path(self.out_dir,
                                        self.filename_tmpl.format(step)))

    def _save_checkpoint_with_step(self, runner, step, meta):
        if not self._writes_locally():
            super()._save_checkpoint_with_step(runner, step, meta)
            return
        outdated = self._advance_kept_steps(runner, step)
        filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)

        temporary = temporary_path(self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir,
            osp.basename(temporary),
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args)
        # Only the main process writes checkpoints (Runner.save_checkpoint
        # is master-only).
        if not is_main_process():
            return
        commit(temporary, self.last_ckpt)
        atomic_write_text(
            osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt)
        if outdated is not None:
            self._remove_checkpoint(outdated)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        """Save a checkpoint for every key indicator that improved.

        Same names, scores, message-hub entries and log lines as
        ``CheckpointHook``, which deletes the previous best before writing
        the new one; here the new best is committed first.
        """
        if not self.save_best or not self._writes_locally():
            super()._save_best_checkpoint(runner, metrics)
            return
        step = runner.epoch if self.by_epoch else runner.iter
        step_kind = 'epoch' if self.by_epoch else 'iter'
        meta = dict(epoch=runner.epoch, iter=runner.iter)
        if 'auto' in self.key_indicators:
            self._init_rule(self.rules, [next(iter(metrics))])
        single = len(self.key_indicators) == 1
        improved = False
        for indicator, rule in zip(self.key_indicators, self.rules):
            score = metrics[indicator]
            score_key = 'best_score' if single else f'best_score_{indicator}'
            best_score = runner.message_hub.runtime_info.get(
                score_key, self.init_value_map[rule])
            if score is None or not self.is_better_than[indicator](score,
                                                                   best_score):
                continue
            improved = True
            runner.message_hub.update_info(score_key, score)
            previous = self._best_path(indicator)
            name = f'best_{indicator}_{self.filename_tmpl.format(step)}'
            # A metric name such as coco/bbox_mAP is not a file name.
            path = self.file_backend.join_path(self.out_dir,
                                               name.replace('/', '_'))
            self._set_best_path(runner, indicator, path)
            temporary = temporary_path(path)
            runner.save_checkpoint(
                self.out_dir,
                filename=osp.basename(temporary),
                save_optimizer=False,
                save_param_scheduler=False,
                meta=meta,
                by_epoch=False,
                backend_args=self.backend_args)
            if is_main_process():
                commit(temporary, path)
                if previous and previous != path:
                    self._remove_path(previous)
                    runner.logger.info(
                        f'The previous best checkpoint {previous} is removed')
            runner.logger.info(
                f'The best checkpoint with {score:0.4f} {indicator} at '
                f'{step} {step_kind} is saved to {osp.basename(path)}.')
        # The latest checkpoint, written before validation, holds the old
        # best in its message hub; rewrite it so that a resumed run knows
        # (and may later delete) the new best.
        if improved and self.last_ckpt is not None:
            self._save_checkpoint_with_step(runner, step, meta)

    def _best_path(self, indicator: str) -> Optional[str]:
        if len(self.key_indicators) == 1:
            return self.best_ckpt_path
        return self.best_ckpt_path_dict.get(indicator)

    def _set_best_path(self, runner, indicator: str, path: str) -> None:
        if len(self.key_indicators) == 1:
            self.best_ckpt_path = path
            runner.message_hub.update_info('best_ckpt', path)
        else:
            self.best_ckpt_path_dict[indicator] = path
            runner.message_hub.update_info(f'best_ckpt_{indicator}', path)

    def _remove_path(self, path: str) -> None:
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):  # e.g. a DeepSpeed checkpoint
            self.file_backend.rmtree(path)
