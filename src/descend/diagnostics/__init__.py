"""descend.diagnostics: is the gradient flowing?

- :func:`gradient_flow`: gradient norm of each layer's weight, input side first.
- :func:`activation_gradients`: norm of the loss gradient at each block's output (the backward signal).
- :func:`layer_gains`: backward Jacobian gain of each block.
- :func:`plot_gradient_flow`: several models' gradient flow on one log-scale PNG.
"""

from ._gradient_flow import activation_gradients, gradient_flow, layer_gains, plot_gradient_flow, weight_layers

__all__ = ["activation_gradients", "gradient_flow", "layer_gains", "plot_gradient_flow", "weight_layers"]
