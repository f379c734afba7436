"""The in-VM bridge: a loopback TCP port forwarded to a Unix socket (stdlib only).

Runs inside the VM as `python3 netbridge.py LISTEN_PORT UNIX_PATH`, started by the worker
through the init at boot: the VM has loopback only, so programs that honour HTTP_PROXY
(which names a TCP address) reach the worker's proxy through this bridge and the Unix
socket bound into the sandbox. It decides nothing: the proxy at the other end does.
A Python program rather than code in vminit.c so the init stays a small, audited spawner;
python3 comes read-only from the host's /usr. It must import nothing of this project.
"""

import asyncio
import sys


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while chunk := await src.read(262144):
            dst.write(chunk)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except OSError:
        pass


async def _serve(unix_path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        up_r, up_w = await asyncio.open_unix_connection(unix_path)
    except OSError:
        writer.close()
        return
    try:
        await asyncio.gather(_copy(reader, up_w), _copy(up_r, writer))
    finally:
        up_w.close()
        writer.close()


async def main(port: int, unix_path: str) -> None:
    server = await asyncio.start_server(lambda r, w: _serve(unix_path, r, w), "127.0.0.1", port)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
