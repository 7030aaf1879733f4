"""Workloads every file transport must pass (the FUSE-daemon port in test_vfs.py, virtiofs in
test_virtiofs.py): each runs in the guest on a mount at /workspace and checks the result from
both sides, the guest's output and the host directory ``work`` behind the mount."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gondolin import VM


async def sh(vm: VM, script: str, timeout: float = 120) -> str:
    r = await vm.exec(["bash", "-ec", script], timeout=timeout)
    assert r.exit_code == 0, f"{script!r} exited {r.exit_code}: {r.stderr}{r.stdout}"
    return r.stdout


async def git_init_add_commit_status(vm: VM, work: Path) -> None:
    out = await sh(vm, """
        cd /workspace && mkdir repo && cd repo
        git init -q -b main . && git config user.email t@example.com && git config user.name T
        mkdir -p src && for i in $(seq 1 30); do echo "print($i)" > src/m$i.py; done
        git add -A && git commit -q -m first
        echo changed >> src/m1.py && echo new > untracked.txt && git rm -q src/m2.py
        git status --porcelain
        git log --oneline | wc -l
    """)  # fmt: skip
    assert out.split("\n")[:3] == [" M src/m1.py", "D  src/m2.py", "?? untracked.txt"]
    assert out.split()[-1] == "1"
    assert (work / "repo" / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"


async def sqlite_create_insert_query(vm: VM, work: Path) -> None:
    out = await sh(vm, """
        cd /workspace
        sqlite3 app.db 'create table t(id integer primary key, name text);'
        for i in $(seq 1 50); do echo "insert into t(name) values ('row$i');"; done | sqlite3 app.db
        sqlite3 app.db 'select count(*), max(name) from t;'
    """)  # fmt: skip
    assert out.strip() == "50|row9"
    with sqlite3.connect(work / "app.db") as db:
        assert db.execute("select count(*) from t").fetchone() == (50,)
