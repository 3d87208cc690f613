# Copyright (c) boat-mm contributors. All rights reserved.
"""Triton kernels of the FSLA ops (the ``'triton'`` backend).

The modules here import :mod:`triton` at their top, and nothing imports
them before the first ``impl='triton'`` call (see
:mod:`boat_mm.ops._backends`): ``import boat_mm`` works without Triton,
and ``triton.jit`` decides between compiled and interpreted kernels from
``TRITON_INTERPRET`` when these modules are first imported, so that
variable only has to be set before the first Triton call of a process.

- :mod:`.clustered_attention`: FSLA's attention inside clusters, forward
  and backward.
- :mod:`.clustering`: the balanced hierarchical clustering.
"""
