# Copyright (c) boat-mm contributors. All rights reserved.
"""Make the BOAT ImageNet-1K models known to mmpretrain's model hub by
name.

After ``import boat_mm``, ``mmpretrain.list_models('*boat*')`` lists the
ImageNet-1K models of ``configs/*/metafile.yml`` (the six classifiers,
the two SimMIM pre-training models and the four classifiers that fine-tune
them) by their metafile names (those of their configs, as mmpretrain
names its own models) and ``mmpretrain.get_model(name,
pretrained=CHECKPOINT)`` builds and loads one. The published weights' URLs
stay metadata
(``ModelHub.get(name).data['Converted From']['Weights']``): they are not
mmpretrain checkpoints (convert them with
``tools/model_converters/boat2mm.py``), so ``pretrained=True`` raises,
saying that the model has no weights of its own and how to convert them:
each registered model's weights are ``boat-mm-unconverted://NAME``, a
scheme of MMEngine's ``CheckpointLoader`` whose loader raises that error
(``get_model`` otherwise warns and returns a randomly initialised model);
for a model without published weights, it says how to train them.

Registration uses mmpretrain's documented
``ModelHub.register_model_index(model_index_path, config_prefix)`` and
happens when mmpretrain's model hub is imported: ``import boat_mm`` stays
light (it does not import mmpretrain) through a post-import hook
(:func:`boat_mm.utils.when_imported`), and an explicit
:func:`register_model_index` does the same at any time. Only the ImageNet
models are registered: the hub builds every entry with mmpretrain's
registry, so the segmentors and detectors of the metafiles stay out. mmseg
1.x and mmdet 3.x have no such hub (their inferencers read only their own
package's model index), so our segmentors are used by config path.

The configs and ``model-index.yml`` are those of the source checkout
(``configs/`` next to ``boat_mm/``, also for ``pip install -e .``) or, for
a package installed from a wheel or an sdist, of ``boat_mm/.mim/`` (see
:func:`boat_mm.utils.metafile.find_root`); the working directory plays no
part. An install without them registers nothing.
"""
import os
import os.path as osp
import re
import tempfile
from typing import Any, Dict, List, NoReturn, Optional

from .utils.published import CONVERTER

__all__ = ['register_model_index', 'mmpretrain_models']

# mmpretrain's naming: the name of an ImageNet model ends with its dataset,
# then the input size unless it is 224.
_MMPRETRAIN_NAME = re.compile(r'_in1k(-\d+px)?$')

#: The hub's weights of a model without weights of its own: a scheme whose
#: MMEngine loader raises, naming the converter.
UNCONVERTED_SCHEME = 'boat-mm-unconverted://'

_registered: List[str] = []
# Registered name -> its published weights' URL (None if the metafile has
# none).
_published_weights: Dict[str, Optional[str]] = {}


def load_from_boat_mm_unconverted(filename: str,
                                  map_location: Any = None) -> NoReturn:
    """MMEngine's loader of ``boat-mm-unconverted://NAME``.

    It raises, saying that the model has no weights of its own and how to
    convert them.

    Args:
        filename (str): ``boat-mm-unconverted://NAME``.
        map_location (Any): Ignored; MMEngine's loaders take it.

    Raises:
        FileNotFoundError: Always.
    """
    name = filename[len(UNCONVERTED_SCHEME):]
    url = _published_weights.get(name)
    if url is None:
        raise FileNotFoundError(
            f'{name} has no weights in mmpretrain\'s model hub, and none '
            f'are published: train it with `python tools/train.py '
            f'{_config_of(name)}`{_after_its_source(name)}, then '
            f'call get_model({name!r}, pretrained=WORK_DIR/epoch_N.pth); '
            f'pretrained=False builds it randomly initialised.')
    raise FileNotFoundError(
        f'{name} has no weights of its own in mmpretrain\'s model hub: the '
        f'published BOAT weights ({url}) are not an mmpretrain '
        f'checkpoint. Convert them with `{CONVERTER}` (SRC: that URL or '
        f'the downloaded file), then call '
        f'get_model({name!r}, pretrained=DST); pretrained=False builds it '
        f'randomly initialised.')


def _config_of(name: str) -> str:
    """The config of a registered model, relative to the configs' root."""
    from mmpretrain.apis.model import ModelHub

    from .utils.metafile import find_root
    return osp.relpath(ModelHub.get(name).config.filename, find_root())


def _after_its_source(name: str) -> str:
    """For a registered model whose backbone starts from the checkpoint of
    another registered model's run (a SimMIM fine-tuning), the training of
    that run, to do first; else ''."""
    from mmpretrain.apis.model import ModelHub

    from .models.utils.arch import training_run
    init = ModelHub.get(name).config.model.backbone.get('init_cfg')
    checkpoint = init.get('checkpoint', '') if isinstance(init, dict) else ''
    run = training_run(checkpoint)
    if not run or not ModelHub.has(run):
        return ''
    return (f' after `python tools/train.py {_config_of(run)}`, whose '
            f'{checkpoint} its backbone starts from')


def mmpretrain_models() -> dict:
    """The metafiles' collections and their mmpretrain models (ImageNet-1K
    classifiers and SimMIM pre-training), as one metafile.

    Returns:
        dict: ``Collections`` and ``Models`` of every metafile, config
        paths absolute.

    Raises:
        FileNotFoundError: Neither the source checkout nor
            ``boat_mm/.mim`` holds ``model-index.yml`` or a metafile it
            imports.
    """
    from .utils.metafile import find_root, read_metafiles
    root = find_root()
    index = {'Collections': [], 'Models': []}
    for meta in read_metafiles(root):
        index['Collections'] += meta.get('Collections', [])
        for model in meta.get('Models', []):
            if _MMPRETRAIN_NAME.search(model['Name']):
                model = dict(model)
                model['Config'] = osp.join(root, model['Config'])
                index['Models'].append(model)
    return index


def register_model_index() -> List[str]:
    """Register the BOAT ImageNet-1K models with mmpretrain's ``ModelHub``
    (idempotent; imports mmpretrain).

    Returns:
        list[str]: The registered names.
    """
    import yaml
    from mmengine.runner import CheckpointLoader
    from mmpretrain.apis.model import ModelHub

    from .utils.metafile import find_root
    if _registered:
        return list(_registered)
    index = mmpretrain_models()
    names = [m['Name'] for m in index['Models']]
    # Another registration (or a name clash) would make ModelHub raise.
    if any(ModelHub.has(n.lower()) for n in names):
        return []
    for model in index['Models']:
        # pretrained=True loads the hub's Weights: ours raise, with the fix.
        url = (model.get('Converted From') or {}).get('Weights')
        _published_weights[model['Name'].lower()] = url
        model['Weights'] = UNCONVERTED_SCHEME + model['Name'].lower()
    CheckpointLoader.register_scheme(
        UNCONVERTED_SCHEME, load_from_boat_mm_unconverted, force=True)
    fd, path = tempfile.mkstemp(prefix='boat-mm-model-index-', suffix='.yml')
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            yaml.safe_dump(index, f, sort_keys=False)
        # The configs' paths are absolute (mmpretrain_models).
        ModelHub.register_model_index(path, config_prefix=find_root())
    finally:
        os.remove(path)
    _registered.extend(names)
    return names


def _register_on_import(module) -> None:
    """Post-import hook of ``mmpretrain.apis.model``: register, unless the
    configs are not there (then :func:`register_model_index` says so)."""
    try:
        register_model_index()
    except FileNotFoundError:
        pass
