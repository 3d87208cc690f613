# Copyright (c) boat-mm contributors. All rights reserved.
"""The classification recipes draw different random numbers in each
process, as the public BOAT training code does (``BOAT-Swin/main.py``:
``seed = config.SEED + dist.get_rank()``; ``BOAT-CSWin/main.py``:
``torch.manual_seed(args.seed + args.rank)``).

Two processes of a gloo group (the CPU's stand-in for two GPUs) seed
themselves from the config's ``randomness`` as MMEngine's runner does,
then draw what the model draws at a training step: the config's mixup /
cutmix batch augmentation (mmpretrain's ``RandomBatchAugment``) of the
same batch, and a drop-path mask of 64 samples. With one seed for all
processes (what mmpretrain's default runtime gives), every GPU of a run
mixes its batch with the same lambda and box and drops the same
residuals.
"""
import json
import os.path as osp

import pytest
from gloo_pair import run_gloo_pair
from repo_scripts import REPO

CONFIGS = [
    'configs/boat_swin/boat-swin-tiny_16xb64_in1k.py',
    'configs/boat_cswin/boat-cswin-tiny_8xb256_in1k.py',
]

# One process of the group: argv = rank, store file, output prefix, the
# configs (one group for all: each is seeded afresh, as a run would be).
DRAW = '''
import json, sys
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.runner.utils import set_random_seed
from mmpretrain.models.utils import RandomBatchAugment
from boat_mm.models.utils.drop import BOATDropPath

rank, store, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group('gloo', init_method=f'file://{store}', rank=rank,
                        world_size=2)
for index, config in enumerate(sys.argv[4:]):
    cfg = Config.fromfile(config)
    set_random_seed(**cfg.randomness)
    augment = RandomBatchAugment(cfg.model.train_cfg.augments)
    inputs = torch.arange(8 * 3 * 16 * 16,
                          dtype=torch.float).view(8, 3, 16, 16)
    scores = torch.eye(8)
    mixed, mixed_scores = augment(inputs, scores)
    drop = BOATDropPath(0.5).train()(torch.ones(64, 1, 1))
    with open(f'{prefix}{index}_{rank}.json', 'w') as f:
        json.dump(dict(mixed=mixed_scores.tolist(),
                       drop=drop.flatten().tolist(),
                       seed_draw=torch.rand(4).tolist()), f)
# Both done before either closes its end of the group.
dist.barrier()
dist.destroy_process_group()
'''


@pytest.fixture(scope='module')
def draws(tmp_path_factory) -> dict:
    """Each config's draws in the two processes (one group for all)."""
    tmp = tmp_path_factory.mktemp('rank_seeds')
    run_gloo_pair(DRAW, tmp, str(tmp / 'draw'),
                  *(osp.join(REPO, c) for c in CONFIGS))
    return {
        config: [
            json.load(open(tmp / f'draw{index}_{rank}.json'))
            for rank in range(2)
        ]
        for index, config in enumerate(CONFIGS)
    }


@pytest.mark.parametrize('config', CONFIGS)
def test_each_process_draws_its_own_augmentation_and_drop_path(config, draws):
    draws = draws[config]
    assert draws[0]['mixed'] != draws[1]['mixed']
    assert draws[0]['drop'] != draws[1]['drop']
    assert draws[0]['seed_draw'] != draws[1]['seed_draw']
