from .checkpoint import (NotACheckpointError, UntrustedCheckpointError,
                         enable_safe_checkpoint_loading, load_checkpoint_file,
                         trust_checkpoint)
from .torchvision_weights import (PretrainedDownloadError,
                                  torchvision_model_urls)

__all__ = [
    'NotACheckpointError', 'PretrainedDownloadError',
    'UntrustedCheckpointError', 'torchvision_model_urls',
    'enable_safe_checkpoint_loading', 'load_checkpoint_file',
    'trust_checkpoint'
]
