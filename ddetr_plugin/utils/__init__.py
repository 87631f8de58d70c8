from .checkpoint import (NotACheckpointError, UntrustedCheckpointError,
                         enable_safe_checkpoint_loading, load_checkpoint_file,
                         trust_checkpoint)

__all__ = [
    'NotACheckpointError', 'UntrustedCheckpointError',
    'enable_safe_checkpoint_loading', 'load_checkpoint_file',
    'trust_checkpoint'
]
