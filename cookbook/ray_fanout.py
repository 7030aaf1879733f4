"""Fan one prepared sandbox out to N copies on a Ray cluster with fork, and run a task in each.

The expensive part happens once: a sandbox gets a data set and a worker script, and a worker
process that has already loaded the data starts in the background. ``fork(n, spread=True)``
then copies that whole state (memory, running process, disk) to N sandboxes spread over the
cluster's nodes; each copy answers one shard of the question, and the answers are merged here.

    .venv/bin/python cookbook/ray_fanout.py                      # a local two-node Ray cluster
    .venv/bin/python cookbook/ray_fanout.py --address auto -n 8  # your cluster (ray start ...)

Without ``--address`` it starts two Ray nodes on this machine (two ``gondolin_vm`` slots
each) and shuts them down at the end. See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

import gondolin.cluster as gc

# The prepared state: 20,000 synthetic orders and a worker that has them in memory, answering
# one shard per request through a named pipe (so the copies share the loaded data, not a reload).
PREPARE = r"""
set -e
mkdir -p /srv/job && cd /srv/job
python3 - <<'PY'
import json, random
random.seed(7)
regions = ["north", "south", "east", "west"]
rows = [{"id": i, "region": random.choice(regions), "amount": random.randint(1, 500)} for i in range(20000)]
json.dump(rows, open("/srv/job/orders.json", "w"))
PY
cat > /srv/job/worker.py <<'PY'
import json, os
rows = json.load(open("/srv/job/orders.json"))  # loaded once, before the fork
os.mkfifo("/srv/job/ask") if not os.path.exists("/srv/job/ask") else None
while True:
    with open("/srv/job/ask") as f:
        shard, shards = map(int, f.read().split())
    mine = [r for r in rows if r["id"] % shards == shard]
    totals = {}
    for r in mine:
        totals[r["region"]] = totals.get(r["region"], 0) + r["amount"]
    with open(f"/srv/job/answer-{shard}.json.tmp", "w") as out:
        json.dump({"shard": shard, "orders": len(mine), "totals": totals}, out)
    os.rename(f"/srv/job/answer-{shard}.json.tmp", f"/srv/job/answer-{shard}.json")
PY
nohup python3 /srv/job/worker.py >/srv/job/worker.log 2>&1 &
while [ ! -p /srv/job/ask ]; do sleep 0.05; done
"""


async def run(cluster: gc.Cluster, copies: int) -> None:
    async with cluster:
        t0 = time.monotonic()
        source = await cluster.create(memory="512M")
        prepared = await source.exec(["sh", "-c", PREPARE], timeout=120)
        if not prepared.ok:
            raise SystemExit(f"preparing failed: {prepared.stderr}")
        print(f"prepared one sandbox on node {source.node_id[:8]} in {time.monotonic() - t0:.1f}s")

        t1 = time.monotonic()
        workers = await source.fork(copies, spread=True)
        await source.close()  # the copies hold everything now
        per_node = collections.Counter(w.node_id[:8] for w in workers)
        print(f"forked {copies} copies in {time.monotonic() - t1:.1f}s on nodes: "
              + ", ".join(f"{node} x{n}" for node, n in sorted(per_node.items())))

        async def ask(shard: int, worker: gc.ClusterVM) -> dict[str, object]:
            await worker.exec(["sh", "-c", f"echo {shard} {copies} > /srv/job/ask"])
            done = await worker.exec(["sh", "-c", f"while [ ! -f /srv/job/answer-{shard}.json ]; do sleep 0.05; done; "
                                                  f"cat /srv/job/answer-{shard}.json"], timeout=60)
            answer: dict[str, object] = json.loads(done.stdout)
            return answer

        answers = await asyncio.gather(*(ask(i, w) for i, w in enumerate(workers)))
        totals: collections.Counter[str] = collections.Counter()
        for a in answers:
            print(f"shard {a['shard']}: {a['orders']} orders")
            totals.update(a["totals"])  # type: ignore[arg-type]
        print("merged: " + "  ".join(f"{region}={amount}" for region, amount in sorted(totals.items())))
        print(f"orders in all shards: {sum(int(a['orders']) for a in answers)}")  # type: ignore[call-overload]
    print("sandboxes left running: 0")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", help="Ray cluster address (default: start two local Ray nodes)")
    p.add_argument("-n", "--copies", type=int, default=3, help="how many copies to fork (default 3)")
    args = p.parse_args()
    local = None
    if args.address is None:
        from ray.cluster_utils import Cluster

        node = {"num_cpus": 2, "resources": {gc.VM_RESOURCE: 2}, "object_store_memory": 400 << 20}
        local = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        local.add_node(**node)
        local.wait_for_nodes()
        address = local.address
        print(f"started a local two-node Ray cluster at {address}")
    else:
        address = args.address
    try:
        asyncio.run(run(gc.connect(address), args.copies))
    finally:
        if local is not None:
            import ray

            ray.shutdown()
            local.shutdown()


if __name__ == "__main__":
    main()
