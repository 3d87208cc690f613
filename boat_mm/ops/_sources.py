# Copyright (c) boat-mm contributors. All rights reserved.
"""The digest of the C++ sources that ``boat_mm._C`` is built from.

``setup.py`` compiles it into the library and :mod:`boat_mm.ops._library`
compares it with the sources beside the package before loading the
library, so that a build older than its sources (a pull that changed them,
without a rebuild) is not run. Standard library only: ``setup.py`` runs
this file alone, before boat_mm can be imported.
"""
import hashlib
import os
import os.path as osp
from typing import Optional

# What precedes the digest in the library (boat_mm/ops/csrc/clustering.cpp).
MARKER = b'BOAT_MM_CSRC_SHA='


def sources_digest(folder: str) -> str:
    """SHA-256 of the names and bytes of the files in ``folder``.

    Args:
        folder (str): The C++ sources (``boat_mm/ops/csrc``).

    Returns:
        str: 64 hexadecimal digits.
    """
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = osp.join(folder, name)
        if osp.isfile(path):
            with open(path, 'rb') as f:
                digest.update(name.encode() + b'\0' + f.read() + b'\0')
    return digest.hexdigest()


def built_digest(library: str) -> Optional[str]:
    """The sources' digest compiled into a ``boat_mm._C`` file.

    Args:
        library (str): Path of the shared library.

    Returns:
        str | None: The digest, None for a library built without one.
    """
    with open(library, 'rb') as f:
        data = f.read()
    start = data.find(MARKER)
    if start < 0:
        return None
    start += len(MARKER)
    return data[start:start + 64].decode('ascii', 'replace')
