# Copyright (c) boat-mm contributors. All rights reserved.
"""The tools' check that a config's datasets point to data
(``check_data_roots``), through the dataset wrappers that mmdet and mmseg
configs use (RepeatDataset, ConcatDataset), which no other test gave."""
import os

import pytest
from boat_tools.config import check_data_roots
from mmengine.config import Config


def _cfg(dataset: dict) -> Config:
    return Config(
        dict(default_scope='mmseg', train_dataloader=dict(dataset=dataset)))


@pytest.fixture
def roots(tmp_path):
    full = tmp_path / 'full'
    (full / 'images').mkdir(parents=True)
    (full / 'images' / 'a.jpg').write_bytes(b'')
    (full / 'ann.json').write_text('{}')
    (tmp_path / 'empty').mkdir()
    return str(full), str(tmp_path / 'empty'), str(tmp_path / 'missing')


def test_wrapped_datasets_are_checked(roots):
    full, empty, missing = roots
    good = dict(data_root=full, data_prefix='images', ann_file='ann.json')
    check_data_roots(_cfg(dict(type='RepeatDataset', times=2, dataset=good)))
    check_data_roots(_cfg(dict(type='ConcatDataset', datasets=[good, good])))
    # The real dataset under two wrappers, then one of a concatenation.
    nested = dict(
        type='RepeatDataset',
        dataset=dict(
            type='ClassBalancedDataset', dataset=dict(data_root=missing)))
    with pytest.raises(
            FileNotFoundError,
            match=f'train_dataloader.dataset.data_root = '
            f'{missing!r} does not exist'):
        check_data_roots(_cfg(nested))
    concat = dict(
        type='ConcatDataset',
        datasets=[good,
                  dict(data_root=full, data_prefix=dict(img=empty))])
    with pytest.raises(
            FileNotFoundError,
            match=f'data_prefix.img = {empty!r} is an empty '
            f'folder'):
        check_data_roots(_cfg(concat))
    with pytest.raises(FileNotFoundError, match='ann_file = .*nope.json'):
        check_data_roots(_cfg(dict(good, ann_file='nope.json')))
    # Remote paths are not checked; absolute prefixes stay absolute.
    check_data_roots(_cfg(dict(data_root='s3://bucket/ade')))
    check_data_roots(
        _cfg(dict(data_root=full, data_prefix=os.path.join(full, 'images'))))
