# Copyright (c) boat-mm contributors. All rights reserved.
"""The ops import one way: ``_sources`` <- ``_library`` <- ``_backends``
<- the public functions (``clustering``, ``clustered_attn``), the kernels
of ``triton/`` beside ``_library``. Read from the source (every import
statement, those inside functions included), not from a run, so that a
lazy import back up is caught too."""
import ast
import os.path as osp
from typing import Set

import pytest

OPS = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'boat_mm',
    'ops')

# Module of boat_mm.ops -> the modules of boat_mm it may import.
ALLOWED = {
    # Standard library only: setup.py runs it alone.
    '_sources': set(),
    '_library': {'boat_mm._C', 'boat_mm.ops._sources'},
    '_backends': {'boat_mm.ops._library'},
    'clustering': {'boat_mm.ops._library', 'boat_mm.ops._backends'},
    'clustered_attn': {
        'boat_mm.ops._library', 'boat_mm.ops._backends',
        'boat_mm.ops.clustering'
    },
    'triton/clustering': {'boat_mm.ops._library'},
    'triton/clustered_attention': {'boat_mm.ops._library'},
}


def boat_imports(rel: str) -> Set[str]:
    """The ``boat_mm`` modules that ``boat_mm/ops/<rel>.py`` imports,
    absolute, wherever the import statement is."""
    path = osp.join(OPS, rel + '.py')
    package = ('boat_mm.ops.' + rel.replace('/', '.')).rsplit('.', 1)[0]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split('.')
            if node.level:
                base = base[:len(base) - node.level + 1]
                module = '.'.join(base +
                                  ([node.module] if node.module else []))
            else:
                module = node.module
            # 'from . import x' imports the module x.
            names = [module] if node.module else [
                f'{module}.{alias.name}' for alias in node.names
            ]
        else:
            continue
        found.update(n for n in names if n.split('.')[0] == 'boat_mm')
    return found


def test_every_ops_module_is_listed():
    import glob
    files = glob.glob(osp.join(OPS, '*.py')) + glob.glob(
        osp.join(OPS, 'triton', '*.py'))
    rels = {
        osp.relpath(f, OPS)[:-3]
        for f in files if not f.endswith('__init__.py')
    }
    assert rels == set(ALLOWED)


@pytest.mark.parametrize('rel', sorted(ALLOWED))
def test_imports_point_down(rel):
    imported = boat_imports(rel)
    assert imported <= ALLOWED[rel], (
        f'boat_mm/ops/{rel}.py imports {sorted(imported - ALLOWED[rel])}, '
        f'above it in the layers')


def test_the_parser_sees_lazy_imports(tmp_path, monkeypatch):
    """A function-level relative import back up is found (the check above
    cannot pass by not looking)."""
    src = osp.join(OPS, '_library.py')
    with open(src) as f:
        text = f.read()
    text += '\n\ndef _late():\n    from .clustering import ClusterPlan\n'
    fake = tmp_path / 'ops'
    fake.mkdir()
    (fake / '_library.py').write_text(text)
    monkeypatch.setitem(globals(), 'OPS', str(fake))
    assert 'boat_mm.ops.clustering' in boat_imports('_library')
