"""The `gridserve` command: run a role (head, scheduler, replica, proxy), manage the cluster, or `up`."""
from gridserve.cli.main import main

__all__ = ["main"]
