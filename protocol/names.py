"""Names shared by every side: actions of the `vm` actor, events, agents, worker phases."""

from __future__ import annotations

from enum import StrEnum

ACTOR_KIND_VM = "vm"
"""The one built-in actor kind (the agentOS quickstart uses `client.vm.getOrCreate(...)`)."""

ACTOR_KINDS = frozenset({ACTOR_KIND_VM})


class ActionName(StrEnum):
    CREATE_SESSION = "createSession"
    SEND_PROMPT = "sendPrompt"
    CANCEL_PROMPT = "cancelPrompt"
    CLOSE_SESSION = "closeSession"
    LIST_SESSIONS = "listSessions"
    GET_SESSION_EVENTS = "getSessionEvents"
    REPLAY_EVENTS = "replayEvents"
    RESPOND_PERMISSION = "respondPermission"
    READ_FILE = "readFile"
    WRITE_FILE = "writeFile"
    READDIR = "readdir"
    STAT = "stat"
    MKDIR = "mkdir"
    EXISTS = "exists"
    DELETE_FILE = "deleteFile"
    EXEC = "exec"
    GET_RUNTIME_HEALTH = "getRuntimeHealth"
    SPAWN = "spawn"
    WRITE_PROCESS_STDIN = "writeProcessStdin"
    CLOSE_PROCESS_STDIN = "closeProcessStdin"
    KILL_PROCESS = "killProcess"
    STOP_PROCESS = "stopProcess"
    WAIT_PROCESS = "waitProcess"
    LIST_PROCESSES = "listProcesses"
    GET_PROCESS = "getProcess"
    OPEN_SHELL = "openShell"
    WRITE_SHELL = "writeShell"
    RESIZE_SHELL = "resizeShell"
    CLOSE_SHELL = "closeShell"
    WAIT_SHELL = "waitShell"
    LIST_SHELLS = "listShells"
    GET_NETWORK_POLICY = "getNetworkPolicy"
    VM_FETCH = "vmFetch"
    CREATE_SIGNED_PREVIEW_URL = "createSignedPreviewUrl"   # answered by the supervisor
    EXPIRE_SIGNED_PREVIEW_URL = "expireSignedPreviewUrl"   # answered by the supervisor
    # agentOS parity (docs/agentos-parity.md)
    PROMPT = "prompt"
    CANCEL_SESSION = "cancelSession"
    DESTROY_SESSION = "destroySession"
    LIST_PERSISTED_SESSIONS = "listPersistedSessions"
    SET_MODEL = "setModel"
    SET_MODE = "setMode"
    SET_THOUGHT_LEVEL = "setThoughtLevel"
    GET_MODES = "getModes"
    GET_CONFIG_OPTIONS = "getConfigOptions"
    GET_SEQUENCED_EVENTS = "getSequencedEvents"
    WRITE_FILES = "writeFiles"
    READ_FILES = "readFiles"
    READDIR_RECURSIVE = "readdirRecursive"
    MOVE = "move"
    DELETE = "delete"
    EXEC_ARGV = "execArgv"


class EventName(StrEnum):
    SESSION_EVENT = "sessionEvent"
    PERMISSION_REQUEST = "permissionRequest"
    PERMISSION_RESOLVED = "permissionResolved"
    VM_BOOTED = "vmBooted"
    VM_SHUTDOWN = "vmShutdown"
    VM_LIMIT = "vmLimit"
    PROCESS_OUTPUT = "processOutput"
    PROCESS_EXIT = "processExit"
    SHELL_DATA = "shellData"
    SHELL_EXIT = "shellExit"
    OUTPUT_COMPACTED = "processOutputCompacted"
    NETWORK_REQUEST = "networkRequest"
    SESSION_DESTROYED = "sessionDestroyed"


class AgentType(StrEnum):
    LOCAL = "local"
    CLAUDE = "claude"


class WorkerPhase(StrEnum):
    """What a worker reports about its VM in `phase` messages."""

    BOOTING = "booting"
    READY = "ready"
    FAILED = "failed"
    STOPPING = "stopping"


class ShutdownReason(StrEnum):
    SLEEP = "sleep"
    DESTROY = "destroy"
    CRASH = "crash"
    HANG = "hang"
    ERROR = "error"
