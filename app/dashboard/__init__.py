"""``duplex dashboard``: tasks, their DAGs, attempts and workers in a browser, read from SQL.

pages.py       what each page shows (queries in ``duplex.storage.dashboard_list`` and
               ``duplex.storage.dashboard_detail``)
graph.py       the DAG's layered layout
timeline.py    attempts and the timeline, from the transition rows
security.py    binding rule, login sessions, CSRF tokens
server.py      the WSGI app: routes, guards, rendering, error pages
actions.py     the operator forms (cancel, retry, resolve, complete, signal) once guarded
web.py         requests, responses, forms, redirects and cookies over WSGI
formatting.py  how templates show states, times and durations
templates/     Jinja2 pages;  static/  the one script and style sheet (nothing from the web)
"""

from duplex.dashboard.server import Dashboard

__all__ = ["Dashboard"]
