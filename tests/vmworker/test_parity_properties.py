"""Generated bad input for agentOS's filesystem actions on the in-process actor: wrong
types, huge arrays, paths that escape (also through a symlink) give precise errors, never
another exception, and the worker is unharmed afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ActorvisorError, ErrorCode

from .conftest import InProcessActor

EXAMPLES = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8) | st.binary(max_size=8)
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
paths = st.sampled_from([
    "/workspace/p/a.txt", "/workspace/p", "/workspace/p/", "p/rel.txt", "/workspace/../../etc/passwd",
    "../../x", "/etc/passwd", "/proc/self/root/etc", "/workspace/out/etc/passwd", "/workspace/out",
    "/tmp/x", "/", "", "/workspace/\0nul", "/workspace/" + "n" * 5000, "/workspace", "/workspace/p/b",
]) | st.text(max_size=12) | junk
contents = st.text(max_size=16) | st.binary(max_size=16) | junk


def huge(item: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """A list past every batch limit, built without making hypothesis generate it."""
    return st.tuples(item, st.integers(min_value=1001, max_value=30_000)).map(lambda t: [t[0]] * t[1])


CALLS: dict[str, st.SearchStrategy[list[Any]]] = {
    "writeFiles": st.tuples(
        st.lists(st.fixed_dictionaries({"path": paths, "content": contents}), max_size=4)
        | huge(st.just({"path": "/workspace/p/h", "content": "x"})) | junk).map(list),
    "readFiles": st.tuples(st.lists(paths, max_size=4) | huge(st.just("/workspace/p/a.txt")) | junk).map(list),
    "readdirRecursive": st.tuples(paths, st.none() | junk | st.fixed_dictionaries(
        {}, optional={"maxDepth": st.integers(-3, 100) | junk,
                      "exclude": st.lists(st.text(max_size=6), max_size=3) | huge(st.just("x")) | junk})).map(list),
    "move": st.tuples(paths, paths).map(list),
    "delete": st.tuples(paths, st.none() | junk | st.fixed_dictionaries({"recursive": st.booleans() | junk})).map(list),
    "execArgv": st.tuples(st.sampled_from(["/bin/echo", "/bin/true", "echo", "/workspace/out/bin/sh", ""]) | paths,
                          st.lists(st.text(max_size=8), max_size=4) | huge(st.just("a")) | junk,
                          st.none() | junk | st.fixed_dictionaries(
                              {}, optional={"cwd": paths, "timeoutMs": st.integers(-5, 5000) | junk,
                                            "env": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)
                                            | junk})).map(list),
}


async def test_new_filesystem_actions_refuse_generated_bad_input_precisely(actor: InProcessActor) -> None:
    await actor.call("exec", "mkdir -p /workspace/p && echo a > /workspace/p/a.txt && ln -s / /workspace/out")
    loop = asyncio.get_running_loop()
    outcomes: dict[str, set[str]] = {name: set() for name in CALLS}

    def run(name: str, args: list[Any]) -> None:
        future = asyncio.run_coroutine_threadsafe(actor.call(name, *args), loop)
        try:
            future.result(60)
        except ActorvisorError as err:
            assert err.code not in (ErrorCode.INTERNAL, ErrorCode.WORKER_CRASHED), (name, args, err)
            assert err.message, (name, args)
            if err.code is ErrorCode.INVALID_ARGS:  # names the action, or the program it could not run
                assert err.message.startswith((name, f"{args[0]}: ")), (name, args, err.message)
            outcomes[name].add(err.code.value)
        else:
            outcomes[name].add("ok")

    def fuzz_one(name: str, strategy: st.SearchStrategy[list[Any]]) -> None:
        @EXAMPLES
        @given(strategy)
        def check(args: list[Any]) -> None:
            run(name, args)
        check()

    def fuzz() -> None:
        for name, strategy in CALLS.items():
            fuzz_one(name, strategy)

    await asyncio.to_thread(fuzz)
    # Each action was both refused and, some of the time, carried out.
    for name, seen in outcomes.items():
        assert "actor.invalid_args" in seen or "actor.invalid_path" in seen, (name, seen)
    # Unharmed: it still runs commands and its system files are all there.
    result: Any = await actor.call("execArgv", "/bin/echo", ["still", "here"])
    assert result["stdout"] == "still here\n"
    result = await actor.call("exec", "test -s /etc/passwd && test -x /bin/sh && echo intact")
    assert result["stdout"] == "intact\n"
