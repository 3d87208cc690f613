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
