"""vmworker: the process that hosts one actor — its VM sandbox, sessions and event log.

Started by the supervisor as `python -m vmworker ...` (see `vmworker.main`); everything
it says goes to the supervisor over one ZeroMQ DEALER socket, persisted first.
"""
