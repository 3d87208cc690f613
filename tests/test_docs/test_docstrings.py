# Copyright (c) boat-mm contributors. All rights reserved.
"""Every public callable of ``boat_mm`` documents its arguments.

Read from the source with ``ast`` (nothing is imported): each public
function and method (no leading underscore; dunders aside) has a
docstring whose Google-style ``Args:`` names every argument, and names no
argument that does not exist. A class documents its ``__init__``
arguments in its own docstring, as mmpretrain does; ``forward`` may
document its arguments there or in its own docstring.
"""
import ast
import glob
import os.path as osp
import re
from typing import Dict, List, Optional, Set

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
FILES = sorted(
    osp.relpath(p, REPO) for p in glob.glob(
        osp.join(REPO, 'boat_mm', '**', '*.py'), recursive=True))
_ENTRY = re.compile(r'\*{0,2}([A-Za-z_]\w*)\s*(\([^)]*\))?\s*:')


def _args_section(doc: Optional[str]) -> Optional[Set[str]]:
    """Names of the ``Args:`` entries of ``doc``; None without one."""
    lines = (doc or '').expandtabs().splitlines()
    for i, line in enumerate(lines):
        if line.strip() != 'Args:':
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            if nxt.strip():
                body.append(nxt)
        if not body:
            return set()
        first = min(len(b) - len(b.lstrip()) for b in body)
        return {
            m.group(1)
            for m in (_ENTRY.match(b.strip()) for b in body
                      if len(b) - len(b.lstrip()) == first) if m
        }
    return None


def _arguments(fn: ast.FunctionDef) -> List[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return [n for n in names if n not in ('self', 'cls')]


def _problems(where: str, fn: ast.FunctionDef,
              extra_doc: Set[str]) -> List[str]:
    """What the docstring of ``fn`` lacks or names wrongly."""
    doc = ast.get_docstring(fn)
    if doc is None:
        return [f'{where}: no docstring']
    args = _arguments(fn)
    entries = _args_section(doc)
    out = []
    missing = [a for a in args if a not in (entries or set()) | extra_doc]
    if missing:
        out.append(f'{where}: Args lacks {missing}')
    stale = sorted((entries or set()) - set(args))
    if stale:
        out.append(f'{where}: Args names no argument {stale}')
    return out


def _file_problems(path: str) -> List[str]:
    with open(osp.join(REPO, path)) as f:
        tree = ast.parse(f.read())
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name[0] != '_':
            out += _problems(f'{path}:{node.name}', node, set())
        if not isinstance(node, ast.ClassDef) or node.name[0] == '_':
            continue
        where = f'{path}:{node.name}'
        methods: Dict[str, ast.FunctionDef] = {
            m.name: m
            for m in node.body if isinstance(m, ast.FunctionDef)
        }
        doc = ast.get_docstring(node)
        if doc is None:
            out.append(f'{where}: no docstring')
        documented = _args_section(doc) or set()
        init = methods.get('__init__')
        if init is not None:
            missing = [a for a in _arguments(init) if a not in documented]
            if missing:
                out.append(f'{where}: Args lacks {missing}')
            allowed = set(_arguments(init))
            if 'forward' in methods:
                allowed |= set(_arguments(methods['forward']))
            stale = sorted(documented - allowed)
            if stale:
                out.append(f'{where}: Args names no argument {stale}')
        for name, method in methods.items():
            if name[0] == '_':
                continue
            extra = documented if name == 'forward' else set()
            out += _problems(f'{where}.{name}', method, extra)
    return out


@pytest.mark.parametrize('path', FILES)
def test_public_callables_document_their_arguments(path):
    assert _file_problems(path) == []


def test_the_check_finds_what_it_should():
    """An undocumented, a half-documented and a stale function."""
    tree = ast.parse('''
def a(x): pass
def b(x, y):
    """B.

    Args:
        x (int): X.
    """
def c(x):
    """C.

    Args:
        x (int): X.
        z (int): Gone.
    """
''')
    fns = {f.name: f for f in tree.body}
    assert _problems('a', fns['a'], set()) == ['a: no docstring']
    assert _problems('b', fns['b'], set()) == ["b: Args lacks ['y']"]
    assert _problems('c', fns['c'],
                     set()) == ["c: Args names no argument ['z']"]
