"""Helpers every test layer shares: waiting on conditions, free ports, clusters, fakes and the tiny model."""
