"""Defaults shared by the library and its users, importable without JAX."""

# VDM's noise-schedule endpoints for continuous data (Kingma et al. 2021, arXiv:2107.00630):
# log-SNR from +13.3 (almost clean) down to -5 (almost pure noise); gamma = -log SNR.
GAMMA_MIN = -13.3
GAMMA_MAX = 5.0
