from .checkpoint import (UntrustedCheckpointError,
                         enable_safe_checkpoint_loading, load_checkpoint_file,
                         trust_checkpoint)

__all__ = [
    'UntrustedCheckpointError', 'enable_safe_checkpoint_loading',
    'load_checkpoint_file', 'trust_checkpoint'
]
