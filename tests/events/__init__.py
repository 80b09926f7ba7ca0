"""Stages 6-7 (app/events/): the outbox relay, against a real RabbitMQ too."""
