# Copyright (c) boat-mm contributors. All rights reserved.
from typing import Optional

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
MMCV_MIN, MMCV_MAX = '2.1.0', '2.2.0'
MMENGINE_MIN, MMENGINE_MAX = '0.10.7', '1.0.0'


def check_dependencies() -> None:
    """Refuse to import boat_mm with torch, mmengine or mmcv missing or out
    of the supported range, naming the range, as mmseg and mmdet do.

    Raises:
        ImportError: What is missing or too old or new, and what to install.
    """
    import torch
    from mmengine.utils import digit_version

    def _out_of_range(name: str, version: str, low: str,
                      high: Optional[str]) -> Optional[str]:
        if low and digit_version(version) < digit_version(low):
            return f'{name} {version} is older than {low}'
        if high and digit_version(version) >= digit_version(high):
            return f'{name} {version} is not below {high}'
        return None

    try:
        import mmcv
    except ImportError as err:
        raise ImportError(
            f'boat_mm needs mmcv>={MMCV_MIN},<{MMCV_MAX} ({err}): install it '
            f'with `mim install "mmcv>={MMCV_MIN},<{MMCV_MAX}"` (mmcv-lite is '
            f'enough for the backbones; mmseg and mmdet need mmcv built with '
            f'its ops, see the README\'s Installation)') from err
    import mmengine
    problems = [
        _out_of_range('torch',
                      torch.__version__.split('+')[0], TORCH_MIN, None),
        _out_of_range('mmengine', mmengine.__version__, MMENGINE_MIN,
                      MMENGINE_MAX),
        _out_of_range('mmcv', mmcv.__version__, MMCV_MIN, MMCV_MAX),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ImportError(
            f'boat_mm {__version__} supports torch>={TORCH_MIN}, '
            f'mmengine>={MMENGINE_MIN},<{MMENGINE_MAX} and '
            f'mmcv>={MMCV_MIN},<{MMCV_MAX}, but ' + '; '.join(problems) +
            ': install versions of that range')
