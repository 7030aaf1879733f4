"""SSH for the guest: the egress proxy (the guest's ``git``/``ssh`` reach allowed servers with a
key that stays on the host). ``VMOptions(ssh=SshProxyOptions(...))``; see docs/network.md."""

from .policy import (
    ALLOW,
    GitCommand,
    SshAllow,
    SshDeny,
    SshHostRule,
    SshProxyOptions,
    command_summary,
    git_policy,
    parse_git_command,
)

__all__ = [
    "ALLOW",
    "GitCommand",
    "SshAllow",
    "SshDeny",
    "SshHostRule",
    "SshProxyOptions",
    "command_summary",
    "git_policy",
    "parse_git_command",
]
