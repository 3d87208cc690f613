# Copyright (c) boat-mm contributors. All rights reserved.
"""Code shared by the command-line tools of boat-mm; not installed.

The tools reach it with one line before their imports::

    sys.path.insert(0, TOOLS_DIR)  # the folder holding boat_tools/

Kept out of the ``boat_mm`` package (as mmsegmentation keeps such code in
``tools/``) because it has effects a library must not have: the manner
every tool shares, one-line user errors with exit status 2 and the common
arguments (:mod:`.cli`), argparse and runner set-up (:mod:`.config`), the
loader of the public BOAT code that edits ``sys.path``
(:mod:`.reference`), mmpretrain's visualization hook made to draw in
RGB and test-time augmented batches (:mod:`.visualization`), mmseg's
given the ``test_out_dir`` of mmdet's (:mod:`.seg_visualization`), mmseg's and
mmdet's made to count ``--interval`` in samples as mmpretrain's
(:mod:`.seg_visualization`, :mod:`.det_visualization`), what
``tools/train.py`` checks of a run before it trains (:mod:`.schedule`,
:mod:`.resume`, :mod:`.hooks`), and the warning filters below. What
tools, tests and benchmarks share is in the package: FLOP counting in
``boat_mm.analysis.complexity``, ONNX export in
``boat_mm.deploy``, cluster capture in ``boat_mm.analysis``, metafile
reading in ``boat_mm.utils.metafile``.

Importing this package silences what the tools would otherwise print on
every run although the user can do nothing about it: the ``pkg_resources``
deprecation warning that mmengine's ``is_installed`` triggers (four times
per run: one import, three reloads), and torch's note that ``pin_memory``
is ignored without an accelerator (mmpretrain's tool defaults pin memory).
Only these exact messages from these modules are filtered; it must be
imported before mmengine. MMEngine's own logger warnings about its
internal use of ``FileClient`` are filtered on the runner's logger, see
:func:`.config.build_runner`.
"""
import warnings

__all__ = ['silence_upstream_warnings']

# (message regex, module regex of the code that warns) of the warnings the
# user cannot act on. The module is that of the frame the warning names
# (``stacklevel``): mmengine imports pkg_resources, then reloads it with
# importlib.
UPSTREAM_WARNINGS = (
    (r'pkg_resources is deprecated as an API',
     r'(mmengine\.utils\.package_utils|importlib)$'),
    (r"'pin_memory' argument is set as true but no accelerator is found",
     r'torch\.utils\.data\.dataloader$'),
)


def silence_upstream_warnings() -> None:
    """Ignore the warnings of :data:`UPSTREAM_WARNINGS` (idempotent)."""
    for message, module in UPSTREAM_WARNINGS:
        warnings.filterwarnings(
            'ignore', message=message, category=UserWarning, module=module)


silence_upstream_warnings()
