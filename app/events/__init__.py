"""Stages 6-7: the outbox relay and the broker."""
