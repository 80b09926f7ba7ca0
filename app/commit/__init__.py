"""Stage 5: buffering results, the retry policy, committing."""
