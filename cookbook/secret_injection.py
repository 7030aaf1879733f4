"""Secret injection: the sandbox calls an API with a token it can never read.

    python cookbook/secret_injection.py              # offline, scripted model
    ANTHROPIC_API_KEY=... python cookbook/secret_injection.py   # real Claude

The operator configures a secret by name (its value comes from the host environment) and where
it may be sent: host, port and scheme. Inside the sandbox ``$DEMO_API_TOKEN`` is only a placeholder; the host
swaps in the real value on the way out, and only towards the allowed host. The API here is a
local test server that echoes the Authorization header back, so you can watch the value come
back redacted from every tool result.
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import threading

import anyio
from _offline import anthropic_client, banner, last_tool_text, tool_use

from integrations import NetworkProfile, OperatorConfig, SandboxManager, SecretSpec, ToolRegistry
from integrations.anthropic_tools import AnthropicDispatcher

MODEL = os.environ.get("ANTHROPIC_MODEL", "claude-sonnet-4-5")
TOKEN = secrets.token_urlsafe(24)  # the operator's real credential (here: made up for the demo)
received: list[str] = []


class DemoAPI(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        auth = self.headers.get("Authorization", "")
        received.append(auth)
        ok = auth == f"Bearer {TOKEN}"
        body = json.dumps({"user": "demo" if ok else None, "you_sent": auth}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def script(port: int) -> list:
    curl = (f"curl -sS -m 10 --resolve localhost:{port}:192.0.2.1 -H \"Authorization: Bearer $DEMO_API_TOKEN\" "
            f"http://localhost:{port}/me")
    state: dict = {}

    def sid(body: dict) -> str:
        if "sid" not in state:
            state["sid"] = json.loads(last_tool_text(body))["sandbox_id"]
        return state["sid"]

    return [
        {"content": [tool_use("sandbox_create", {"network": "demo-api", "secrets": ["DEMO_API_TOKEN"]})]},
        lambda b: {"content": [tool_use("exec", {"sandbox_id": sid(b), "command": "echo token in the sandbox: "
                                                                                 "$DEMO_API_TOKEN"})]},
        lambda b: {"content": [tool_use("exec", {"sandbox_id": state["sid"], "command": curl}, 2)]},
        lambda b: {"content": [tool_use("exec", {"sandbox_id": state["sid"], "command": (
            "curl -sS -m 10 -o /dev/null -w 'example.com answered %{http_code}\\n' "
            "-H \"Authorization: Bearer $DEMO_API_TOKEN\" http://example.com/")}, 3)]},
        lambda b: {"content": [tool_use("network_events", {"sandbox_id": state["sid"]})]},
        lambda b: {"content": [tool_use("sandbox_destroy", {"sandbox_id": state["sid"]})]},
        {"content": [{"type": "text", "text": "The API accepted the request as user 'demo'. The token was never "
                                              "visible in the sandbox, and the request to example.com was blocked."}]},
    ]


async def main() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DemoAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    config = OperatorConfig(
        network_profiles={"demo-api": NetworkProfile(
            allowed_hosts=("localhost",), allowed_internal_hosts=("localhost",),
            description=f"HTTP to the demo API on localhost:{port} only")},
        # A secret goes over https to port 443 unless its scope says otherwise: this demo API is
        # plain http on an ephemeral port, so the scope names both.
        secrets={"DEMO_API_TOKEN": SecretSpec(hosts=(f"localhost:{port}",), schemes=("http",),
                                              description="token for the demo API")},
    )
    client, real = anthropic_client(script(port))
    banner("Secret injection", real, "ANTHROPIC")
    task = (f"Call the demo API at http://localhost:{port}/me from a sandbox with the network profile 'demo-api' "
            f"and the secret DEMO_API_TOKEN (send it as a Bearer token). Inside the sandbox use curl with "
            f"--resolve localhost:{port}:192.0.2.1 so the request leaves the VM. Also check whether the token "
            "could be sent to example.com, look at the sandbox's network events, then destroy the sandbox.")
    transcript: list[str] = []
    async with SandboxManager(config, environ={"DEMO_API_TOKEN": TOKEN}) as manager:
        dispatcher = AnthropicDispatcher(ToolRegistry(manager))
        messages: list = [{"role": "user", "content": task}]
        for _ in range(16):
            reply = await client.messages.create(model=MODEL, max_tokens=1024, tools=dispatcher.tools(),
                                                 messages=messages)
            messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]})
            for block in reply.content:
                if block.type == "text":
                    print(f"claude: {block.text}")
            if reply.stop_reason != "tool_use":
                break
            results = await dispatcher.tool_results(reply.content)
            for use, result in zip([b for b in reply.content if b.type == "tool_use"], results, strict=True):
                text = result["content"][0]["text"]
                transcript.append(text)
                print(f"  -> {use.name}: {use.input.get('command', '')}")
                for line in text.splitlines():
                    if line.startswith(("token in", "{", "example.com", "---")) or "REDACTED" in line:
                        print(f"     {line[:160]}")
            messages.append({"role": "user", "content": results})
    server.shutdown()
    print(f"the API received the real token: {received.count(f'Bearer {TOKEN}') >= 1}")
    print(f"the token appeared in a tool result: {any(TOKEN in t for t in transcript)}")


if __name__ == "__main__":
    anyio.run(main)
