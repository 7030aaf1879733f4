"""Every cookbook recipe runs offline (scripted model, no API key) against a real VM."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm
ROOT = Path(__file__).parents[2]
OFFLINE_ENV = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("mcp_client.py", ["server offers 16 tools", "progress: /workspace/count.sh: running",
                           "exit_code: 0", "via the resource template: for i in 1 2 3"]),
        ("langchain_agent.py", ["[exit_code=0]", "sandbox says: 2 3 5 7 11 13 17 19 23 29 31 37 41 43 47"]),
        ("openai_loop.py", ["-> sandbox_create", "Kernel and Python: 6.", "sandboxes left running: 0"]),
        ("anthropic_loop.py", ["exit_code: 1", "exit_code: 0",
                               "sandbox says: 1 2 Fizz 4 Buzz Fizz 7 8 Fizz Buzz 11 Fizz 13 14 FizzBuzz"]),
        ("secret_injection.py", ["token in the sandbox: GONDOLIN_SECRET_", '"user": "demo"',
                                 "[REDACTED:DEMO_API_TOKEN]", "example.com answered 403",
                                 "the API received the real token: True", "the token appeared in a tool result: False"]),
        ("data_task.py", ["uploaded", "downloaded", "north  orders="]),
        ("deepagents_sandbox.py", ["-> edit_file", "[exit_code=1]", "[exit_code=0]", "sandbox says: 4.5 (exit_code 0)"]),
        ("openai_agents_sandbox.py", ["token seen by the guest: GONDOLIN_SECRET_", "checkpoints: ['openai-agents-",
                                      "hits=2 | server.py"]),
    ],
)
def test_recipe_runs_offline(recipe, expected):
    p = subprocess.run([sys.executable, str(ROOT / "cookbook" / recipe)], cwd=ROOT, env=OFFLINE_ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "scripted" in p.stdout
    for needle in expected:
        assert needle in p.stdout, f"{needle!r} missing from:\n{p.stdout}\n{p.stderr}"
