"""The algorithm library: energy models, nudged equilibria, gradient estimators. Imports torch only (never data, training, tools or experiments)."""
from .energy import COSTS, Cost, CrossEntropy, SquaredError, energy, get_cost
from .equilibrium import (ORDERS, PERTURBATIONS, POOL_ROUTINGS, RULES, Dynamics, Interrupted,
                          NudgedState, nudged_phase)
from .estimators import (SCHEMES, Backprop, DivergenceError, Estimate, EquilibriumPropagation,
                         all_finite, compile_estimator, gradient_fidelity)
from .layers import GenericLayer, Layer, PCNLayer
from .networks import (MLP, as_generic, NETWORKS, NORMS, PCN, VGG5, VGG10, FreeState, ResNetPCN, Residual,
                       VGG10Skip)

__all__ = [
    "COSTS", "Cost", "CrossEntropy", "SquaredError", "energy", "get_cost", "ORDERS", "PERTURBATIONS",
    "POOL_ROUTINGS", "RULES", "Dynamics", "Interrupted", "NudgedState", "nudged_phase", "SCHEMES", "Backprop", "DivergenceError",
    "Estimate", "EquilibriumPropagation", "all_finite", "compile_estimator", "gradient_fidelity", "PCNLayer", "MLP", "NETWORKS", "PCN", "VGG5", "VGG10",
    "FreeState", "VGG10Skip", "GenericLayer", "as_generic", "Layer", "NORMS", "ResNetPCN", "Residual",
]
