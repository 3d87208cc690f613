# Copyright (c) boat-mm contributors. All rights reserved.
"""Scripts of the repository (``tools/``, ``benchmarks/``) imported as
modules, so that tests call their functions in-process."""
import importlib.util
import os.path as osp
import re
from types import ModuleType
from typing import Optional

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_script(relpath: str, name: Optional[str] = None) -> ModuleType:
    """Import a script as a module, its ``__main__`` block aside.

    The module is not added to ``sys.modules``: each call executes the
    script again and returns a new module.

    Args:
        relpath (str): The script's path relative to :data:`REPO`, e.g.
            ``'tools/test.py'`` (an absolute path is taken as it is).
        name (str, optional): The module's ``__name__``; a test that loads
            one script twice gives each copy its own. Defaults to the path
            with its non-word characters as ``_``.

    Returns:
        ModuleType: The executed module.
    """
    if name is None:
        name = '_' + re.sub(r'\W', '_', relpath)
    spec = importlib.util.spec_from_file_location(name,
                                                  osp.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
