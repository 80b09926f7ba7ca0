"""app/storage/: every SQL statement, on SQLite and PostgreSQL; the step state machine."""
