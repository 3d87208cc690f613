# Copyright (c) boat-mm contributors. All rights reserved.
"""configs/*/metafile.yml, the one home of the models' params, FLOPs and
published numbers, against the configs and the README tables."""
import glob
import os.path as osp
import re
from typing import Dict, List

import pytest

from boat_mm.utils.metafile import load_models

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
READMES = sorted(glob.glob(osp.join(ROOT, 'configs', 'boat_*', 'README.md')))

# README column -> metric of the metafile's Results.
PAPER_COLUMNS = {
    'Top-1 (%), paper': 'Top 1 Accuracy',
    'mIoU, paper': 'mIoU',
    'box AP, paper': 'box AP',
    'mask AP, paper': 'mask AP',
}


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip('|').split('|')]


def _table_rows(path: str) -> List[Dict[str, str]]:
    """The rows of every Markdown table of ``path`` that links a config,
    as ``{column: cell}`` plus ``config`` (relative to the repo root)."""
    rows, header = [], None
    folder = osp.relpath(osp.dirname(path), ROOT)
    with open(path) as f:
        for line in f:
            if not line.startswith('|'):
                header = None
                continue
            cells = _cells(line)
            if header is None:
                header = cells
            elif not set(line) <= set('|:- \n'):
                row = dict(zip(header, cells))
                link = re.search(r'\[config\]\(([^)]+\.py)\)', line)
                if link:
                    row['config'] = osp.join(folder, link.group(1))
                    rows.append(row)
    return rows


def test_every_config_has_one_model():
    models = load_models(ROOT)
    configs = [m.config for m in models]
    assert len(configs) == len(set(configs))
    shipped = sorted(
        osp.relpath(p, ROOT)
        for p in glob.glob(osp.join(ROOT, 'configs', 'boat_*', '*.py')))
    assert sorted(configs) == shipped
    for m in models:
        assert m.name == osp.splitext(osp.basename(m.config))[0]
        assert m.params > 0 and m.flops > 0


@pytest.mark.parametrize(
    'readme', READMES, ids=lambda p: osp.basename(osp.dirname(p)))
def test_readme_tables_match_metafile(readme):
    models = {m.config: m for m in load_models(ROOT)}
    rows = _table_rows(readme)
    folder = osp.relpath(osp.dirname(readme), ROOT)
    assert {r['config']
            for r in rows
            } == {c
                  for c in models if c.startswith(folder + '/')}
    for row in rows:
        model = models[row['config']]
        where = f'{readme}, row of {row["config"]}'
        assert row['Params (M)'] == f'{model.params / 1e6:.2f}', where
        flops = row['FLOPs (G)']
        decimals = len(flops.partition('.')[2])
        assert flops == f'{model.flops / 1e9:.{decimals}f}', where
        for column, metric in PAPER_COLUMNS.items():
            if column in row:
                value = model.metrics.get(metric)
                if row[column] == 'n/a':  # the method has no such metric
                    assert value is None, where
                else:
                    assert row[column] == ('-' if value is None else
                                           str(value)), where
        if row.get('Model', '').startswith('`'):
            # The name mmpretrain's get_model takes, as upstream tables.
            assert row['Model'] == f'`{model.name}`', where
        link = re.search(r'\[published\]\(([^)]+)\)', row.get('Download', ''))
        assert (link.group(1) if link else None) == model.published_weights, \
            where


# The kind of model (by the OpenMMLab config name, which the metafile's
# Name repeats) -> the Tasks of its Results, as mmpretrain, mmseg and mmdet
# declare them (mmpretrain's inference_model picks the inferencer by the
# Task).
TASKS = {
    r'^boat-.*_in1k(-\d+px)?$': ['Image Classification'],
    r'^boat-.*_upernet_.*_ade20k-': ['Semantic Segmentation'],
    r'^mask-rcnn_': ['Object Detection', 'Instance Segmentation'],
    r'^retinanet_': ['Object Detection'],
    # Pre-training, as mmpretrain's SimMIM metafile: no Results.
    r'^simmim_': [],
}
DATASETS = {
    'Image Classification': 'ImageNet-1k',
    'Semantic Segmentation': 'ADE20K',
    'Object Detection': 'COCO',
    'Instance Segmentation': 'COCO',
}


@pytest.mark.parametrize(
    'metafile',
    sorted(glob.glob(osp.join(ROOT, 'configs', 'boat_*', 'metafile.yml'))),
    ids=lambda p: osp.basename(osp.dirname(p)))
def test_every_model_declares_its_tasks(metafile):
    """Read with the model-index loader mmpretrain uses, every model has a
    Result per task of its kind, which passes the loader's own checks
    (Metrics a mapping, empty where no number is known)."""
    from modelindex.load_model_index import load
    index = load(metafile)
    index.build_models_with_collections()
    assert len(index.models) == 15
    for model in index.models:
        kinds = [t for p, t in TASKS.items() if re.search(p, model.name)]
        assert len(kinds) == 1, model.name
        results = model.results or []  # None: pre-training
        assert [r.task for r in results] == kinds[0], model.name
        for result in results:
            assert result.dataset == DATASETS[result.task], model.name
            assert isinstance(result.metrics, dict), model.name
            result.check(silent=True)
            assert not result.check_errors, (model.name, result.check_errors)
