"""The `local` agent: offline and deterministic, for demos and tests.

Reads the prompt line by line (the language is documented in docs/local-agent.md):
`think: …` thinks aloud, `run: …` runs a shell command in the VM, `write PATH: …` writes
a file in the VM, `chunks: N` streams N numbered message chunks, `sleep: S` waits S
seconds (to exercise cancellation), and any other line is echoed back. Everything it says
is streamed as ACP updates in word groups. In `plan` mode it says what it would run or
write instead of doing it; at thought level `off` it keeps its thoughts to itself. Its
commands are the prompt's own lines, so it never asks for permission; it never calls the
network, and its reply text depends only on the prompt and on what the VM returns.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Final

from protocol.errors import ActorvisorError

from .base import (
    Agent,
    StopReason,
    ToolKind,
    ToolStatus,
    Turn,
    UpdateKind,
    chunk,
    tool_call,
    tool_call_update,
)

WORDS_PER_CHUNK: Final = 3
MAX_CHUNKS: Final = 100_000
MAX_SLEEP_S: Final = 600.0
EMPTY_REPLY: Final = "(empty prompt)\n"

_TOKEN: Final = re.compile(r"^\s+|\S+\s*")
_DIRECTIVE: Final = re.compile(r"^(think|run|chunks|sleep):\s?(.*)$")
_PACED: Final = re.compile(r"^(\d+)\s+at\s+(\d+(?:\.\d+)?)/s$")
MAX_RATE: Final = 100_000.0
_WRITE: Final = re.compile(r"^write\s+(\S+):\s?(.*)$")


def word_groups(text: str, size: int = WORDS_PER_CHUNK) -> list[str]:
    """Split text into chunks of `size` words; joining them gives `text` back exactly."""
    tokens = _TOKEN.findall(text)
    return ["".join(tokens[i:i + size]) for i in range(0, len(tokens), size)]


class LocalAgent(Agent):
    async def run_turn(self, prompt: str, turn: Turn) -> StopReason:
        said_anything = False
        for line in prompt.splitlines():
            if directive := _DIRECTIVE.match(line):
                verb, arg = directive.groups()
                said_anything |= await self._directive(turn, verb, arg)
            elif (write := _WRITE.match(line)) and turn.options.mode == "plan":
                await self._say(turn, f"Plan: would write {write[1]}.\n")
                said_anything = True
            elif write:
                await self._say(turn, await self._write(turn, write[1], write[2]))
                said_anything = True
            elif line.strip():
                await self._say(turn, f"You said: {line}\n")
                said_anything = True
        if not said_anything:
            await self._say(turn, EMPTY_REPLY)
        return StopReason.END_TURN

    async def _directive(self, turn: Turn, verb: str, arg: str) -> bool:
        """Run one `verb: arg` line; returns whether it added to the reply text."""
        match verb:
            case "think":
                if turn.options.thought_level == "off":
                    return False
                for group in word_groups(arg):
                    await turn.emit(chunk(UpdateKind.AGENT_THOUGHT_CHUNK, group))
                return False
            case "run":
                if turn.options.mode == "plan":
                    await self._say(turn, f"Plan: would run `{arg}`.\n")
                    return True
                await self._say(turn, await self._run(turn, arg))
                return True
            case "chunks":
                paced = _PACED.match(arg.strip())
                count_text, rate_text = paced.groups() if paced else (arg.strip(), None)
                count = int(count_text) if count_text.isdigit() else -1
                rate = float(rate_text) if rate_text else 0.0
                if not 0 <= count <= MAX_CHUNKS or not 0 <= rate <= MAX_RATE:
                    await self._say(turn, f"chunks: expected `N` or `N at R/s`, N from 0 to {MAX_CHUNKS}, "
                                          f"R up to {MAX_RATE:g}\n")
                    return True
                if rate:
                    await self._paced_chunks(turn, count, rate)
                    return count > 0
                for i in range(1, count + 1):
                    await turn.emit(chunk(UpdateKind.AGENT_MESSAGE_CHUNK, f"chunk {i} of {count}\n"))
                return count > 0
            case "sleep":
                try:
                    seconds = float(arg)
                except ValueError:
                    seconds = -1.0
                if not 0 <= seconds <= MAX_SLEEP_S:
                    await self._say(turn, f"sleep: expected seconds from 0 to {MAX_SLEEP_S:g}\n")
                    return True
                await asyncio.sleep(seconds)
                return False
        raise AssertionError(f"unhandled directive {verb}")

    @staticmethod
    async def _paced_chunks(turn: Turn, count: int, rate: float) -> None:
        """Emit at a fixed rate, each chunk stamped with its emission time (for latency)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(1, count + 1):
            delay = start + (i - 1) / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await turn.emit(chunk(UpdateKind.AGENT_MESSAGE_CHUNK,
                                  f"chunk {i} of {count} at {time.time():.6f}\n"))

    @staticmethod
    async def _say(turn: Turn, text: str) -> None:
        for group in word_groups(text):
            await turn.emit(chunk(UpdateKind.AGENT_MESSAGE_CHUNK, group))

    @staticmethod
    async def _run(turn: Turn, command: str) -> str:
        call_id = f"call_{uuid.uuid4().hex[:12]}"
        await turn.emit(tool_call(call_id, f"run: {command}", ToolKind.EXECUTE, {"command": command}))
        await turn.emit(tool_call_update(call_id, ToolStatus.IN_PROGRESS))
        try:
            result = await turn.exec(command)
        except ActorvisorError as exc:
            await turn.emit(tool_call_update(call_id, ToolStatus.FAILED, text=exc.message,
                                             raw_output={"error": exc.to_dict()}))
            return f"Could not run `{command}`: {exc.message}\n"
        status = ToolStatus.COMPLETED if result.exit_code == 0 else ToolStatus.FAILED
        await turn.emit(tool_call_update(call_id, status, text=result.stdout + result.stderr,
                                         raw_output=result.to_wire()))
        return f"Ran `{command}`: exit code {result.exit_code}.\n"

    @staticmethod
    async def _write(turn: Turn, path: str, text: str) -> str:
        call_id = f"call_{uuid.uuid4().hex[:12]}"
        data = text.encode()
        await turn.emit(tool_call(call_id, f"write {path}", ToolKind.EDIT,
                                  {"path": path, "content": text}))
        await turn.emit(tool_call_update(call_id, ToolStatus.IN_PROGRESS))
        try:
            await turn.write_file(path, data)
        except ActorvisorError as exc:
            await turn.emit(tool_call_update(call_id, ToolStatus.FAILED, text=exc.message,
                                             raw_output={"error": exc.to_dict()}))
            return f"Could not write {path}: {exc.message}\n"
        await turn.emit(tool_call_update(call_id, ToolStatus.COMPLETED,
                                         text=f"wrote {len(data)} bytes to {path}",
                                         raw_output={"path": path, "bytes": len(data)}))
        return f"Wrote {len(data)} bytes to {path}.\n"
