"""Operating a worker: heartbeat, metrics, JSON logs, the hardened Redis transport, the launcher."""
