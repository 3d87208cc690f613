# Copyright (c) boat-mm contributors. All rights reserved.
"""Every tool of tools/ has one manner (tools/boat_tools/cli.py): a user
error is one line on stderr, ``<tool>: error: <problem and fix>``, exit
status 2, no traceback; ``--shape`` means the same everywhere.

The tools run in this process (their ``main(argv)``), one or two cheap
cases each: every case fails before any model is trained or data is
read, except the published-checkpoint cases, which build the demo's small
segmentor. The launch scripts (dist_*.sh, slurm_*.sh) answer too few
arguments the same way, before torchrun or srun starts.
"""
import glob
import os
import os.path as osp
import subprocess

import numpy as np
import pytest
import torch
from published_files import (classifier, cswin_to_original,
                             write_published_cswin)
from repo_scripts import REPO, load_script
from test_boat2mm import original_swin_state

TOOLS = {
    'train': 'tools/train.py',
    'test': 'tools/test.py',
    'get_flops': 'tools/analysis_tools/get_flops.py',
    'check_fsla_parity': 'tools/analysis_tools/check_fsla_parity.py',
    'vis_clusters': 'tools/visualization/vis_clusters.py',
    'attention_recall': 'tools/analysis_tools/attention_recall.py',
    'image_demo': 'tools/image_demo.py',
    'pytorch2onnx': 'tools/deployment/pytorch2onnx.py',
    'boat2mm': 'tools/model_converters/boat2mm.py',
    'verify_boat': 'tools/model_converters/verify_boat.py',
    'publish_model': 'tools/model_converters/publish_model.py',
    'gen_synthetic_data': 'tools/dataset_converters/gen_synthetic_data.py',
    'run_demo': 'tools/run_demo.py',
}
CLS = 'configs/boat_cswin/boat-cswin-tiny_8xb256_in1k.py'
SEG = 'configs/demo/boat-cswin-tiny_upernet_demo.py'
DET = 'configs/demo/mask-rcnn_boat-cswin-tiny_fpn_demo.py'
SEG_ADE = ('configs/boat_cswin/boat-cswin-tiny_upernet_8xb2-160k_ade20k-'
           '512x512.py')
SIMMIM = ('configs/boat_swin/simmim_boat-swin-base-w6_8xb256-amp-coslr-100e_'
          'in1k-192px.py')
SIMMIM_CSWIN = ('configs/boat_cswin/simmim_boat-cswin-base_8xb256-amp-coslr-'
                '100e_in1k-192px.py')
# What a pre-training config, which has no test set, is told.
NO_TEST_SET = ("it is a pre-training config (model type 'SimMIM'), which has "
               'no test set; pass a config with one, e.g. the classifier '
               'config fine-tuned from a SimMIM one (configs/boat_swin/'
               '*_simmim-100e-pre_*.py, configs/boat_cswin/'
               '*_simmim-100e-pre_*.py)')
_LOADED = {}


def tool(name: str):
    if name not in _LOADED:
        _LOADED[name] = load_script(TOOLS[name])
    return _LOADED[name]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli')
    image = str(root / 'image.png')
    import cv2
    cv2.imwrite(image, np.zeros((32, 32, 3), np.uint8))
    ours = str(root / 'ours.pth')
    torch.save(dict(state_dict=dict(w=torch.ones(2))), ours)
    full = root / 'full'
    full.mkdir()
    (full / 'x').write_text('')
    published = write_published_cswin(str(root / 'cswin_tiny.pth.tar'))[0]
    # publish_model.py's inputs that are not checkpoints of train.py.
    a_list = str(root / 'list.pth')
    torch.save([torch.ones(2)], a_list)
    # What boat2mm.py writes (its meta names the published key).
    converted = str(root / 'converted.pth')
    torch.save(
        dict(
            state_dict=dict(w=torch.ones(2)),
            meta=dict(
                source='cswin_tiny.pth.tar',
                source_key='state_dict_ema',
                ema=True)), converted)
    no_state = str(root / 'no_state.pth')
    torch.save(dict(epoch=3, meta=dict()), no_state)
    bad_ema = str(root / 'bad_ema.pth')
    torch.save(
        dict(
            state_dict=dict(w=torch.ones(2)),
            ema_state_dict={
                'module.v': torch.ones(2),
                'steps': torch.tensor(1)
            }), bad_ema)
    # Published-layout files of archs the public code lacks: BOAT-Swin's
    # (heads read from its position-bias tables) and BOAT-CSWin's (whose
    # heads the weights do not tell).
    custom = str(root / 'swin_custom.pth')
    torch.save(dict(model=original_swin_state()), custom)
    model = classifier(
        dict(
            type='BOATCSWin',
            arch=dict(
                embed_dims=8, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2))), 3,
        64)
    custom_cswin = str(root / 'cswin_custom.pth')
    torch.save(
        dict(state_dict=cswin_to_original(model.state_dict())), custom_cswin)
    # A checkout of the public code whose imports are missing here.
    code = root / 'no_timm' / 'BOAT-Swin' / 'models'
    code.mkdir(parents=True)
    (code / 'boat_swin_transformer.py'
     ).write_text('import timm_missing_here  # noqa\n')
    # Configs that MMEngine cannot read.
    base = osp.join(REPO, CLS)
    bad = {
        'bad_merge':
        f'_base_ = [{base!r}]\n'
        'model = dict(backbone=dict(arch=dict(embed_dims=8)))\n',
        'bad_syntax':
        f'_base_ = [{base!r}]\nmodel = dict(\n',
        'bad_base':
        "_base_ = ['./nothere.py']\n",
        'bad_import':
        "custom_imports = dict(imports=['boat_mm_nothere'])\n",
        'bad_reference':
        f'_base_ = [{base!r}]\nx = {{{{_base_.nokey}}}}\n',
        'boat_scope':
        "_base_ = ['boat_mm::boat_cswin/boat-cswin-tiny_8xb256_"
        "in1k.py']\n",
        'other_scope':
        "_base_ = ['mmfoo::a/b.py']\n",
        'bad_init':
        f'_base_ = [{base!r}]\n'
        "model = dict(init_cfg=[dict(layer='Linear')])\n",
        # Another loop, the recipe's units kept (its warm-up converts).
        'iter_loop':
        f'_base_ = [{base!r}]\n'
        'train_cfg = dict(_delete_=True, by_epoch=False, max_iters=4)\n',
        'iter_loop_two':
        f'_base_ = [{base!r}]\n'
        'train_cfg = dict(_delete_=True, by_epoch=False, max_iters=4)\n'
        "param_scheduler = [dict(type='ConstantLR'), dict(type="
        "'CosineAnnealingLR', by_epoch=True, begin=1, end=3), dict(type="
        "'LinearLR', by_epoch=False)]\n"
        'default_hooks = dict(checkpoint=dict(by_epoch=False))\n',
        # A dataset that names no classes (mmseg's BaseSegDataset).
        'no_classes':
        f'_base_ = [{osp.join(REPO, SEG)!r}]\n'
        "test_dataloader = dict(dataset=dict(type='BaseSegDataset', "
        'metainfo=None))\n',
        # ADE20K's pipeline kept for a dataset of another type.
        'zero_label':
        f'_base_ = [{osp.join(REPO, SEG_ADE)!r}]\n'
        "train_dataloader = dict(dataset=dict(type='BaseSegDataset'))\n",
        # A head for the user's classes, the ImageNet base's preprocessor.
        'three_classes':
        f'_base_ = [{base!r}]\n'
        'model = dict(head=dict(num_classes=3))\n',
        # A child's list replaces its base's: boat_mm dropped ('json'
        # stands for the user's own module).
        'no_boat_import':
        f'_base_ = [{base!r}]\n'
        "custom_imports = dict(imports=['json'])\n",
        'epoch_loop':
        f'_base_ = [{osp.join(REPO, SEG)!r}]\n'
        'train_cfg = dict(_delete_=True, by_epoch=True, max_epochs=1)\n',
    }
    for name, text in bad.items():
        (root / f'{name}.py').write_text(text)
    (root / 'bad_json.json').write_text('{"a": 1,\n')
    (root / 'bad_yaml.yaml').write_text('a: 1\nb: [1\n')
    return dict(
        root=str(root),
        image=image,
        ours=ours,
        full=str(full),
        published=published,
        a_list=a_list,
        no_state=no_state,
        converted=converted,
        bad_ema=bad_ema,
        custom=custom,
        custom_cswin=custom_cswin,
        no_timm=str(root / 'no_timm'))


# tool, argv (``{name}`` from the files fixture), what stderr must say.
CASES = [
    ('train', ['missing.py'], "config file 'missing.py' not found"),
    ('train', [CLS, '--amp'], '--amp needs a CUDA device'),
    # A config that trains with AMP (the SimMIM ones), on the CPU.
    ('train', [SIMMIM],
     "the config trains with AMP (optim_wrapper.type='AmpOptimWrapper'), "
     'which MMEngine runs on a GPU only, and torch sees no CUDA device '
     'here: to train on the CPU in float32, pass `--cfg-options '
     'optim_wrapper.type=OptimWrapper`'),
    # MMEngine's errors of a config it cannot read, with the fix.
    ('train', ['{root}/bad_merge.py'],
     "bad_merge.py': arch={'embed_dims': 8} in child config cannot inherit "
     "from base because arch is a dict in the child config but is of type "
     "<class 'str'> in base config. You may set `_delete_=True`"),
    ('train', ['{root}/bad_syntax.py'],
     "bad_syntax.py': invalid Python at line 2 of it or of one of its "
     "_base_ files: '(' was never closed"),
    ('train', ['{root}/bad_json.json'],
     "bad_json.json': invalid JSON at line 2 of it or of one of its _base_ "
     'files: Expecting property name enclosed in double quotes'),
    ('test', ['{root}/bad_yaml.yaml', '{ours}'],
     "bad_yaml.yaml': invalid YAML at line 3 of it or of one of its _base_ "
     "files: did not find expected ',' or ']'"),
    ('train', ['{root}/bad_base.py'],
     "nothere.py' not found: a _base_ path is relative to the folder of "
     'the file that names it'),
    ('train', ['{root}/bad_import.py'],
     "bad_import.py': custom_imports: No module named 'boat_mm_nothere'; "
     'install that package, or add the folder that holds it to PYTHONPATH'),
    ('test', ['{root}/bad_reference.py', '{ours}'],
     "bad_reference.py': its _base_ files set no 'nokey' (a _base_.KEY "
     'reference)'),
    # A dict option under a value that is not a dict (the demo's
    # init_cfg=None): MMEngine's TypeError, with the command-line fix.
    ('train',
     [SEG, '--cfg-options', 'model.backbone.init_cfg.type=Pretrained'
      ], 'init_cfg is a dict in the child config but is of type <class '
     "'NoneType'> in base config. You may set `_delete_=True` to ignore the "
     'base config: on the command line, KEY._delete_=True'),
    ('get_flops', [SEG, '--cfg-options', 'model.backbone.arch.depths.7=1'],
     '--cfg-options: Index 7 exceeds the length of list [1, 2, 4, 1]'),
    # A child's dataset of another type keeps the base's arguments
    # (ImageNet's split), which the runner met with a traceback.
    ('train', [
        CLS, '--cfg-options', 'train_dataloader.dataset.type=CustomDataset',
        'train_dataloader.dataset.data_root={root}'
    ], "train_dataloader's dataset (CustomDataset) does not take "
     "split='train' (BaseDataset.__init__ refuses it): if the base "
     "config's dataset (of another type) gives it, replace that dataset "
     'with `_delete_=True` in yours'),
    # A load_from that is not there: MMEngine's bare "can not be found"
    # after the runner was built.
    ('train', [SEG, '--cfg-options', 'load_from=nothere.pth'],
     "load_from 'nothere.pth' not found (working directory"),
    ('train', [
        SEG, '--resume', '--work-dir', '{root}/resume', '--cfg-options',
        'load_from=nothere.pth'
    ], 'converted from the published weights by tools/model_converters/'
     "boat2mm.py (the config folders' READMEs list them); or "
     '`--cfg-options load_from=None`'),
    # A child's classes with the base's palette (MMEngine merges the
    # metainfo dicts): mmseg's traceback when the runner built the data.
    ('train', [
        SEG, '--cfg-options', 'train_dataloader.dataset.type=BaseSegDataset',
        'train_dataloader.dataset.metainfo.classes=[a,b,c,d,e,f,g,h,i]'
    ], "train_dataloader's dataset (BaseSegDataset) has 9 classes but a "
     "palette of 8 colours (a base config's palette, if any, is merged "
     'into your metainfo): give one colour per class'),
    # Top-5 of 2 classes stopped at the first validation, an epoch in;
    # the fix given passes the check (the next one is the data's).
    ('train', [
        CLS, '--cfg-options', 'model.head.num_classes=2',
        'data_preprocessor.num_classes=2'
    ], 'val_evaluator (Accuracy) asks for top-5 accuracy (topk=(1, 5)), '
     'but model.head has 2 classes, and mmpretrain stops at the first '
     'validation: set `--cfg-options val_evaluator.topk="(1,)"`'),
    ('train', [
        CLS, '--cfg-options', 'model.head.num_classes=2',
        'data_preprocessor.num_classes=2', 'val_evaluator.topk=(1,)'
    ], "train_dataloader.dataset.data_root = 'data/imagenet' does not exist"),
    ('test', [
        CLS, '{ours}', '--cfg-options', 'model.head.num_classes=2',
        'data_preprocessor.num_classes=2'
    ], 'test_evaluator (Accuracy) asks for top-5 accuracy'),
    ('test', [CLS, 'missing.pth'], "checkpoint 'missing.pth' not found"),
    ('test', [CLS, '{ours}', '--out-item', 'pred'], '--out-item needs --out'),
    # The CPU's autocast is bfloat16, which mmcv's nms does not take.
    ('test', [DET, '{ours}',
              '--amp'], '--amp of an mmdet config needs a CUDA device'),
    ('get_flops', ['missing.py'], "config file 'missing.py' not found"),
    ('get_flops', [CLS, '--shape', '1', '2',
                   '3'], '--shape takes H W or one size S for S x S'),
    ('check_fsla_parity', ['--ref-repo', '{root}', '--family',
                           'x'], "unknown --family 'x'"),
    ('check_fsla_parity', ['--ref-repo', '{root}'],
     '--ref-repo must be the root of a mahaoyuHKU/pytorch-boat checkout'),
    ('vis_clusters', [SEG, 'missing.png'], "image 'missing.png' not found"),
    ('vis_clusters', [SEG, '{image}', '--checkpoint',
                      'missing.pth'], "checkpoint 'missing.pth' not found"),
    ('vis_clusters', [SEG, '{image}', '--checkpoint', '{published}'],
     'is a published BOAT-CSWin checkpoint (arch tiny'),
    # A checkpoint of another model: the backbone's mismatch error.
    ('vis_clusters', [SEG, '{image}', '--checkpoint',
                      '{ours}'], 'BOATCSWin: the checkpoint matches 0 of the'),
    # The shared device check of the tools that build a model.
    ('vis_clusters', [SEG, '{image}', '--device', 'gpu'],
     "--device 'gpu' is not a torch device; use cpu, cuda or cuda:N"),
    ('image_demo', [SEG, '{image}'],
     "is a Python file: the order is IMG CONFIG [CHECKPOINT]"),
    ('image_demo', ['missing.png', SEG], "image 'missing.png' not found"),
    ('image_demo', ['{image}', '{image}'],
     'is not one MMEngine reads (.py, .json, .yaml, .yml)'),
    ('image_demo', ['{image}', SEG, '{ours}', '--checkpoint',
                    'other.pth'], 'two checkpoints given'),
    ('image_demo', ['{image}', SEG, '--out-file', 'x.txt'],
     "--out-file 'x.txt': no image format for that name"),
    ('image_demo', ['{image}', SEG, '--out-file', 'x.png', '--out-dir',
                    'o'], '--out-file and --out-dir both given; give one'),
    ('image_demo', ['{image}', SEG, '--opacity',
                    '0'], '--opacity must be in (0, 1], got 0.0'),
    ('image_demo', ['{image}', SEG, '--topk', '0'], '--topk must be >= 1'),
    ('image_demo', ['{image}', SEG, '--device', 'gpu'],
     "--device 'gpu' is not a torch device; use cpu, cuda or cuda:N"),
    ('image_demo', ['{image}', '{root}/no_classes.py'],
     "the config's test dataset (BaseSegDataset) names no classes"),
    ('image_demo', ['{image}', SEG, '--checkpoint', '{published}'],
     'is a published BOAT-CSWin checkpoint (arch tiny'),
    ('pytorch2onnx',
     [SEG, '--shape', '64', '--out', 'x.onnx', '--checkpoint',
      '{ours}'], 'BOATCSWin: the checkpoint matches 0 of the'),
    ('pytorch2onnx', [SEG, '--shape', '0', '--out', 'x.onnx'],
     '--shape takes H W or one size S for S x S, positive integers; got 0'),
    ('pytorch2onnx',
     [SEG, '--shape', '64', '--out', 'x.onnx', '--dynamic-shape',
      'height'], 'a dynamic height is not supported'),
    ('pytorch2onnx',
     [SEG, '--shape', '64', '--out', 'x.onnx', '--checkpoint',
      '{published}'], 'python tools/model_converters/boat2mm.py SRC DST'),
    ('pytorch2onnx',
     [SEG, '--shape', '64', '--out', 'x.onnx', '--opset',
      '10'], "--opset must be >= 18 (torch's ONNX exporter"),
    ('pytorch2onnx', [DET, '--shape', '64', '--out', 'x.onnx'],
     "got default_scope='mmdet': give a classification or segmentation "
     'config'),
    ('pytorch2onnx',
     [SEG, '--shape', '64', '--out', 'x.onnx', '--image',
      'missing.png'], "image 'missing.png' not found"),
    # Refused before the export, not after it.
    ('pytorch2onnx', [
        SEG, '--shape', '64', '--out', 'x.onnx', '--verify', '--image',
        '{ours}'
    ], 'OpenCV reads no image from it; pass an image file'),
    ('pytorch2onnx', [
        SEG, '--shape', '64', '--out', 'x.onnx', '--cfg-options',
        'model.backbone.fsla_cfg.clustering_impl=cpp'
    ], "has clustering_impl='cpp', a kernel that ONNX cannot express"),
    ('vis_clusters', [SEG, '{image}', '--shape', '64', '--resize', '64',
                      '64'], 'give --shape H W only (--resize W H is its old'),
    ('boat2mm', ['missing.pth',
                 'dst.pth'], "published checkpoint 'missing.pth' not found"),
    ('boat2mm', ['{ours}', 'dst.pth'], 'None of the published BOAT layouts'),
    # A BOAT-Swin file (its weights under 'model') has no EMA weights.
    ('boat2mm', ['{custom}', 'dst.pth', '--ema'],
     "swin_custom.pth: --ema asks for its state_dict_ema, which it has not "
     '(its keys: model): drop --ema to convert its weights'),
    ('verify_boat', ['--ref-repo', '{root}'], 'give a checkpoint or --family'),
    ('publish_model', ['missing.pth',
                       'x.pth'], "checkpoint 'missing.pth' not found"),
    ('publish_model', ['{ours}',
                       'x.txt'], "OUT_FILE 'x.txt' must end with .pth"),
    ('publish_model', ['{published}', 'x.pth'],
     'python tools/model_converters/boat2mm.py SRC DST'),
    ('publish_model', ['{image}', 'x.pth'],
     'is not a checkpoint torch.load(weights_only=True) reads'),
    ('publish_model', ['{ours}', 'x.pth', '--no-ema'],
     'has no ema_state_dict (trained without EMAHook, so its state_dict '
     'holds the trained weights): drop --no-ema'),
    ('publish_model', ['{converted}', 'x.pth', '--no-ema'],
     "converted.pth has no ema_state_dict (converted by boat2mm.py "
     "from 'state_dict_ema' of cswin_tiny.pth.tar, the published EMA "
     'weights; for the other ones, convert it again without --ema): drop '
     '--no-ema'),
    ('publish_model', ['{a_list}', 'x.pth'],
     'holds a list, not a checkpoint dict; pass a .pth written by '
     'tools/train.py'),
    ('publish_model', ['{no_state}', 'x.pth'],
     'holds no state_dict (its keys: epoch, meta); pass a .pth written by '
     'tools/train.py'),
    # Whichever of --no-ema or not: which weights are averaged is unknown.
    ('publish_model', ['{bad_ema}', 'x.pth'],
     "ema_state_dict does not hold the keys of state_dict under 'module.' "
     "(2 differ, e.g. 'v'), as EMAHook saves them: pass a checkpoint that "
     'tools/train.py wrote, or one without ema_state_dict'),
    ('publish_model', ['{bad_ema}', 'x.pth', '--no-ema'],
     'as EMAHook saves them: pass a checkpoint that tools/train.py wrote'),
    ('publish_model', ['{ours}'], 'the following arguments are required: '
     'out_file (usage: publish_model.py --help)'),
    ('verify_boat', ['missing.pth', '--ref-repo', '{root}'],
     "published checkpoint 'missing.pth' not found"),
    ('verify_boat', ['{published}'], 'the following arguments are required: '
     '--ref-repo (usage: verify_boat.py --help)'),
    ('verify_boat', ['--ref-repo', '{root}', '--family',
                     'vit'], "argument --family: invalid choice: 'vit'"),
    ('verify_boat', ['{ours}', '--ref-repo',
                     '{root}'], 'None of the published BOAT layouts found'),
    ('verify_boat', ['{custom}', '--ref-repo', '{root}'],
     "swin_custom.pth is a BOAT-Swin of a custom arch ({'embed_dims': "
     "[24, 48, 96, 192], 'depths': [2, 2, 2, 2], 'num_heads': [1, 2, 2, 4]}"
     '), which the public code does not build: verify_boat.py compares the '
     'published tiny, small and base models; pass one of those files, or '
     '--family swin --arch tiny small base for random weights'),
    ('verify_boat', ['{custom_cswin}', '--ref-repo', '{root}'],
     'matches none of the published archs (tiny, small, base)'),
    ('verify_boat', ['--ref-repo', '{root}', '--family', 'swin'],
     '--ref-repo must be the root of a mahaoyuHKU/pytorch-boat checkout'),
    ('verify_boat', ['--ref-repo', '{no_timm}', '--family', 'swin'],
     "No module named 'timm_missing_here'. The public code needs timm and "
     'einops: pip install timm einops'),
    ('gen_synthetic_data', ['ade20k', '{full}'], 'is not empty'),
    ('gen_synthetic_data', ['ade20k', '{root}/new', '--img-size',
                            '8'], 'img_size must be >= 32'),
    ('run_demo', ['--config',
                  'missing.py'], "config file 'missing.py' not found"),
    # Models whose output is features, not the logits the tool documents
    # (before: exported and labelled "class logits").
    ('pytorch2onnx', [SIMMIM, '--shape', '64', '--out', 'x.onnx'],
     'the config builds a SimMIM, a self-supervised pre-training model '
     'whose output is features'),
    ('pytorch2onnx', [
        CLS, '--shape', '64', '--out', 'x.onnx', '--cfg-options',
        'model.head=None'
    ], 'the config builds an ImageClassifier without a head (model.head is '
     'None)'),
    # An init_cfg without type, refused when the config is read, not by
    # init_weights after the model is built (KeyError: 'type').
    ('train',
     [CLS, '--cfg-options', 'model.backbone.init_cfg.checkpoint=x.pth'],
     "model.backbone.init_cfg={'checkpoint': 'x.pth'}: it has no type, which "
     "MMEngine's init_weights needs: for a backbone checkpoint, set "
     'model.backbone.init_cfg.type=Pretrained beside '
     'model.backbone.init_cfg.checkpoint=FILE; for a checkpoint of the '
     'whole model, pass load_from=FILE instead'),
    ('get_flops', ['{root}/bad_init.py'],
     "model.init_cfg=[{'layer': 'Linear'}]: a dict of it has no type"),
    # A `_base_` of a scope MMEngine does not know: MMEngine's assertion.
    ('train', ['{root}/boat_scope.py'],
     "boat_scope.py': a _base_ is 'boat_mm::...', a scope MMEngine does not "
     "know: boat-mm's configs are inherited by their path, e.g. _base_ = ["
     f"'{osp.join(REPO, CLS)}'] (or a path relative to the folder of your "
     'config)'),
    ('test', ['{root}/other_scope.py', '{ours}'],
     "other_scope.py': a _base_ is 'mmfoo::...', a scope MMEngine does not "
     'know (it knows mmaction, '),
    # A training length the recipe's schedule or loop does not fit, seen
    # in the config, not in MMEngine's errors when the runner builds them.
    ('train', [CLS, '--cfg-options', 'train_cfg.max_epochs=2'],
     'param_scheduler[1] (CosineAnnealingLR) begins at epoch 20 and ends at '
     'train_cfg.max_epochs=2, and MMEngine needs end > begin: for a run this '
     'short, give a child config its own param_scheduler, as "Shorter '
     'ImageNet runs" in configs/boat_swin/README.md and '
     'configs/boat_cswin/README.md shows'),
    ('train', [CLS, '--cfg-options', 'train_cfg.max_iters=4'],
     "train_cfg has max_iters, which MMEngine's EpochBasedTrainLoop does not "
     'take (it takes max_epochs, val_begin, val_interval, '
     'dynamic_intervals): set train_cfg.max_epochs instead; an '
     'iteration-based run needs a child config that replaces train_cfg '
     '(`train_cfg = dict(_delete_=True, by_epoch=False, max_iters=N)`) and '
     'sets by_epoch=False in its param_scheduler, default_hooks.checkpoint '
     'and log_processor'),
    ('train', [SEG, '--cfg-options', 'train_cfg.max_epochs=4'],
     "train_cfg has max_epochs, which MMEngine's IterBasedTrainLoop does not "
     'take (it takes max_iters, val_begin, val_interval, '
     'dynamic_intervals): set train_cfg.max_iters instead; an epoch-based '
     'run needs a child config that replaces train_cfg (`train_cfg = '
     'dict(_delete_=True, by_epoch=True, max_epochs=N)`), gives '
     'train_dataloader a DefaultSampler and sets by_epoch=True in its '
     'param_scheduler, default_hooks.checkpoint and log_processor'),
    # Heads of another number of classes than the data's.
    # (The auxiliary head is named where it shares the wrong number.)
    ('train', [
        SEG, '--cfg-options', 'model.decode_head.num_classes=150',
        'model.auxiliary_head.num_classes=150'
    ], "train_dataloader's dataset (ADE20KDataset) has 8 classes (['wall', "
     "'building', 'sky', ...]), but model.decode_head.num_classes=150, "
     'model.auxiliary_head.num_classes=150: set `--cfg-options '
     'model.decode_head.num_classes=8 model.auxiliary_head.num_classes=8` '
     '(or in the config), or give the dataset the classes of the heads with '
     'metainfo=dict(classes=(...))'),
    ('test', [
        DET, '{ours}', '--cfg-options', 'model.roi_head.bbox_head.'
        'num_classes=80', 'model.roi_head.mask_head.num_classes=80'
    ], 'but model.roi_head.bbox_head.num_classes=80, model.roi_head.'
     'mask_head.num_classes=80: set `--cfg-options model.roi_head.bbox_head.'
     'num_classes=6 model.roi_head.mask_head.num_classes=6`'),
    ('train', ['{root}/zero_label.py'],
     "train_dataloader's dataset (BaseSegDataset) has reduce_zero_label="
     "False, but its pipeline's LoadAnnotations has reduce_zero_label=True "
     '(as ADE20K’s, which ignores label 0), and mmseg stops at the first '
     "sample: give the dataset a pipeline with dict(type='LoadAnnotations') "
     "(it follows the dataset), or set the dataset's reduce_zero_label=True "
     'if label 0 of your masks is to be ignored'),
    # Units the new loop never ends (MMEngine runs them silently).
    ('train', ['{root}/iter_loop.py'],
     "train_cfg builds MMEngine's IterBasedTrainLoop, but param_scheduler"
     '[1] (CosineAnnealingLR) counts epochs (by_epoch=True), so it never '
     'steps and the learning rate stays at its first value: set '
     'by_epoch=False with begin and end in iterations; '
     'default_hooks.checkpoint counts epochs (by_epoch=True), so it saves '
     'only when the run ends: set `default_hooks = dict(checkpoint=dict('
     'by_epoch=False, interval=N))` with N in iterations'),
    ('train', ['{root}/iter_loop_two.py'],
     "train_cfg builds MMEngine's IterBasedTrainLoop, but param_scheduler"
     '[0] (ConstantLR), [1] (CosineAnnealingLR) count epochs (by_epoch=True)'
     ', so they never step and the learning rate stays at its first value: '
     'set by_epoch=False with begin and end in iterations'),
    ('train', ['{root}/epoch_loop.py'],
     "train_cfg builds MMEngine's EpochBasedTrainLoop, but "
     'train_dataloader.sampler is an InfiniteSampler, which never ends an '
     'epoch: set `train_dataloader = dict(sampler=dict(_delete_=True, '
     "type='DefaultSampler', shuffle=True))`"),
    ('train', [SEG, '--cfg-options', 'train_cfg.val_interval=0'],
     'train_cfg.val_interval=0: MMEngine validates every val_interval '
     'iterations, which must be 1 or more; to train without '
     'validating, pass --no-validate'),
    ('train', [
        CLS, '--cfg-options',
        'optim_wrapper.paramwise_cfg.layer_decay_rate=0.65'
    ], 'optim_wrapper.paramwise_cfg.layer_decay_rate=0.65 is read by a '
     "layer-decay constructor only, and MMEngine's default one drops it "
     '(every layer would train at the full learning rate): set '
     "optim_wrapper.constructor='LearningRateDecayOptimWrapperConstructor' "
     "(mmpretrain's, as boat-mm's SimMIM fine-tuning configs do)"),
    # A best-checkpoint metric that validation does not report.
    ('train', [SEG, '--cfg-options', 'default_hooks.checkpoint.save_best=mAP'],
     "default_hooks.checkpoint.save_best='mAP': validation reports aAcc, "
     "mIoU, mAcc, not mAP, and MMEngine's CheckpointHook would stop the run "
     "at its first validation: name one of those, or 'auto' (the first)"),
    ('train',
     [CLS, '--cfg-options', 'default_hooks.checkpoint.save_best=top1'
      ], "save_best='top1': validation reports accuracy/top1, accuracy/top5, "
     'not top1'),
    # One-hot targets of Mixup/CutMix wider than the head's logits (the
    # loss's shape assertion at the first iteration).
    ('train', ['{root}/three_classes.py'],
     'model.head.num_classes=3 but data_preprocessor.num_classes=1000 (the '
     'width of the one-hot targets that Mixup/CutMix mix; the loss would '
     'refuse the shapes at the first iteration): set `data_preprocessor = '
     'dict(num_classes=3)` in your config, or pass `--cfg-options '
     'data_preprocessor.num_classes=3`'),
    ('train', [CLS, '--cfg-options', 'model.data_preprocessor.num_classes=5'],
     'model.head.num_classes=1000 but model.data_preprocessor.num_classes=5 '
     '(the width'),
    # custom_imports without boat_mm, for a model of its modules: refused
    # where every tool reads its config (upstream tools fail on it).
    ('train', ['{root}/no_boat_import.py'],
     "custom_imports.imports=['json'] lacks 'boat_mm', which registers the "
     "model's BOATCSWin: a config's list replaces its base's, and upstream "
     'tools and inferencers given this config (or the copy a run writes to '
     'its work dir) fail with "BOATCSWin is not in the model registry": set '
     "`custom_imports = dict(imports=['boat_mm', 'json'], "
     'allow_failed_imports=False)`'),
    # ... after --cfg-options, which may fix it (--amp: the error after).
    ('train', [
        '{root}/no_boat_import.py', '--amp', '--cfg-options',
        'custom_imports.imports=[boat_mm,json]'
    ], '--amp needs a CUDA device'),
    ('get_flops', [SIMMIM, '--cfg-options', 'custom_imports.imports=[json]'],
     "custom_imports.imports=['json'] lacks 'boat_mm', which registers the "
     "model's SimMIMBOATSwin: a config's list"),
    # --out checked for what each scope writes there, before the test.
    ('test', [CLS, '{ours}', '--out', 'res.json'],
     "--out of an mmpretrain config is a pickle file of the predictions, "
     "ending in .pkl or .pickle; got 'res.json' (for the metrics in a .json "
     'file, add --out-item metrics).'),
    ('test', [CLS, '{ours}', '--out', 'res.txt', '--out-item', 'metrics'],
     '--out of an mmpretrain config is a file of the metrics, ending in '
     ".json or .yaml or .yml or .pickle or .pkl; got 'res.txt'."),
    ('test', [DET, '{ours}', '--out', 'res.json'],
     '--out of an mmdet config is a pickle file of the predictions, ending '
     "in .pkl or .pickle; got 'res.json'."),
    # A SimMIM pre-training config where a test set is needed.
    ('test', [SIMMIM, '{ours}'],
     f'the config has no test_dataloader, which test.py tests on: '
     f'{NO_TEST_SET}'),
    ('image_demo', ['{image}', SIMMIM_CSWIN],
     f'the config has no test_dataloader, which image_demo.py takes the test '
     f'pipeline and class names from: {NO_TEST_SET}'),
    ('vis_clusters', [SIMMIM, '{image}'],
     f'the config has neither test_dataloader.dataset.pipeline nor '
     f'test_pipeline, which vis_clusters loads and packs the image with: '
     f'{NO_TEST_SET}'),
    # A file that is not an image, checked before the model is built; a
    # checkpoint where the image goes is named as one.
    ('vis_clusters', [SEG, '{ours}'],
     "could not be read as an image; it looks like a checkpoint: give it "
     'with --checkpoint '),
    ('attention_recall', [SEG, '{image}', '{ours}'],
     "ours.pth' could not be read as an image; it looks like a checkpoint: "
     'give it with --checkpoint '),
    ('attention_recall', [SEG, '{root}/bad_json.json'],
     "bad_json.json' could not be read as an image; pass an image file "
     '(.jpg, .png, ...)'),
    ('image_demo', ['{ours}', SEG],
     'could not be read as an image; it looks like a checkpoint'),
    # An output path that is a folder, or under a file: refused before
    # the conversion or export (boat2mm converted, pytorch2onnx exported
    # for 15 s, before failing on it).
    ('boat2mm', ['{published}',
                 '{full}'], "full' is a folder; name a file in it, e.g. "),
    ('pytorch2onnx', [SEG, '--shape', '64', '--out',
                      '{full}'], '/full/boat-cswin-tiny_upernet_demo.onnx'),
    ('pytorch2onnx', [SEG, '--shape', '64', '--out', '{ours}/x.onnx'],
     'ours.pth is a file, not a folder; name a path in a folder'),
    ('vis_clusters', [SEG, '{image}', '--out-file', '{full}'],
     "full' is a folder; name a file in it, e.g. /"),
    ('attention_recall', [SEG, '{image}', '--json', '{full}'],
     "full' is a folder; name a file in it, e.g. /"),
    ('image_demo', ['{image}', SEG, '--out-file',
                    '{full}'], "full' is a folder; name a file in it, e.g. /"),
    # Necks and heads that do not take the backbone's widths, refused
    # before the model is built (its first forward would fail in a conv).
    ('train', [SEG, '--cfg-options', 'model.backbone.arch=base'],
     "the backbone BOATCSWin (arch='base') outputs: [96, 192, 384, 768] at "
     'stages (0, 1, 2, 3) (model.backbone.out_indices): '
     'model.decode_head.in_channels=[32, 64, 128, 256] should be [96, 192, '
     '384, 768] (outputs [0, 1, 2, 3], its in_index, one width each); '
     'model.auxiliary_head.in_channels=128 should be 384 (the width of '
     'output 2, its in_index); pass `--cfg-options model.decode_head.'
     'in_channels="[96,192,384,768]" model.auxiliary_head.in_channels=384`'),
    ('test', [DET, '{ours}', '--cfg-options', 'model.backbone.arch=base'],
     'model.neck.in_channels=[32, 64, 128, 256] should be [96, 192, 384, '
     '768] (one width per output of the backbone); pass `--cfg-options '
     'model.neck.in_channels="[96,192,384,768]"`'),
    ('get_flops', [CLS, '--cfg-options', 'model.backbone.arch=base'],
     "BOATCSWin (arch='base') outputs: [768] at stages (3,) "
     '(model.backbone.out_indices): model.head.in_channels=512 should be '
     '768 (the width of the last output, pooled); pass `--cfg-options '
     'model.head.in_channels=768`'),
    ('image_demo',
     ['{image}', SEG, '--cfg-options', 'model.backbone.out_indices=[1,2,3]'
      ], 'model.decode_head.in_index=[0, 1, 2, 3] (it selects outputs of the '
     '3: use indices in [-3, 2]); model.auxiliary_head.in_channels=128 '
     'should be 256 (the width of output 2, its in_index)'),
    ('attention_recall', [SIMMIM_CSWIN, '{image}'],
     'test_pipeline, which attention_recall loads and packs the image with: '
     f'{NO_TEST_SET}'),
    # Arguments the BOAT backbone refuses, with its own message
    # (BaseBOATBackbone.check_arguments), before the runner dumps the
    # config and builds the model (before: a traceback after the dump).
    ('train', [SEG, '--cfg-options', 'model.backbone.out_indices=(0,1,2,4)'],
     'model.backbone: BOATCSWin: out_indices (0, 1, 2, 4) must index one of '
     'the 4 stages; 4 is out of range'),
    ('train', [SEG, '--cfg-options', 'model.backbone.drop_path_rate=1.5'],
     'model.backbone: BOATCSWin: drop_path_rate must be in [0, 1] (a '
     'probability), got 1.5.'),
    ('test', [DET, '{ours}', '--cfg-options', 'model.backbone.with_cp=1'],
     'model.backbone: BOATCSWin: with_cp must be True or False, got 1 '
     '(int).'),
    ('train', [SEG, '--cfg-options', 'model.backbone.norm_cfg.type=BN'],
     "model.backbone: BOATCSWin: norm_cfg={'type': 'BN', 'requires_grad': "
     "True} cannot normalise the (B, N, C) tokens of the blocks"),
    ('train', [SEG, '--cfg-options', 'model.backbone.frozen_stages=5'],
     'model.backbone: BOATCSWin: frozen_stages must be in [-1, 4], got 5.'),
    ('test',
     [CLS, '{ours}', '--cfg-options', 'model.backbone.frozen_stages='
      'True'], 'model.backbone: BOATCSWin: frozen_stages must be an '
     'int in [-1, 4] (-1: nothing frozen), got True.'),
    # An upstream Swin argument, and a misspelt one.
    ('train', [SEG, '--cfg-options', 'model.backbone.norm_eval=True'],
     "model.backbone: BOATCSWin got unexpected keyword arguments "
     "['norm_eval']. Arguments of the upstream (mmpretrain, mmseg, mmdet) "
     "SwinTransformer that BOATCSWin does not support: ['norm_eval']. "
     'norm_eval: the norms are LayerNorms (norm_cfg), which have no '
     'running statistics to freeze; drop it.'),
    ('train', [SEG, '--cfg-options', 'model.backbone.out_indice=(0,1)'],
     "model.backbone: BOATCSWin got unexpected keyword arguments "
     "['out_indice']. Did you mean out_indices for out_indice? BOATCSWin "
     "takes ['act_cfg', 'arch', 'attn_drop_rate', 'drop_path_rate', "),
    # A family's own argument, of a SimMIM variant.
    ('get_flops', [SIMMIM, '--cfg-options', 'model.backbone.window_size=0'],
     'model.backbone: SimMIMBOATSwin: window_size must be an int >= 1, got '
     '0.'),
    # fsla_cfg's values, as FSLA checks them when built.
    ('image_demo', [
        '{image}', SEG, '--cfg-options',
        'model.backbone.fsla_cfg.group_size=16'
    ], 'model.backbone: BOATCSWin: fsla_cfg, in stage 0: overlap (20) must '
     'be >= 0 and smaller '
     'than group_size (16); lower overlap'),
]


def _ids(case):
    return f'{case[0]}-{CASES.index(case)}'


@pytest.mark.parametrize('case', CASES, ids=_ids)
def test_user_error_is_one_line_exit_2(case, files, capsys, monkeypatch):
    name, argv, expected = case
    argv = [a.format(**files) for a in argv]
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exc:
        tool(name).main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    prog = osp.basename(TOOLS[name])
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f'{prog}: error: '), err
    assert expected in lines[0] and 'Traceback' not in err


def test_upstream_base_of_a_library_not_installed(monkeypatch, capsys):
    """An 'mmdet::' base without mmdet installed: MMEngine's
    ModuleNotFoundError, as one line naming the extra that installs it."""
    import mmengine.config.config as mmengine_config
    real = mmengine_config.is_installed
    monkeypatch.setattr(mmengine_config, 'is_installed',
                        lambda name: name != 'mmdet' and real(name))
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exc:
        tool('train').main([DET])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        f"train.py: error: config file {DET!r}: a _base_ of mmdet, which is "
        'not installed: install mmdet (`pip install "boat-mm[det]"` or '
        '`mim install mmdet`)\n')


def test_backbone_check_reads_the_config_scope():
    """A norm registered in the config's scope (mmseg's MODELS, e.g. by
    its custom_imports) passes the tools' check of the backbone's
    arguments, as the model's build in that scope does; another scope,
    where it is not registered, is refused, unless the backbone's own
    ``_scope_`` is the norm's."""
    from mmengine.config import Config
    from mmseg.registry import MODELS as SEG_MODELS
    tool('train')  # puts tools/ (boat_tools) on the path
    from boat_tools.cli import UsageError, check_backbone_args

    class TokenNorm(torch.nn.LayerNorm):
        pass

    SEG_MODELS.register_module('TokenNormOfTest', module=TokenNorm)
    try:
        cfg = Config.fromfile(osp.join(REPO, SEG))
        assert cfg.default_scope == 'mmseg'
        cfg.model.backbone.norm_cfg = dict(type='TokenNormOfTest')
        check_backbone_args(cfg)
        cfg.default_scope = 'mmpretrain'
        with pytest.raises(UsageError, match="type 'TokenNormOfTest' is not"):
            check_backbone_args(cfg)
        # The backbone's own scope, where the build takes its norms from.
        cfg.model.backbone._scope_ = 'mmseg'
        check_backbone_args(cfg)
    finally:
        SEG_MODELS._module_dict.pop('TokenNormOfTest')


def test_palette_message_counts_the_classes_of_the_dataset_class():
    """A palette given without classes is checked against the dataset
    class's classes, found in the config's scope as the build finds it
    (ADE20K's 150, not 0)."""
    tool('train')  # puts tools/ (boat_tools) on the path
    import mmseg.datasets  # noqa: F401  (registers ADE20KDataset)
    from boat_tools.config import _palette_error
    ds = dict(type='ADE20KDataset', metainfo=dict(palette=[[0, 0, 0]] * 8))
    err = ValueError('palette does not match classes as metainfo is {}')
    assert "(ADE20KDataset) has 150 classes but a palette of 8 colours" in (
        _palette_error('train_dataloader', ds, err, 'mmseg'))


def test_every_tool_is_covered():
    assert {c[0] for c in CASES} == set(TOOLS)


@pytest.mark.parametrize('name', ['get_flops', 'pytorch2onnx', 'vis_clusters'])
def test_shape_means_the_same_everywhere(name):
    parse = tool(name).parse_args
    base = {'pytorch2onnx': [SEG, '--out', 'x.onnx']}.get(name, [SEG])
    if name == 'vis_clusters':
        base = [SEG, 'image.png']
    assert parse(base + ['--shape', '64']).shape == (64, 64)
    assert parse(base + ['--shape', '48', '64']).shape == (48, 64)


# The launch scripts (they source tools/dist_launch.sh): too few arguments
# for each.
SCRIPTS = {
    'dist_train.sh': ['c.py'],
    'dist_test.sh': ['c.py', 'k.pth'],
    'slurm_train.sh': ['partition', 'job'],
    'slurm_test.sh': ['partition', 'job', 'c.py'],
}


def _bash(script: str, args: list, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', f'tools/{script}', *args],
                          cwd=REPO,
                          env=dict(os.environ, **env),
                          capture_output=True,
                          text=True)


def test_every_launch_script_is_covered():
    assert set(SCRIPTS) == {
        osp.basename(p)
        for p in glob.glob(osp.join(REPO, 'tools', '*.sh'))
        if 'dist_launch.sh' in open(p).read()
    }


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_launch_script_usage_is_one_line_exit_2(script):
    """Too few arguments: the tools' one line naming the usage, before
    torchrun or srun starts; ``--help`` prints the script's header."""
    proc = _bash(script, SCRIPTS[script])
    assert proc.returncode == 2 and proc.stdout == ''
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f'{script}: error: {len(SCRIPTS[script]) + 1} arguments needed, '
        f'got {len(SCRIPTS[script])}; usage: bash tools/{script} ')
    proc = _bash(script, ['--help'])
    assert proc.returncode == 0 and proc.stderr == ''
    assert 'Usage: ' in proc.stdout and f'tools/{script}' in proc.stdout
    assert '#' not in proc.stdout and 'set -e' not in proc.stdout


@pytest.mark.parametrize('script', ['slurm_train.sh', 'slurm_test.sh'])
@pytest.mark.parametrize('name', ['GPUS', 'GPUS_PER_NODE', 'CPUS_PER_TASK'])
def test_slurm_counts_must_be_positive_integers(script, name):
    proc = _bash(script, ['p', 'j', 'c.py', 'x'], **{name: '0'})
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr == (f'{script}: error: {name} must be a positive '
                           f"integer, got '0'\n")


# dist_*.sh's GPUS, the argument before the tool's own.
DIST_ARGS = {'dist_train.sh': ['c.py'], 'dist_test.sh': ['c.py', 'k.pth']}


@pytest.mark.parametrize('script', sorted(DIST_ARGS))
@pytest.mark.parametrize('gpus', ['0', 'two', '-1', '1.5'])
def test_dist_gpus_must_be_a_positive_integer(script, gpus):
    """Refused before torchrun starts (its bare AssertionError for 0, a
    ValueError traceback for 'two'): PYTHON stands for the interpreter and
    says whether it ran."""
    proc = _bash(script, DIST_ARGS[script] + [gpus], PYTHON='echo ran')
    assert proc.returncode == 2 and proc.stdout == ''
    assert proc.stderr == (
        f'{script}: error: GPUS must be a positive integer (or one of auto '
        f"cpu gpu xpu), got '{gpus}'\n")


@pytest.mark.parametrize('gpus', ['2', 'auto'])
def test_dist_gpus_torchrun_takes_pass(gpus):
    proc = _bash('dist_train.sh', ['c.py', gpus], PYTHON='echo ran')
    assert proc.returncode == 0 and proc.stderr == ''
    assert proc.stdout.startswith('ran -m torch.distributed.run ')
    assert f' --nproc_per_node={gpus} ' in proc.stdout


@pytest.mark.parametrize(
    'options',
    [
        # No Mixup/CutMix: no one-hot targets, the preprocessor's count
        # unused (as mmpretrain's resnet50_8xb128_coslr-90e_in21k.py).
        dict(model=dict(head=dict(num_classes=3), train_cfg=None)),
        # A head without num_classes.
        dict(model=dict(head=dict(num_classes=None))),
        dict(
            data_preprocessor=dict(num_classes=3),
            model=dict(head=dict(num_classes=3))),
    ])
def test_preprocessor_classes_left_alone(options):
    from boat_tools.widths import check_preprocessor_classes
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO, CLS), import_custom_modules=False)
    cfg.merge_from_dict(options)
    check_preprocessor_classes(cfg)


@pytest.mark.parametrize(
    'options',
    [
        dict(custom_imports=dict(imports=['boat_mm.models', 'json'])),
        # No custom_imports: not a child of ours, which all set it.
        dict(custom_imports=None),
        # A model of upstream modules only.
        dict(
            custom_imports=dict(imports=['json']),
            model=dict(backbone=dict(_delete_=True, type='ResNet', depth=18))),
    ])
def test_boat_imports_left_alone(options):
    # Registers ResNet, in mmpretrain's child of MMEngine's MODELS.
    import mmpretrain.models  # noqa: F401
    from boat_tools.cli import check_boat_imports
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO, CLS), import_custom_modules=False)
    cfg.merge_from_dict(options)
    check_boat_imports(cfg)
