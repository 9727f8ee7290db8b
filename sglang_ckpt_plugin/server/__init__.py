"""Server side: plugin entry point, hooks, readiness gate, HTTP routes, TP-worker receiver."""
