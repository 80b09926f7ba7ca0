"""The actors (actors/): the guarantees and random workflows as hypothesis properties,
supervision, timeouts."""
