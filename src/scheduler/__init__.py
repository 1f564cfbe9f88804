"""The per-machine scheduler: spawns, probes and restarts replica processes for the head."""
