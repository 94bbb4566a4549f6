"""pcn-ep: predictive coding networks trained with equilibrium propagation."""
__version__ = "0.1.0"
