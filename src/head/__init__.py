"""The head controller: deployments, node registry, placement, routing tables, proxy supervision."""
