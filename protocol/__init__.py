"""Sans-I/O protocol core shared by the supervisor, the workers and the Python client.

This package owns every byte format actorvisor speaks: the RivetKit client protocol v4
(bare, json, cbor), the supervisor⇄worker messages, the action and event names and the
error codes. It never opens a socket, never touches an event loop and never reads a file.
"""
