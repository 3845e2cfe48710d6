"""Small helpers every part of the project uses: building objects from configs by dotted path."""

import importlib
from collections.abc import Mapping
from typing import Any


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Returns the object named by a dotted path, e.g. 'torch.nn.Linear' -> the Linear class."""
    module_name, attr = string.rsplit(".", 1)
    module = importlib.import_module(module_name)
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, attr)
    except AttributeError as e:
        raise ImportError(f"Module '{module_name}' has no attribute '{attr}' (from target '{string}')") from e


def instantiate_from_config(config: Mapping) -> Any:
    """Builds `config['target'](**config['params'])`; `params` is optional."""
    if "target" not in config:
        raise KeyError(f"Expected the key 'target' to instantiate an object, got keys {list(config)}")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))
