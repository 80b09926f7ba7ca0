"""Stage 1 (app/intake/): intake credits, the prefetch window, claiming."""
