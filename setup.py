# Copyright (c) boat-mm contributors. All rights reserved.
"""Install boat_mm: the BOAT backbones as an OpenMMLab 2.x plugin."""
import os
import os.path as osp
import re
import runpy
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = osp.dirname(osp.abspath(__file__))

# What an installed boat_mm carries in boat_mm/.mim, as mmpretrain, mmseg
# and mmdet carry theirs: the configs, the model index and the tools, so
# that MIM and boat_mm's model index (boat_mm/utils/metafile.py) find them
# away from the source tree. MANIFEST.in puts them in the sdist.
MIM_FILES = ('configs', 'model-index.yml', 'tools')
# What works on this checkout only: the scripts that set up its .venv, and
# the demo, which writes its data and runs into the checkout.
MIM_SKIP = ('setup_env.sh', 'check_min_torch.sh', 'check_triton_range.sh',
            'demo.sh', 'run_demo.py')


def _version_field(name: str) -> str:
    """A string constant of boat_mm/version.py (without importing it)."""
    with open(osp.join(HERE, 'boat_mm', 'version.py')) as f:
        return re.search(rf"^{name} = '([^']+)'", f.read(), re.M).group(1)


# Supported torch: from TORCH_MIN (boat_mm/version.py, which `import
# boat_mm` checks), whose torch.library has register_fake and
# register_autograd (boat_mm/ops/_library.py; both new in torch 2.4) and
# opcheck (the op tests), to TORCH_MAX_TESTED, the pinned version the
# project is developed on. tools/check_min_torch.sh builds a separate
# environment at TORCH_MIN and runs the backbone, op and Triton
# interpreter tests there. Triton, which boat_mm does not require: see
# TRITON_MIN_TESTED in boat_mm/version.py.
TORCH_MIN = _version_field('TORCH_MIN')
TORCH_MAX_TESTED = '2.14.1'


def get_extensions() -> tuple:
    """The C++ kernels (``boat_mm._C``), unless ``BOAT_MM_WITH_OPS=0``.

    Without them FSLA runs on its tensor implementation (slower clustering
    and clustered attention on the CPU, same results up to float rounding);
    see ``boat_mm/ops/clustering.py`` and ``clustered_attn.py``.
    """
    # The kernels use GCC/Clang vector extensions: no MSVC build.
    if os.getenv('BOAT_MM_WITH_OPS', '1') == '0' or sys.platform == 'win32':
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # The sources' digest, compiled in: boat_mm/ops/_library.py loads no
    # library built from other sources than those beside it.
    sources = runpy.run_path(osp.join(HERE, 'boat_mm', 'ops', '_sources.py'))
    digest = sources['sources_digest'](
        osp.join(HERE, 'boat_mm', 'ops', 'csrc'))
    ext = CppExtension(
        'boat_mm._C',
        [
            'boat_mm/ops/csrc/clustering.cpp',
            'boat_mm/ops/csrc/clustered_attention.cpp'
        ],
        depends=['boat_mm/ops/csrc/simd.h'],
        # Stringified in C++: one preprocessing token needs no shell quotes.
        define_macros=[('BOAT_MM_CSRC_SHA', digest)],
        # OpenMP for at::parallel_for (the process shares torch's libgomp);
        # -Wno-psabi: the vector types never cross a library boundary.
        extra_compile_args=[
            '-O3', '-fopenmp', '-ffp-contract=fast', '-Wno-psabi', '-std=c++20'
        ],
        extra_link_args=['-fopenmp'])
    return [ext], {'build_ext': BuildExtension}


class BuildPyWithMim(build_py):
    """``build_py`` that also copies :data:`MIM_FILES` into
    ``boat_mm/.mim`` of the build (wheels, ``pip install .``).

    An editable install needs no copy: boat_mm finds them in the checkout.
    """

    def run(self) -> None:
        super().run()
        if getattr(self, 'editable_mode', False):
            return
        mim = osp.join(self.build_lib, 'boat_mm', '.mim')
        skip = shutil.ignore_patterns('__pycache__', '*.pyc', *MIM_SKIP)
        for name in MIM_FILES:
            src, dst = osp.join(HERE, name), osp.join(mim, name)
            if osp.isdir(dst):
                shutil.rmtree(dst)  # no stale files of an earlier build
            if osp.isdir(src):
                shutil.copytree(src, dst, ignore=skip)
            else:
                os.makedirs(mim, exist_ok=True)
                shutil.copy2(src, dst)


def parse_requirements(fname: str) -> list:
    """Read requirement lines, following ``-r`` includes."""
    reqs = []
    with open(osp.join(HERE, fname)) as f:
        for line in f:
            line = line.split('#')[0].strip()
            if not line:
                continue
            if line.startswith('-r '):
                sub = osp.join(osp.dirname(fname), line[3:].strip())
                reqs.extend(parse_requirements(sub))
            else:
                reqs.append(line)
    return reqs


with open(osp.join(HERE, 'README.md'), encoding='utf-8') as f:
    long_description = f.read()
ext_modules, cmdclass = get_extensions()
cmdclass['build_py'] = BuildPyWithMim

setup(
    name='boat-mm',
    version=_version_field('__version__'),
    description='BOAT (Bilateral Local Attention Vision Transformer) '
    'backbones for MMEngine, mmpretrain, mmsegmentation and mmdetection',
    long_description=long_description,
    long_description_content_type='text/markdown',
    keywords='computer vision, vision transformer, semantic segmentation, '
    'image classification, object detection, openmmlab',
    packages=find_packages(
        exclude=('configs', 'tools', 'tests', 'benchmarks', 'docs')),
    include_package_data=True,
    # The code's syntax and standard library (tests/test_packaging.py)
    # and torch 2.4.1's wheels; the pinned stack runs on 3.11.
    python_requires='>=3.8',
    classifiers=[
        'Development Status :: 4 - Beta',
        'Intended Audience :: Science/Research',
        'License :: OSI Approved :: Apache Software License',
        'Operating System :: POSIX :: Linux',
        'Programming Language :: C++',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.11',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
        'Topic :: Scientific/Engineering :: Image Recognition',
    ],
    license='Apache License 2.0',
    license_files=['LICENSE'],
    # mmcv is not here (the `mim` extra has it, as mmpretrain, mmseg and
    # mmdet do): it must be built with its ops against the installed
    # torch, since OpenMMLab's mmcv 2.1 wheels are for torch 2.0 / 2.1.
    install_requires=[f'torch>={TORCH_MIN}'] +
    parse_requirements('requirements/runtime.txt'),
    extras_require={
        # One task's library: a user with mmpretrain alone runs the
        # classification configs and tools, and so on.
        'cls': parse_requirements('requirements/cls.txt'),
        'seg': parse_requirements('requirements/seg.txt'),
        'det': parse_requirements('requirements/det.txt'),
        'mim': parse_requirements('requirements/mminstall.txt'),
        'optional': parse_requirements('requirements/optional.txt'),
        'tests': parse_requirements('requirements/tests.txt'),
        'all': parse_requirements('requirements.txt'),
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False)
