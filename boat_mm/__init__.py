# Copyright (c) boat-mm contributors. All rights reserved.
"""boat_mm: BOAT backbones for MMEngine, mmpretrain, mmsegmentation and
mmdetection.

Importing this package (as ``custom_imports=dict(imports=['boat_mm'])``
does) registers the models in MMEngine's root ``MODELS`` registry, lets
``torch.load(weights_only=True)`` read MMEngine checkpoints, and installs
three hooks that act only once their modules are imported: MMEngine's
checkpoint loader says "convert it first" of a published BOAT file,
mmpretrain's model hub learns the classifiers' names, and MMEngine's FLOP
counter learns FSLA's operators and SDPA.
The generators of synthetic data (:mod:`boat_mm.datasets`) are imported
where they are used; the tools' own code lives in ``tools/boat_tools``.
"""
from types import ModuleType

from .version import __version__, check_dependencies, version_info

# First: a missing or unsupported torch, mmengine or mmcv gets an error
# naming the supported range.
check_dependencies()

from . import model_index  # noqa: E402
from .model_index import register_model_index  # noqa: E402
from .utils import allow_mmengine_checkpoints  # noqa: E402
from .utils import install_checkpoint_hint, when_imported  # noqa: E402

allow_mmengine_checkpoints()
# A published BOAT file loaded as is gets "convert it first" from any
# MMEngine loader (see boat_mm.utils.published).
when_imported('mmengine.runner.checkpoint',
              lambda _: install_checkpoint_hint())
# The classifiers by name in mmpretrain's model hub, once it is imported
# (see boat_mm.model_index).
when_imported('mmpretrain.apis.model', model_index._register_on_import)

from . import models, ops, utils  # noqa: E402,F401  (registers)


def _register_flop_handles(module: ModuleType) -> None:
    """Add BOAT's FLOP handles to mmengine's defaults (``module``)."""
    from .analysis.flop_handles import register_default_handles
    register_default_handles(module)


# FSLA's ops and SDPA counted by mmengine's FLOP counter, as the upstream
# get_flops.py tools use it (see boat_mm.analysis.flop_handles). Last:
# the handles' module imports boat_mm.analysis, which needs the models.
when_imported('mmengine.analysis.complexity_analysis', _register_flop_handles)

__all__ = ['__version__', 'version_info', 'register_model_index']
