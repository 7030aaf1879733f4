"""The FUSE node table: node ids the guest kernel holds, and the paths they stand for.

Sans-IO. A node is (parent node, name), so renaming a directory moves everything below it
at once. Each node counts the kernel's lookup references (lookup, create, mkdir, symlink,
link and readdirplus add one; FORGET takes them away) and the child nodes that hang off it;
it is dropped when both reach zero, so the table tracks what the kernel caches instead of
growing forever. Node ids are never reused (64-bit), so a stale id is always ESTALE.
"""

from __future__ import annotations

from . import paths
from .errors import ENFILE, ESTALE, VfsError

ROOT_NODE = 1
DEFAULT_MAX_NODES = 1 << 19  # kernel-held inodes before lookups fail with ENFILE
MAX_DEPTH = 2048  # a path of 4096 bytes has at most this many components


class _Node:
    __slots__ = ("parent", "name", "lookups", "children")

    def __init__(self, parent: int, name: str) -> None:
        self.parent = parent  # 0 once detached (unlinked or replaced)
        self.name = name
        self.lookups = 0
        self.children = 0


class NodeTable:
    def __init__(self, max_nodes: int = DEFAULT_MAX_NODES, first_id: int = ROOT_NODE + 1) -> None:
        """``first_id``: where new node ids start (above the root's)."""
        if first_id <= ROOT_NODE:
            raise ValueError("node ids start above the root's")
        self.max_nodes = max_nodes
        root = _Node(0, "")
        root.lookups = 1  # the mount itself; never forgotten
        self._nodes: dict[int, _Node] = {ROOT_NODE: root}
        self._names: dict[tuple[int, str], int] = {}
        self._next = first_id

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: int) -> bool:
        return node in self._nodes

    def _get(self, node: int) -> _Node:
        entry = self._nodes.get(node)
        if entry is None:
            raise VfsError(ESTALE, f"unknown node {node}")
        return entry

    def path(self, node: int) -> str:
        """The node's current path; ESTALE when it is unknown or no longer has one."""
        names: list[str] = []
        while node != ROOT_NODE:
            if len(names) > MAX_DEPTH:
                raise VfsError(ESTALE, "path too deep")
            entry = self._get(node)
            if not entry.parent:
                raise VfsError(ESTALE, "node was removed")
            names.append(entry.name)
            node = entry.parent
        names.reverse()
        return paths.join(names)

    def child_path(self, parent: int, name: str) -> str:
        return paths.child(self.path(parent), name)

    def child(self, parent: int, name: str) -> int | None:
        return self._names.get((parent, name))

    def lookups(self, node: int) -> int:
        return self._get(node).lookups

    def lookup(self, parent: int, name: str) -> int:
        """Add one lookup reference to ``parent/name``, creating the node if needed."""
        node = self._names.get((parent, name))
        if node is None:
            parent_entry = self._get(parent)
            if not parent_entry.parent and parent != ROOT_NODE:
                raise VfsError(ESTALE, "parent was removed")
            if len(self._nodes) >= self.max_nodes:
                raise VfsError(ENFILE, "node table full")
            node = self._next
            self._next += 1
            self._nodes[node] = _Node(parent, name)
            self._names[(parent, name)] = node
            parent_entry.children += 1
        self._nodes[node].lookups += 1
        return node

    def forget(self, node: int, count: int) -> None:
        entry = self._nodes.get(node)
        if entry is None or node == ROOT_NODE:
            return
        entry.lookups = max(0, entry.lookups - count)
        self._collect(node)

    def _collect(self, node: int) -> None:
        while node != ROOT_NODE:
            entry = self._nodes[node]
            if entry.lookups or entry.children:
                return
            del self._nodes[node]
            parent = entry.parent
            if not parent:
                return
            if self._names.get((parent, entry.name)) == node:
                del self._names[(parent, entry.name)]
            self._nodes[parent].children -= 1
            node = parent

    def _unhook(self, node: int) -> None:
        """Take ``node`` out of the tree (it keeps its id until forgotten)."""
        entry = self._nodes[node]
        parent = entry.parent
        if not parent:
            return
        del self._names[(parent, entry.name)]
        entry.parent = 0
        self._nodes[parent].children -= 1
        self._collect(parent)
        if node in self._nodes:
            self._collect(node)

    def detach(self, parent: int, name: str) -> None:
        """``parent/name`` was unlinked: its node no longer has a path."""
        node = self._names.get((parent, name))
        if node is not None:
            self._unhook(node)

    def move(self, old_parent: int, old_name: str, new_parent: int, new_name: str) -> None:
        """``rename``: the node keeps its id and everything below it follows."""
        node = self._names.get((old_parent, old_name))
        replaced = self._names.get((new_parent, new_name))
        if replaced is not None and replaced != node:
            self._unhook(replaced)
        if node is None or replaced == node:
            return
        if new_parent not in self._nodes or self._below(new_parent, node):
            # The kernel no longer knows the destination, or the provider let a directory
            # move below itself: keep the table a tree and drop the node's path.
            self._unhook(node)
            return
        entry = self._nodes[node]
        del self._names[(old_parent, old_name)]
        self._names[(new_parent, new_name)] = node
        entry.parent, entry.name = new_parent, new_name
        self._nodes[new_parent].children += 1
        self._nodes[old_parent].children -= 1
        self._collect(old_parent)

    def _below(self, node: int, top: int) -> bool:
        """``node`` is ``top`` or lies under it."""
        for _ in range(MAX_DEPTH + 1):
            if node == top:
                return True
            if node == ROOT_NODE or node not in self._nodes:
                return False
            node = self._nodes[node].parent
        return True

    def exchange(self, parent_a: int, name_a: str, parent_b: int, name_b: str) -> None:
        """``rename(RENAME_EXCHANGE)``: the two names swap nodes."""
        a = self._names.get((parent_a, name_a))
        b = self._names.get((parent_b, name_b))
        if (a is not None and self._below(parent_b, a)) or (
            b is not None and self._below(parent_a, b)
        ):
            for node in (a, b):
                if node is not None and node in self._nodes:
                    self._unhook(node)
            return
        self._names.pop((parent_a, name_a), None)
        self._names.pop((parent_b, name_b), None)
        for node, parent, name in ((a, parent_b, name_b), (b, parent_a, name_a)):
            if node is None:
                continue
            entry = self._nodes[node]
            old_parent = entry.parent
            if parent not in self._nodes:
                entry.parent = 0
                self._nodes[old_parent].children -= 1
                continue
            self._names[(parent, name)] = node
            entry.parent, entry.name = parent, name
            self._nodes[parent].children += 1
            self._nodes[old_parent].children -= 1
        for parent in (parent_a, parent_b):
            if parent in self._nodes:
                self._collect(parent)
        for node in (a, b):
            if node is not None and node in self._nodes:
                self._collect(node)

    # --- hand-over to another host session (checkpoint, fork) ---------------------------------

    def export(self) -> dict[str, object]:
        """The table as plain data: ``nodes`` rows ``[id, parent, name, lookups]`` (parents
        before children) and the next id. See :meth:`restore`."""
        rows = [[node, e.parent, e.name, e.lookups] for node, e in self._nodes.items() if node != ROOT_NODE]
        rows.sort(key=lambda r: int(r[0]))  # type: ignore[call-overload]  # ids grow: parents first
        return {"next": self._next, "nodes": rows}

    @classmethod
    def restore(cls, data: object, max_nodes: int = DEFAULT_MAX_NODES) -> NodeTable:
        """A table holding the ids and paths of :meth:`export`'s; ValueError when ``data`` is
        malformed (the caller then starts a fresh session)."""
        if not isinstance(data, dict) or type(data.get("next")) is not int or not isinstance(data.get("nodes"), list):
            raise ValueError("bad node table")
        rows = data["nodes"]
        if len(rows) >= max_nodes:
            raise ValueError("node table too large")
        table = cls(max_nodes, max(ROOT_NODE + 1, data["next"]))
        for row in rows:
            if (not isinstance(row, list) or len(row) != 4 or type(row[0]) is not int or type(row[1]) is not int
                    or not isinstance(row[2], str) or type(row[3]) is not int or row[0] <= ROOT_NODE
                    or row[0] >= table._next or row[0] in table._nodes or row[3] < 0):
                raise ValueError(f"bad node row {str(row)[:60]}")
            node, parent, name, lookups = row
            entry = _Node(parent, name)
            entry.lookups = lookups
            table._nodes[node] = entry
        for node, entry in table._nodes.items():  # link names and child counts once all exist
            if node == ROOT_NODE or not entry.parent:
                continue
            parent_entry = table._nodes.get(entry.parent)
            if parent_entry is None or (entry.parent, entry.name) in table._names:
                entry.parent = 0  # its parent is gone: the node keeps its id, not its path
                continue
            table._names[(entry.parent, entry.name)] = node
            parent_entry.children += 1
        return table

