"""Pydantic input and output models of every tool: the single source of every schema.

Inputs are written so that their JSON Schema survives OpenAI strict mode: closed objects, no
free-form maps (environment variables are a list of ``{name, value}``), optional fields are
nullable with a default, enums for modes. Descriptions are the model's documentation.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from gondolin.options import MountMode

SandboxId = Annotated[str, Field(description="Id returned by sandbox_create (see sandbox_list).")]
ExecId = Annotated[str, Field(description="Id returned by exec when the command was still running.")]
GuestPath = Annotated[str, Field(description="Absolute path inside the sandbox, e.g. /workspace/main.py.")]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnvVar(_Input):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Variable name.")
    value: str = Field(description="Variable value.")


class MountRequest(_Input):
    host_path: str = Field(description="Absolute host directory; must be inside a root the operator approved.")
    guest_path: str | None = Field(default=None, description="Absolute mount point in the sandbox (default: the root's "
                                                     "configured mount point, else /mnt/<directory name>).")
    mode: MountMode | None = Field(
        default=None, description="ro: read-only; cow: writable, changes stay in the sandbox; rw: writes reach the host. "
                          "Default: the most the approved root allows, but never rw unless asked.")


# -- sandbox lifecycle -----------------------------------------------------------------------------
class SandboxCreateInput(_Input):
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                             description="Optional label to recognise the sandbox in sandbox_list.")
    image: str | None = Field(default=None, description="Guest image (default: the server's default image).")
    cpus: int | None = Field(default=None, ge=1, le=64, description="Virtual CPUs (default from the server).")
    memory_mb: int | None = Field(default=None, ge=128, le=65536, description="Guest memory in MiB (default from the server).")
    network: str | None = Field(default=None, description="Network profile name configured by the operator "
                                                  "(default: the server's default profile).")
    secrets: list[str] | None = Field(default=None, description="Names of operator-configured secrets to make usable. "
                                                        "The sandbox sees only a placeholder in $NAME; the real "
                                                        "value is substituted on the way out to allowed hosts.")
    mounts: list[MountRequest] | None = Field(default=None, description="Host directories to mount (operator-approved only).")
    env: list[EnvVar] | None = Field(default=None, description="Environment variables for every command in the sandbox.")
    from_checkpoint: str | None = Field(default=None, description="Start from this checkpoint_id instead of a fresh VM.")
    ttl_s: int | None = Field(default=None, ge=10, description="Destroy the sandbox after this many idle seconds "
                                                       "(default from the server).")


class MountInfo(_Output):
    guest_path: str
    host_path: str
    mode: MountMode


class SandboxInfo(_Output):
    sandbox_id: str
    name: str | None
    status: Literal["running", "stopped"]
    image: str
    cpus: int
    memory_mb: int
    network: str = Field(description="Network profile name.")
    network_summary: str
    secrets: list[str] = Field(description="Bound secret names (never values).")
    mounts: list[MountInfo]
    created_at: str = Field(description="ISO 8601 UTC.")
    expires_at: str = Field(description="ISO 8601 UTC; each tool call on the sandbox pushes this back.")
    ttl_s: int
    running_execs: int
    from_checkpoint: str | None = None


class SandboxListInput(_Input):
    pass


class SandboxListOutput(_Output):
    sandboxes: list[SandboxInfo]
    max_sandboxes: int
    network_profiles: list[str]
    secrets: list[str] = Field(description="Secret names the operator configured (values never shown).")
    images: list[str]


class SandboxDestroyInput(_Input):
    sandbox_id: SandboxId


class SandboxDestroyOutput(_Output):
    sandbox_id: str
    destroyed: bool


# -- exec ------------------------------------------------------------------------------------------
class ExecInput(_Input):
    sandbox_id: SandboxId
    command: str = Field(description="Shell command, run with /bin/sh -c (pipes, &&, redirects work).")
    cwd: str | None = Field(default=None, description="Absolute working directory (default /workspace if it exists, else /).")
    env: list[EnvVar] | None = Field(default=None, description="Extra environment variables for this command.")
    stdin: str | None = Field(default=None, description="Text sent to the command's stdin (then closed, unless stdin_open).")
    stdin_open: bool | None = Field(default=None, description="Keep stdin open for exec_write (interactive programs).")
    user: str | None = Field(default=None, description="Run as this guest user (default root; 'agent' is unprivileged).")
    timeout_s: float | None = Field(default=None, gt=0, le=86400,
                                    description="Kill the command after this many seconds in total (default 120).")
    yield_s: float | None = Field(default=None, ge=0, le=600,
                                  description="Wait at most this long for the command to finish (default 10); if "
                                              "it is still running, return status 'running' and an exec_id to use "
                                              "with exec_poll, exec_write and exec_kill.")
    max_output_bytes: int | None = Field(default=None, ge=256, le=1048576,
                                         description="Show at most this many bytes per stream (head and tail kept).")


class ExecOutput(_Output):
    exec_id: str
    status: Literal["exited", "running", "timed_out", "killed"]
    exit_code: int | None = Field(description="Exit code once finished; non-zero is a normal result.")
    signal: int | None
    stdout: str = Field(description="Output since the previous exec/exec_poll of this exec_id (head+tail if long).")
    stderr: str
    stdout_bytes: int = Field(description="Bytes the command wrote to stdout so far, in total.")
    stderr_bytes: int
    truncated: bool = Field(description="True when output bytes were left out of stdout/stderr.")
    omitted_bytes: int
    duration_s: float


class ExecPollInput(_Input):
    sandbox_id: SandboxId
    exec_id: ExecId
    wait_s: float | None = Field(default=None, ge=0, le=600,
                                 description="Wait up to this long for the command to finish (default 10).")
    max_output_bytes: int | None = Field(default=None, ge=256, le=1048576, description="Show at most this many bytes per stream.")


class ExecWriteInput(_Input):
    sandbox_id: SandboxId
    exec_id: ExecId
    stdin: str | None = Field(default=None, description="Text to write to the command's stdin (include \\n for a new line).")
    close_stdin: bool | None = Field(default=None, description="Close stdin after writing (end of input).")


class ExecWriteOutput(_Output):
    exec_id: str
    written_bytes: int
    stdin_closed: bool
    status: Literal["exited", "running", "timed_out", "killed"]


class ExecKillInput(_Input):
    sandbox_id: SandboxId
    exec_id: ExecId
    signal: Literal["KILL", "TERM", "INT", "HUP"] | None = Field(default=None, description="Signal to send (default KILL).")


# -- files -----------------------------------------------------------------------------------------
class ReadFileInput(_Input):
    sandbox_id: SandboxId
    path: GuestPath
    offset: int | None = Field(default=None, ge=1, description="First line to read, 1-based (text files).")
    limit: int | None = Field(default=None, ge=1, description="Number of lines to read (default: up to the size cap).")
    byte_offset: int | None = Field(default=None, ge=0, description="Read bytes from this offset instead of lines.")
    byte_length: int | None = Field(default=None, ge=1, description="Number of bytes to read with byte_offset.")
    encoding: Literal["auto", "text", "base64"] | None = Field(
        default=None, description="auto (default): text for UTF-8 files, base64 for binary ones.")


class ReadFileOutput(_Output):
    path: str
    content: str
    encoding: Literal["text", "base64"]
    size_bytes: int = Field(description="Size of the whole file.")
    start_line: int | None = Field(description="First line returned (line reads).")
    end_line: int | None
    total_lines: int | None
    byte_offset: int
    bytes_returned: int
    truncated: bool = Field(description="True when the file continues past what was returned.")
    next_offset: int | None = Field(default=None, description="When truncated: the line to pass as offset to "
                                                              "read on.")
    next_byte_offset: int | None = Field(default=None, description="When truncated and reading by bytes (or a "
                                                                   "line longer than the cap): the byte_offset "
                                                                   "to read on.")


class WriteFileInput(_Input):
    sandbox_id: SandboxId
    path: GuestPath
    content: str = Field(description="The new contents (the whole file unless append).")
    encoding: Literal["text", "base64"] | None = Field(default=None, description="How content is encoded (default text).")
    append: bool | None = Field(default=None, description="Append instead of replacing.")
    mode: str | None = Field(default=None, description="Octal permissions for a new file, e.g. '0755' for a script.")


class WriteFileOutput(_Output):
    path: str
    size_bytes: int = Field(description="Size of the file after writing.")
    written_bytes: int
    sha256: str = Field(description="SHA-256 of the bytes written.")
    created: bool


class EditFileInput(_Input):
    sandbox_id: SandboxId
    path: GuestPath
    old_string: str = Field(description="Exact text to replace (must occur once unless replace_all).")
    new_string: str = Field(description="Replacement text.")
    replace_all: bool | None = Field(default=None, description="Replace every occurrence.")


class EditFileOutput(_Output):
    path: str
    replacements: int
    size_bytes: int


class ListFilesInput(_Input):
    sandbox_id: SandboxId
    path: str | None = Field(default=None, description="Directory to list (default /workspace).")
    recursive: bool | None = Field(default=None, description="Descend into subdirectories.")
    glob: str | None = Field(default=None, description="Only entries matching this glob: '*.py' matches names at any "
                                               "depth, 'src/**/*.py' matches paths relative to path.")
    max_entries: int | None = Field(default=None, ge=1, le=100000, description="Return at most this many entries (default 500).")
    include_hidden: bool | None = Field(default=None, description="Include names starting with '.' (default false).")


class FileEntry(_Output):
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size_bytes: int
    mode: str
    mtime: str


class ListFilesOutput(_Output):
    path: str
    entries: list[FileEntry]
    truncated: bool
    visited: int


# -- checkpoints -----------------------------------------------------------------------------------
class CheckpointCreateInput(_Input):
    sandbox_id: SandboxId
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Optional label.")
    disk_only: bool | None = Field(default=None, description="Save only the disk (processes are not kept). Default false.")


class CheckpointInfo(_Output):
    checkpoint_id: str
    sandbox_id: str
    name: str | None
    created_at: str
    size_bytes: int
    disk_only: bool


class CheckpointRestoreInput(_Input):
    checkpoint_id: str = Field(description="Id returned by checkpoint_create (see checkpoint_list).")
    sandbox_id: str | None = Field(default=None, description="Roll this sandbox back in place (its current state is lost). "
                                                     "Omit to start a new sandbox from the checkpoint.")


class CheckpointListInput(_Input):
    sandbox_id: str | None = Field(default=None, description="Only checkpoints taken from this sandbox.")


class CheckpointListOutput(_Output):
    checkpoints: list[CheckpointInfo]


# -- network ---------------------------------------------------------------------------------------
class NetworkEventsInput(_Input):
    sandbox_id: SandboxId
    limit: int | None = Field(default=None, ge=1, le=1000, description="Most recent events to return (default 50).")
    decision: Literal["all", "allowed", "blocked"] | None = Field(default=None, description="Filter (default all).")


class NetworkEvent(_Output):
    time: str
    method: str
    url: str
    status: int | None
    decision: str = Field(description="allowed, blocked, answered, rejected or error.")
    reason: str
    secrets: list[str]


class NetworkEventsOutput(_Output):
    sandbox_id: str
    network: str
    allowed_hosts: list[str]
    events: list[NetworkEvent]


# -- access ----------------------------------------------------------------------------------------
class ExposePortInput(_Input):
    sandbox_id: SandboxId
    port: int = Field(ge=1, le=65535, description="TCP port of an HTTP server in the sandbox (it must listen on "
                                                  "127.0.0.1 or 0.0.0.0).")


class ExposePortOutput(_Output):
    sandbox_id: str
    port: int
    url: str = Field(description="Address on the host that reaches the server; give it to the user.")
    listening: bool = Field(description="Whether a server accepted a connection on the port just now; requests "
                                        "get 502 Bad Gateway until one does.")
