"""Simulation environments that policies are evaluated in."""
