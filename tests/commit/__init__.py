"""Stage 5 (app/commit/): the commit buffer, the retry policy, the committer."""
