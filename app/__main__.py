"""``python -m duplex`` and the ``duplex`` console script.

For ``duplex run`` the stop signals are installed first, before the CLI's imports
(SQLAlchemy, Alembic, the actors): a SIGTERM during start-up is then honoured (the worker
stops before serving) rather than killing the process by the default action.
"""

import sys


def main() -> int:
    from duplex.worker.startup import runs_the_worker, stop_signals

    if runs_the_worker(sys.argv[1:]):
        stop_signals()
    from duplex.cli.main import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
