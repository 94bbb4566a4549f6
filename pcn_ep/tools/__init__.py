"""Diagnostics on top of the core (gradcheck, bench, energy traces). May import core, data and training, never experiments."""
