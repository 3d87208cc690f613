# Copyright (c) boat-mm contributors. All rights reserved.
"""The README's, docs/'s and the config READMEs' links and paths resolve.

* Relative Markdown links (``[text](path)``, ``[text](path#anchor)``,
  ``[text](#anchor)``) name a file or folder of the repository, and an
  anchor names a heading of the linked Markdown file (GitHub's rule:
  lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``).
* Repository paths in code spans (``boat_mm/...``, ``tools/...``,
  ``configs/...``, ``docs/...``, ``tests/...``, ``benchmarks/...``,
  ``requirements/...``) exist, unless they hold a pattern (``{a,b}``,
  ``*``, an upper-case placeholder such as ``DIR``).
* Test node ids (``tests/...py::test_name``) name a test of that file.
* Dotted names ``boat_mm.x.y`` in code spans are modules or attributes.
"""
import glob
import importlib
import os.path as osp
import re
from typing import List, Set, Tuple

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DOCS = ['README.md'] + sorted(
    osp.relpath(p, REPO) for p in glob.glob(osp.join(REPO, 'docs', '*.md')) +
    glob.glob(osp.join(REPO, 'configs', '*', 'README.md')))
_FENCE = re.compile(r'^```.*?^```', re.S | re.M)
_TOP = ('boat_mm/', 'tools/', 'configs/', 'docs/', 'tests/', 'benchmarks/',
        'requirements/')


def _prose(doc: str) -> str:
    """The doc without its fenced blocks (line numbers kept)."""
    with open(osp.join(REPO, doc), encoding='utf-8') as f:
        text = f.read()
    return _FENCE.sub(lambda m: '\n' * m.group(0).count('\n'), text)


def _anchors(doc: str) -> Set[str]:
    out = set()
    for m in re.finditer(r'^#{1,6}\s+(.+?)\s*$', _prose(doc), re.M):
        title = re.sub(r'[^\w\- ]', '', m.group(1).lower())
        out.add(title.replace(' ', '-'))
    return out


def _links(doc: str) -> List[Tuple[int, str]]:
    text = _prose(doc)
    return [(text.count('\n', 0, m.start()) + 1, m.group(1))
            for m in re.finditer(r'\]\(([^)\s]+)\)', text)
            if not re.match(r'^[a-z]+:', m.group(1))]


def test_the_docs_have_links():
    """The extraction finds what the docs hold (guards the regexes)."""
    links = [link for doc in DOCS for _, link in _links(doc)]
    assert any('#' in link for link in links)
    assert any(link.endswith('.py') for link in links)
    assert 'installing-on-a-gpu-machine' in _anchors('docs/get_started.md')


@pytest.mark.parametrize('doc', DOCS)
def test_relative_links_resolve(doc):
    wrong = []
    for line, link in _links(doc):
        path, _, anchor = link.partition('#')
        target = osp.normpath(osp.join(osp.dirname(doc), path)) if path \
            else doc
        if not osp.exists(osp.join(REPO, target)):
            wrong.append(f'{doc}:{line}: {link}: no {target}')
        elif anchor and target.endswith('.md') and \
                anchor not in _anchors(target):
            wrong.append(f'{doc}:{line}: {link}: no heading #{anchor} in '
                         f'{target}')
    assert not wrong, '\n'.join(wrong)


@pytest.mark.parametrize('doc', DOCS)
def test_repository_paths_exist(doc):
    text = _prose(doc)
    wrong = []
    for m in re.finditer(r'`([^`\n]+)`', text):
        for word in m.group(1).split():
            word = word.strip('(),;:\'"').rstrip('.')
            if not word.startswith(_TOP) or re.search(r'[{*<]', word) or any(
                    part.isupper() for part in word.split('/')):
                continue
            word = word.split('::')[0]  # a test's node id
            if not osp.exists(osp.join(REPO, word)):
                line = text.count('\n', 0, m.start()) + 1
                wrong.append(f'{doc}:{line}: {word}')
    assert not wrong, '\n'.join(wrong)


@pytest.mark.parametrize('doc', DOCS)
def test_test_node_ids_exist(doc):
    """``tests/...py::test_name[...]`` in a doc names a test function of
    that file (docs/test_mutations.md names the test each bug fails)."""
    wrong = []
    text = _prose(doc)
    for m in re.finditer(r'`(tests/[\w/]+\.py)::(\w+)', text):
        path, func = m.groups()
        full = osp.join(REPO, path)
        if not osp.isfile(full):
            wrong.append(f'{path}::{func}: no {path}')
            continue
        with open(full, encoding='utf-8') as f:
            if not re.search(rf'^def {func}\(', f.read(), re.M):
                wrong.append(f'{path}::{func}: no such test')
    assert not wrong, f'{doc}: ' + '\n'.join(wrong)


def _resolve(name: str) -> bool:
    """Whether a dotted ``boat_mm...`` name is a module or an attribute."""
    parts = name.split('.')
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize('doc', DOCS)
def test_boat_mm_names_resolve(doc):
    """``boat_mm.x.y`` (or ``boat_mm.x.y()``) in a code span is a module,
    class or function of the package."""
    text = _prose(doc)
    names = re.findall(r'`(boat_mm(?:\.\w+)+)(?:\(\))?`', text)
    wrong = sorted({n for n in names if not _resolve(n)})
    assert not wrong, f'{doc}: {wrong}'
