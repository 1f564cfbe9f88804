"""The HTTP front door: routes client requests to replicas over gRPC and streams tokens back."""
