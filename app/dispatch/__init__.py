"""Stage 4: the handler pool and running one attempt of a step."""
