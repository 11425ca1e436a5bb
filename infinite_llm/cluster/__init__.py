"""Instances (ranks) of the cluster."""
