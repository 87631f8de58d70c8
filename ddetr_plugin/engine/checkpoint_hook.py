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

Temporary files left by a killed run are deleted when training starts.
Checkpoints sent to remote storage (``backend_args``, URIs) go through
MMEngine's own code, as a remote put is the storage's business.

Configs ask for it by name (``type='AtomicCheckpointHook'``, as the
plugin's ``_base_/default_runtime.py`` does); ``CheckpointHook`` keeps naming
MMEngine's hook in every scope, so nothing changes behind a user's back.
"""
import os.path as osp
from typing import Optional

from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook

from ..registry import HOOKS
from .atomic_io import (atomic_write_text, commit, remove_leftovers,
                        temporary_path)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` with atomic checkpoint and ``last_checkpoint``
    writes. Takes the same arguments as MMEngine's ``CheckpointHook``."""

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
        path = self.file_backend.join_path(self.out_dir,
                                           self.filename_tmpl.format(step))
        if self.file_backend.isfile(path):
            self.file_backend.remove(path)
        elif self.file_backend.isdir(path):  # e.g. a DeepSpeed checkpoint
            self.file_backend.rmtree(path)

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
