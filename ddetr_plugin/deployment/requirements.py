"""The optional packages of deployment, imported only when needed.

``import ddetr_plugin`` never needs ONNX: the export and runtime modules ask
for their packages here, and a missing one raises an error that says how to
install the pinned set.
"""
import importlib
from types import ModuleType

INSTALL_COMMAND = ('pip install -c requirements/constraints.txt '
                   '-r requirements/deploy.txt')


def require(module_name: str, purpose: str) -> ModuleType:
    """Import an optional package or say how to install it.

    Args:
        module_name (str): ``'onnx'``, ``'onnxruntime'`` or ``'onnxscript'``
            (their pip names are the same).
        purpose (str): What needs it, for the message.

    Returns:
        ModuleType: The imported module.

    Raises:
        ImportError: The package is missing; the message gives the command.
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f'{purpose} needs the Python package {module_name!r}, which is '
            f'not installed ({error}). Install the pinned deployment '
            f'packages from the checkout: {INSTALL_COMMAND}') from error
