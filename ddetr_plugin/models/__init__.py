"""Model components; importing the subpackages registers them in the
``ddetr_plugin`` scope."""
from . import detectors, dense_heads, layers, necks, task_modules  # noqa: F401
