# Copyright (c) boat-mm contributors. All rights reserved.
"""Every option of every tool appears in a test.

A static guard beside the effect tests (``test_tool_options.py``,
``test_runner_tool_options.py`` and the tools' own tests): each long option
a tool's parser declares (``--help`` and hidden options aside) must be
named in some test file other than this one, so a new option cannot land
untested unnoticed.
"""
import argparse
import functools
import glob
import os.path as osp
import re

import pytest
from repo_scripts import REPO, load_script

TOOLS = sorted(
    osp.relpath(p, REPO)
    for p in glob.glob(osp.join(REPO, 'tools', '**', '*.py'), recursive=True)
    if 'def parse_args(' in open(p).read())


class _Parsed(Exception):
    """Raised instead of parsing: carries the parser."""


def options_of(path: str, monkeypatch) -> list:
    """The long options of the parser that ``path``'s ``parse_args``
    builds, without parsing anything."""
    module = load_script(path)

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, 'parse_known_args', capture)
    with pytest.raises(_Parsed) as info:
        module.parse_args([])
    parser = info.value.args[0]
    return sorted(
        option for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        and action.help != argparse.SUPPRESS
        for option in action.option_strings if option.startswith('--'))


@functools.lru_cache(maxsize=None)
def _test_texts() -> str:
    here = osp.abspath(__file__)
    return '\n'.join(
        open(p).read() for p in glob.glob(
            osp.join(REPO, 'tests', '**', '*.py'), recursive=True)
        if osp.abspath(p) != here)


def test_the_tools_are_found():
    # The glob must see the tools a user runs.
    for tool in ('tools/train.py', 'tools/test.py',
                 'tools/model_converters/boat2mm.py',
                 'tools/analysis_tools/attention_recall.py'):
        assert tool in TOOLS


@pytest.mark.parametrize('path', TOOLS)
def test_every_option_is_named_in_a_test(path, monkeypatch):
    options = options_of(path, monkeypatch)
    assert options, f'{path}: no options found; is parse_args() its parser?'
    texts = _test_texts()
    missing = [
        o for o in options
        if not re.search(r'(?<![\w-])' + re.escape(o) + r'(?![\w-])', texts)
    ]
    assert not missing, f'{path}: options no test names: {missing}'
