"""The `actorvisor` command line: run the service, and talk to a running one.

    actorvisor run    [--listen HOST:PORT] [--state-dir DIR] [--boot-delay SECONDS] [...]
    actorvisor top    [--url URL] [--once] [--json] [--sort COLUMN] [--interval SECONDS]
    actorvisor demo   [--url URL] [--actor KEY] [--agent local|claude] [--prompt TEXT]
    actorvisor call   ACTOR ACTION [JSON_ARG ...]
    actorvisor events ACTOR [--after SEQ] [--follow]
    actorvisor shell  ACTOR [--command PROGRAM [ARG ...]]
    actorvisor network ACTOR [--allow HOST ...] [--deny HOST ...] [--reset]

Flags win over environment variables (ACTORVISOR_LISTEN, ACTORVISOR_STATE_DIR,
ACTORVISOR_BOOT_DELAY), which win over the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import faulthandler
import json
import os
import sys
from pathlib import Path
from typing import Any

from protocol.aio import DEFAULT_URL, Client
from protocol.errors import ActorvisorError
from protocol.names import ACTOR_KIND_VM

from .config import Config, parse_listen

# The dashboard's sort columns, listed here so `--help` needs neither rich nor psutil.
SORT_COLUMNS = ["key", "state", "pid", "up", "cpu", "rss", "uss", "threads", "files", "vm",
                "sessions", "conns", "subs", "events", "queue", "outq", "restarts", "heartbeat"]


def _default_url() -> str:
    listen = os.environ.get("ACTORVISOR_LISTEN")
    return f"http://{listen}" if listen else DEFAULT_URL


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def cmd_run(args: argparse.Namespace) -> int:
    from vmworker.logs import configure

    from .app import Supervisor, VmHostError

    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["host"], overrides["port"] = parse_listen(args.listen)
    if args.state_dir:
        overrides["state_dir"] = Path(args.state_dir)
    if args.runtime_dir:
        overrides["runtime_dir"] = Path(args.runtime_dir)
    if args.boot_delay is not None:
        overrides["boot_delay"] = args.boot_delay
    if args.log_level:
        overrides["log_level"] = args.log_level
    for name in ("spawner", "sleep_after", "stop_timeout", "hang_timeout", "worker_memory_mb",
                 "worker_open_files", "implicit_cursor_grace", "ring_size", "conn_queue_bytes",
                 "vm_memory_mb", "vm_pids", "vm_cpus", "vm_disk_mb", "unsafe_no_limits",
                 "vm_max_processes", "vm_max_shells", "vm_output_log_mb"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.network_allow:
        overrides["network_allow"] = tuple(args.network_allow)
    if args.preview_secret_file:
        overrides["preview_secret_file"] = Path(args.preview_secret_file)
    for name in ("allowed_hosts", "allowed_origins"):
        if getattr(args, name):
            overrides[name] = tuple(getattr(args, name))
    if args.insecure_no_auth:
        overrides["insecure_no_auth"] = True
    if args.metrics_public:
        overrides["metrics_public"] = True
    for name in ("max_running_actors", "max_creations_per_minute", "max_connections", "max_connections_per_address",
                 "header_timeout", "idle_timeout"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.cron_min_interval is not None:
        overrides["cron_min_interval"] = args.cron_min_interval
    config = Config.from_env(config_file=Path(args.config) if args.config else None, **overrides)
    if refusal := exposure_refusal(config):
        print(f"actorvisor: {refusal}", file=sys.stderr)
        return 2
    configure(config.log_level)
    # systemd's watchdog sends SIGABRT to a hung service: print every thread's stack first.
    faulthandler.enable()
    # Event logs, disk images and everything else under the state dir: the service's alone.
    os.umask(0o077)
    try:
        supervisor = Supervisor(config)
    except VmHostError as err:
        print(f"actorvisor: {err}", file=sys.stderr)
        return 2
    return asyncio.run(supervisor.run())


def exposure_refusal(config: Config) -> str | None:
    """Why this config must not start: a non-loopback listen that anyone could drive."""
    from .perimeter import is_loopback

    if is_loopback(config.host) or config.auth_token or config.tokens or config.insecure_no_auth:
        return None
    return (f"refusing to listen on {config.listen} with no token: anyone who can reach it "
            "could run commands in every VM. Set ACTORVISOR_AUTH_TOKEN (generate one with "
            "`actorvisor token`), or add [[tokens]] to the --config file, or listen on "
            "127.0.0.1, or pass --insecure-no-auth if a proxy in front already authenticates.")


def cmd_token(args: argparse.Namespace) -> int:
    from .auth import new_token

    token, digest = new_token()
    print(f"token: {token}\n"
          f"# for the config file (only the hash is stored):\n"
          f"[[tokens]]\nhash = \"{digest}\"\nrole = \"{args.role}\"")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from .dashboard import run_top

    return run_top(args.url, once=args.once, as_json=args.json, interval=args.interval,
                   sort=args.sort, reverse=args.reverse)


def _print_update(payload: dict[str, Any]) -> None:
    update = payload.get("event", {}).get("params", {}).get("update", {})
    kind = update.get("sessionUpdate")
    if kind in ("agent_message_chunk", "agent_thought_chunk"):
        text = update.get("content", {}).get("text", "")
        print(text if kind == "agent_message_chunk" else f"[thinking] {text}", end="", flush=True)
    elif kind == "tool_call":
        print(f"\n[tool] {update.get('title')} ({update.get('status')})", flush=True)
    elif kind == "tool_call_update":
        print(f"\n[tool] {update.get('toolCallId')} → {update.get('status')}", flush=True)


async def _demo(args: argparse.Namespace) -> int:
    prompt = args.prompt or (DEMO_PROMPT if args.agent == "local" else CLAUDE_DEMO_PROMPT)
    async with Client(args.url, token=os.environ.get("ACTORVISOR_AUTH_TOKEN")) as client:
        conn = await client.connect(ACTOR_KIND_VM, args.actor)
        conn.on("sessionEvent", _print_update)
        conn.on("vmBooted", lambda p: print(f"[vm booted in {p.get('bootMs')} ms]"))
        try:
            session = await conn.call("createSession", args.agent, {})
        except ActorvisorError as err:
            if args.agent == "claude":
                # The key is read where the agent runs: the service's environment.
                print(f"The claude agent could not start: {err.message}\n"
                      "Set ANTHROPIC_API_KEY in the actorvisor service's environment (and "
                      "ANTHROPIC_BASE_URL for a non-default endpoint), restart it, and run the "
                      "demo again; or run the demo with --agent local.", file=sys.stderr)
                await conn.close()
                return 2
            raise
        print(f"session {session['sessionId']} on actor {conn.actor_id}")
        result = await conn.call("sendPrompt", session["sessionId"], prompt)
        print(f"\n[turn ended: {result['stopReason']}]")
        try:
            content = await conn.call("readFile", "/workspace/hello.txt")
            print(f"/workspace/hello.txt: {content.decode(errors='replace')!r}")
        except ActorvisorError as err:
            print(f"/workspace/hello.txt: {err.message}")
        await conn.close()
    return 0


DEMO_PROMPT = ("Say hello.\nwrite /workspace/hello.txt: hello from the VM\n"
               "run: cat /workspace/hello.txt && uname -a")
CLAUDE_DEMO_PROMPT = ("Write a two-line greeting to /workspace/hello.txt, then run `uname -a` "
                      "and tell me in one sentence what kind of machine you are on.")


async def _call(args: argparse.Namespace) -> int:
    values = []
    for raw in args.args:
        try:
            values.append(json.loads(raw))
        except ValueError:
            values.append(raw)
    async with Client(args.url, token=os.environ.get("ACTORVISOR_AUTH_TOKEN")) as client:
        result = await client.action(ACTOR_KIND_VM, args.actor, args.action, *values)
    print(json.dumps(_jsonable(result), indent=2))
    return 0


async def _network(args: argparse.Namespace) -> int:
    """Show, set or reset one actor's egress policy (admin route; docs/network.md)."""
    import aiohttp

    from .actors import actor_id_for

    url = f"{args.url.rstrip('/')}/admin/actors/{actor_id_for(ACTOR_KIND_VM, args.actor)}/network"
    token = os.environ.get("ACTORVISOR_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        if args.reset:
            request = http.delete(url)
        elif args.allow or args.deny:
            request = http.put(url, json={"allow": args.allow or [], "deny": args.deny or []})
        else:
            request = http.get(url)
        async with request as response:
            body = await response.json(content_type=None)
    if response.status != 200:
        print(f"actorvisor: {body.get('message', body)}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    return 0


async def _events(args: argparse.Namespace) -> int:
    async with Client(args.url, token=os.environ.get("ACTORVISOR_AUTH_TOKEN")) as client:
        after = args.after
        while True:
            page = await client.action(ACTOR_KIND_VM, args.actor, "replayEvents",
                                       {"after": after, "limit": 1000})
            for event in page["events"]:
                print(json.dumps(_jsonable(event)))
            after = page["nextCursor"]
            if not page["hasMore"]:
                break
        if not args.follow:
            return 0
        conn = await client.connect(ACTOR_KIND_VM, args.actor)
        for name in ("sessionEvent", "permissionRequest", "permissionResolved", "vmBooted", "vmShutdown",
                     "cronEvent"):
            conn.subscribe(name, lambda p, name=name: print(json.dumps({"name": name, **_jsonable(p)}),
                                                            flush=True), after=after)
        await asyncio.Event().wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="actorvisor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the service")
    run.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:6420)")
    run.add_argument("--state-dir", help="where actors keep their files and logs (default .actorvisor)")
    run.add_argument("--runtime-dir", help="where the worker ipc socket lives "
                     "(default $RUNTIME_DIRECTORY, else a private dir under /tmp)")
    run.add_argument("--config", help="a TOML file of settings (names as in supervisor/config.py)")
    run.add_argument("--boot-delay", type=float, help="extra VM boot time, to emulate slow images")
    run.add_argument("--log-level", help="debug|info|warning|error")
    run.add_argument("--spawner", choices=["zygote", "subprocess"],
                     help="how workers are started (default zygote: forked from a warm process)")
    run.add_argument("--sleep-after", type=float, help="seconds an idle actor stays up (default 300)")
    run.add_argument("--cron-min-interval", type=float,
                     help="seconds: scheduleCron refuses a schedule that may fire more often (default 1)")
    run.add_argument("--stop-timeout", type=float, help="graceful drain budget on SIGTERM (default 10)")
    run.add_argument("--hang-timeout", type=float, help="a worker connection that answers no ping for this long is dropped; a dropped worker that is stopped, or not back within this again, is hung (default 10)")
    run.add_argument("--worker-memory-mb", type=int, help="address-space limit per worker")
    run.add_argument("--worker-open-files", type=int, help="open-files limit per worker")
    run.add_argument("--implicit-cursor-grace", type=float,
                     help="implicit cursor grace window in seconds (default 1; 0 turns it off)")
    run.add_argument("--ring-size", type=int, help="recent events kept in memory per actor")
    run.add_argument("--conn-queue-bytes", type=int, help="outbound bytes a connection may queue")
    run.add_argument("--vm-memory-mb", type=int, help="memory of each whole VM (default 2048)")
    run.add_argument("--vm-pids", type=int, help="processes and threads per VM (default 1024)")
    run.add_argument("--vm-cpus", type=float, help="CPU quota per VM, in cores (default 1.0)")
    run.add_argument("--vm-disk-mb", type=int,
                     help="disk of each VM: /workspace, /home and /tmp together (default 4096)")
    run.add_argument("--vm-max-processes", type=int,
                     help="running processes clients may spawn in each VM (default 64)")
    run.add_argument("--vm-max-shells", type=int, help="open shells per VM (default 16)")
    run.add_argument("--vm-output-log-mb", type=int,
                     help="output each process or shell keeps in the event log (default 8)")
    run.add_argument("--unsafe-no-limits", action="store_true", default=None,
                     help="run VMs even where their limits cannot be applied (not root, no "
                          "cgroups); never on a shared host")
    run.add_argument("--network-allow", action="append", metavar="HOST",
                     help="let every VM reach HOST (a name, *.domain or IP literal, optional "
                          ":PORT) through its egress proxy; repeatable (docs/network.md)")

    run.add_argument("--preview-secret-file",
                     help="the key that signs preview URLs, outside the state dir (default: "
                          "$CREDENTIALS_DIRECTORY/preview-secret, else /etc/actorvisor/preview-secret)")
    run.add_argument("--allowed-host", dest="allowed_hosts", action="append",
                     help="a Host name clients may use besides the listen address (repeatable)")
    run.add_argument("--allowed-origin", dest="allowed_origins", action="append",
                     help="a browser Origin allowed to call actions (repeatable)")
    run.add_argument("--metrics-public", action="store_true", help="/metrics without a token")
    run.add_argument("--max-running-actors", type=int,
                     help="running workers at once (default 300); more: actor.overloaded")
    run.add_argument("--max-creations-per-minute", type=int,
                     help="new actors each client address may create per minute (default 60)")
    run.add_argument("--max-connections", type=int,
                     help="open TCP connections (default 5000); more: 503 and close")
    run.add_argument("--max-connections-per-address", type=int,
                     help="open TCP connections from one client address (default 1000)")
    run.add_argument("--header-timeout", type=float,
                     help="seconds a client has to send a request head (default 10)")
    run.add_argument("--idle-timeout", type=float,
                     help="seconds an idle keep-alive HTTP connection stays open (default 30)")
    run.add_argument("--insecure-no-auth", action="store_true",
                     help="listen on a non-loopback address with no token (behind an "
                          "authenticating proxy only)")

    tok = sub.add_parser("token", help="generate a token and the hash for the config file")
    tok.add_argument("--role", default="client", choices=["client", "admin"])

    top = sub.add_parser("top", help="live dashboard of the supervisor and every worker")
    top.add_argument("--url", default=_default_url())
    top.add_argument("--once", action="store_true", help="print one sample and exit")
    top.add_argument("--json", action="store_true",
                     help="print samples as JSON, one object per line (with --once: one)")
    top.add_argument("--sort", default="cpu", choices=SORT_COLUMNS,
                     help="initial sort column (default cpu; < and > change it live)")
    top.add_argument("--reverse", action="store_true", help="reverse the sort order")
    top.add_argument("--interval", type=float, default=1.0,
                     help="seconds between samples (default 1); --once samples twice")

    demo = sub.add_parser("demo", help="the quickstart: a session, a prompt, its event stream")
    demo.add_argument("--url", default=_default_url())
    demo.add_argument("--actor", default="my-agent")
    demo.add_argument("--agent", default="local", choices=["local", "claude"])
    demo.add_argument("--prompt", help="what to ask (default: a prompt that shows tools and files)")

    call = sub.add_parser("call", help="call one action over HTTP and print its result")
    call.add_argument("actor")
    call.add_argument("action")
    call.add_argument("args", nargs="*", metavar="JSON_ARG")
    call.add_argument("--url", default=_default_url())

    events = sub.add_parser("events", help="print an actor's event log, optionally live")
    events.add_argument("actor")
    events.add_argument("--after", type=int, default=0)
    events.add_argument("--follow", action="store_true")
    events.add_argument("--url", default=_default_url())

    shell = sub.add_parser("shell", help="attach this terminal to a new shell in the actor's VM "
                           "(Ctrl-D or exit to leave)")
    shell.add_argument("actor")
    shell.add_argument("--command", dest="program", help="program to run in the terminal (default: bash -l, else sh)")
    shell.add_argument("args", nargs="*", metavar="ARG", help="its arguments (after --)")
    shell.add_argument("--url", default=_default_url())

    network = sub.add_parser("network", help="show or set one actor's egress policy (admin; "
                             "replaces the service default for it)")
    network.add_argument("actor", help="the vm actor's key")
    network.add_argument("--allow", action="append", metavar="HOST",
                         help="allow HOST (name, *.domain or IP literal, optional :PORT); repeatable")
    network.add_argument("--deny", action="append", metavar="HOST", help="deny HOST; repeatable")
    network.add_argument("--reset", action="store_true", help="back to the service default")
    network.add_argument("--url", default=_default_url())

    args = parser.parse_args(argv)
    try:
        match args.command:
            case "run":
                return cmd_run(args)
            case "top":
                return cmd_top(args)
            case "token":
                return cmd_token(args)
            case "demo":
                return asyncio.run(_demo(args))
            case "call":
                return asyncio.run(_call(args))
            case "events":
                return asyncio.run(_events(args))
            case "network":
                return asyncio.run(_network(args))
            case "shell":
                from .attach import attach
                return asyncio.run(attach(args.url, args.actor, args.program, args.args or None))
    except ActorvisorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
