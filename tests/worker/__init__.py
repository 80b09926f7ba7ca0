"""app/worker/: wiring, start-up, the watchdog and heartbeat."""
