"""The worker process: wiring the actors, start-up, health and the staged stop."""
