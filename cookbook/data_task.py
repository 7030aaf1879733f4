"""A data task: upload a CSV, let the model analyse it with Python in the sandbox, download the result.

    python cookbook/data_task.py [input.csv] [summary.json]       # offline, scripted model
    OPENAI_API_KEY=... python cookbook/data_task.py               # real model

The application moves the files (write_file / read_file through the same registry the model
uses); the model only writes and runs the analysis inside the sandbox, offline (profile
``offline``: the sandbox has no network at all).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import random
import sys
import tempfile
from pathlib import Path

import anyio
from _offline import banner, openai_client, tool_call

from integrations import SandboxManager, ToolRegistry
from integrations.openai_tools import OpenAIDispatcher

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
ANALYSIS = '''import csv, json, statistics
from collections import defaultdict
by_region = defaultdict(list)
with open("/workspace/sales.csv", newline="") as f:
    for row in csv.DictReader(f):
        by_region[row["region"]].append(float(row["amount"]))
summary = {region: {"orders": len(v), "total": round(sum(v), 2), "mean": round(statistics.mean(v), 2)}
           for region, v in sorted(by_region.items())}
json.dump(summary, open("/workspace/summary.json", "w"), indent=2)
print(json.dumps(summary))
'''


def make_csv(path: Path) -> None:
    rng = random.Random(7)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["order_id", "region", "amount"])
        for i in range(1, 501):
            writer.writerow([i, rng.choice(["north", "south", "east", "west"]), f"{rng.uniform(5, 500):.2f}"])


def script(sid: str) -> list:
    return [
        {"tool_calls": [tool_call("exec", {"sandbox_id": sid, "command": "head -3 /workspace/sales.csv; "
                                                                         "wc -l /workspace/sales.csv"})]},
        {"tool_calls": [tool_call("write_file", {"sandbox_id": sid, "path": "/workspace/analysis.py",
                                                 "content": ANALYSIS})]},
        {"tool_calls": [tool_call("exec", {"sandbox_id": sid, "command": "python3 /workspace/analysis.py"}, 2)]},
        {"content": "Done: /workspace/summary.json has orders, total and mean amount per region."},
    ]


async def main(source: Path, target: Path) -> None:
    async with SandboxManager() as manager:
        registry = ToolRegistry(manager)
        sid = (await registry.call("sandbox_create", {"name": "data", "network": "offline"})).data()["sandbox_id"]
        uploaded = await registry.call("write_file", {"sandbox_id": sid, "path": "/workspace/sales.csv",
                                                      "content": base64.b64encode(source.read_bytes()).decode(),
                                                      "encoding": "base64"})
        print(f"uploaded {source} ({uploaded.data()['size_bytes']} bytes)")
        client, real = openai_client(script(sid))
        banner("Data task", real, "OPENAI")
        dispatcher = OpenAIDispatcher(ToolRegistry(manager, tools=["exec", "read_file", "write_file", "list_files"]))
        messages: list = [{"role": "user", "content": (
            f"In sandbox {sid}, /workspace/sales.csv has columns order_id, region, amount. Using Python in the "
            "sandbox, write /workspace/summary.json mapping each region to its number of orders, total and mean "
            "amount (rounded to 2 decimals).")}]
        for _ in range(12):
            response = await client.chat.completions.create(model=MODEL, messages=messages,
                                                            tools=dispatcher.chat_tools())
            message = response.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if message.content:
                print(f"model: {message.content}")
            if not message.tool_calls:
                break
            for call in message.tool_calls:
                answer = await dispatcher.chat_tool_message(call)
                print(f"  -> {call.function.name}: {answer['content'].splitlines()[0][:100]}")
                messages.append(answer)
        result = await registry.call("read_file", {"sandbox_id": sid, "path": "/workspace/summary.json"})
        if result.is_error:
            sys.exit(f"no summary was produced: {result.text}")
        target.write_text(result.data()["content"])
        summary = json.loads(target.read_text())
        print(f"downloaded {target}:")
        for region, stats in summary.items():
            print(f"  {region:6} orders={stats['orders']:4} total={stats['total']:10.2f} mean={stats['mean']:7.2f}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="gondolin-data-") as tmp:  # removed at exit, errors included
        work = Path(tmp)
        src = Path(sys.argv[1]) if len(sys.argv) > 1 else work / "sales.csv"
        if len(sys.argv) <= 1:
            make_csv(src)
        dst = Path(sys.argv[2]) if len(sys.argv) > 2 else work / "summary.json"
        anyio.run(main, src, dst)
