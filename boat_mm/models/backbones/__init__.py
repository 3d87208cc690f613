# Copyright (c) boat-mm contributors. All rights reserved.
__all__ = []
