"""The supervisor: owns every client connection, subscription and worker process.

It is one asyncio process. It never awaits a worker while it opens, subscribes or closes
a connection; blocking work (SQLite reads, psutil sampling) goes to threads.
"""

__version__ = "0.1.0"
