"""Model components; importing the subpackages registers them in the
``ddetr_plugin`` scope."""
from . import dense_heads, detectors, layers, necks, task_modules  # noqa: F401
