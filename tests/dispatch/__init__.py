"""Stage 4 (app/dispatch/): the handler pool, running one attempt, slot credits."""
