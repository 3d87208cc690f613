# Copyright (c) boat-mm contributors. All rights reserved.
"""benchmarks/cpu_divergence.py: the batches it trains on."""

import cv2
import numpy as np
import torch
from repo_scripts import load_script


def _load():
    return load_script('benchmarks/cpu_divergence.py')


def test_batches_pair_images_with_their_annotations(tmp_path):
    """Each image gets the annotation of its name, labels shifted as
    ``reduce_zero_label`` (0 -> 255), wherever the data lies: a folder
    named like ``images`` or ``.jpg`` above it is not rewritten."""
    data = tmp_path / 'images.jpg.d' / 'ADEChallengeData2016'
    rng = np.random.default_rng(0)
    labels = {}
    for name in ('a', 'b'):
        for sub in ('images', 'annotations'):
            (data / sub / 'training').mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        cv2.imwrite(str(data / 'images' / 'training' / f'{name}.jpg'), img)
        labels[name] = rng.integers(0, 5, (20, 24), dtype=np.uint8)
        cv2.imwrite(
            str(data / 'annotations' / 'training' / f'{name}.png'),
            labels[name])
    batches = _load()._batches(str(data), batch=2, steps=0)
    assert len(batches) == 1
    for name, inputs, sample in zip('ab', batches[0]['inputs'],
                                    batches[0]['data_samples']):
        img = cv2.imread(str(data / 'images' / 'training' / f'{name}.jpg'))
        assert torch.equal(inputs, torch.from_numpy(img).permute(2, 0, 1))
        want = labels[name].astype(np.int64) - 1
        want[want < 0] = 255
        assert torch.equal(sample.gt_sem_seg.data[0], torch.from_numpy(want))
