"""Sharpness diagnostics of a trained network: Hessian spectrum, m-sharpness, loss landscapes.

Every measure takes ``(model, loss_fn, data)``, ``data`` an iterable of ``(x, y)`` batches, and
measures the mean loss over all of them, in eval mode, accumulating in float64, leaving the
weights and BatchNorm buffers bit-identical (``conventions``). Hessian-vector products come from
``sharpbench.curvature``, the project's one HVP code path.
"""
from .conventions import default_loss, evaluate, measuring
from .directions import filter_normalized_direction, filter_normalized_directions
from .hessian import (AngleResult, DensityResult, EigenResult, TraceResult, broadened_density,
                      gradient_eigenvector_angle, hessian_density, hessian_eigenvalues, hessian_trace)
from .landscape import Line, Surface, load_line, load_surface, loss_line, loss_surface, save_line, save_surface
from .msharpness import SharpnessResult, sharpness

__all__ = ["AngleResult", "DensityResult", "EigenResult", "Line", "SharpnessResult", "Surface",
           "TraceResult", "broadened_density", "default_loss", "evaluate",
           "filter_normalized_direction", "filter_normalized_directions",
           "gradient_eigenvector_angle", "hessian_density", "hessian_eigenvalues", "hessian_trace",
           "load_line", "load_surface", "loss_line", "loss_surface", "measuring", "save_line",
           "save_surface", "sharpness"]
