# Copyright (c) boat-mm contributors. All rights reserved.
__version__ = '0.1.0'


def parse_version_info(version_str: str) -> tuple:
    """Parse a version string like '0.1.0' or '0.1.0rc1' into a tuple.

    Args:
        version_str (str): The version.

    Returns:
        tuple: Its integer parts, then ``'rcN'`` for a release candidate,
        e.g. ``(0, 1, 0, 'rc1')``.
    """
    info = []
    for part in version_str.split('.'):
        if part.isdigit():
            info.append(int(part))
        elif 'rc' in part:
            major, rc = part.split('rc')
            info.extend([int(major), f'rc{rc}'])
    return tuple(info)


version_info = parse_version_info(__version__)

# The supported range of what ``import boat_mm`` needs (setup.py and
# tools/check_min_torch.sh read TORCH_MIN from here; requirements/ states
# the same mmcv and mmengine ranges for pip). TORCH_MIN: the first torch
# with torch.library.register_fake and register_autograd (boat_mm/ops).
TORCH_MIN = '2.4.1'
# Triton (shipped with torch's CUDA wheels; only FSLA's CUDA kernels use
# it): the oldest whose interpreter gives every result the kernels' tests
# check (with numpy < 2.3 before 3.7; tools/check_triton_range.sh). torch
# 2.4.1's Triton 3.0.0 does not, and no Triton has run them on a GPU yet.
# boat_mm does not check it; the tests that run or compile a kernel (the
# `triton` marker) skip below it.
TRITON_MIN_TESTED = '3.5.1'
MMCV_MIN, MMCV_MAX = '2.1.0', '2.2.0'
MMENGINE_MIN, MMENGINE_MAX = '0.10.7', '1.0.0'


def check_dependencies() -> None:
    """Refuse to import boat_mm with torch, mmengine or mmcv missing or out
    of the supported range, naming the range, as mmseg and mmdet do.

    Raises:
        ImportError: What is missing or too old or new, and what to install.
    """
    import importlib
    specs = {
        'torch': f'torch>={TORCH_MIN}',
        'mmengine': f'mmengine>={MMENGINE_MIN},<{MMENGINE_MAX}',
        'mmcv': f'mmcv>={MMCV_MIN},<{MMCV_MAX}',
    }
    versions = {}
    for name, spec in specs.items():
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError as err:
            how = f'`pip install "{spec}"`'
            if name == 'mmcv':
                # OpenMMLab's prebuilt mmcv 2.1 wheels (what `mim install`
                # fetches) are for torch 2.0 and 2.1 only, below TORCH_MIN.
                how = (f'its ops built against your torch, as the boat-mm '
                       f'repository\'s `bash tools/setup_env.sh` does (mmseg '
                       f'and mmdet need the '
                       f'ops; `pip install "mmcv-lite>={MMCV_MIN},'
                       f'<{MMCV_MAX}"` is enough for the backbones; see '
                       f'docs/get_started.md)')
            raise ImportError(f'boat_mm needs {spec} ({err}): install it '
                              f'with {how}') from err
    from mmengine.utils import digit_version
    bounds = {
        'torch': (TORCH_MIN, None),
        'mmengine': (MMENGINE_MIN, MMENGINE_MAX),
        'mmcv': (MMCV_MIN, MMCV_MAX),
    }
    problems = []
    for name, (low, high) in bounds.items():
        version = digit_version(versions[name].split('+')[0])
        if version < digit_version(low):
            problems.append(f'{name} {versions[name]} is older than {low}')
        elif high and version >= digit_version(high):
            problems.append(f'{name} {versions[name]} is not below {high}')
    if problems:
        raise ImportError(f'boat_mm {__version__} supports ' +
                          ', '.join(specs.values()) + ', but ' +
                          '; '.join(problems) +
                          ': install versions of that range')
