"""Health: the durable gap ledger (and, later, sink probes)."""
