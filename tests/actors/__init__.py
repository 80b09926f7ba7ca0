"""The actors (actors/): the guarantees as hypothesis properties, supervision, timeouts."""
