"""app/cli/: the duplex command, driven in subprocesses."""
