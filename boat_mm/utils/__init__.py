# Copyright (c) boat-mm contributors. All rights reserved.
from .checkpoint import allow_mmengine_checkpoints, mmengine_checkpoint_globals
from .import_hooks import when_imported
from .published import (PublishedCheckpointError, install_checkpoint_hint,
                        load_published_checkpoint,
                        published_checkpoint_message)

__all__ = [
    'allow_mmengine_checkpoints', 'mmengine_checkpoint_globals',
    'when_imported', 'PublishedCheckpointError', 'install_checkpoint_hint',
    'published_checkpoint_message', 'load_published_checkpoint'
]
