# Copyright (c) boat-mm contributors. All rights reserved.
"""Deployment of BOAT models (not imported by ``import boat_mm``)."""
from .onnx_export import (DYNAMIC_AXES, MIN_OPSET, SCOPES, ExportWrapper,
                          ModelKindError, ScopeError, WithClusters,
                          build_model, check_dynamic, check_exportable,
                          check_fsla_impls, compare, converts_to_rgb,
                          export_onnx, input_description, linear_time_rewrites,
                          load_image, make_session, normalisation,
                          run_onnxruntime, verify)

__all__ = [
    'SCOPES', 'MIN_OPSET', 'DYNAMIC_AXES', 'ScopeError', 'ModelKindError',
    'build_model', 'check_exportable', 'converts_to_rgb', 'check_fsla_impls',
    'check_dynamic', 'ExportWrapper', 'WithClusters', 'linear_time_rewrites',
    'export_onnx', 'load_image', 'normalisation', 'input_description',
    'make_session', 'run_onnxruntime', 'compare', 'verify'
]
