"""``vm.expose_http``: a gateway whose connector is ``vm.open_tcp``, owned by the VM's task group.

The listeners file is read through the guest agent (``vm.fs``) every
``IngressLimits.listeners_interval`` seconds; an unchanged file costs one small read.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping

from ..channel import ControlLink
from ..errors import GuestFileError
from ..fs import GuestFS
from .gateway import Connector, IngressGateway, IngressLimits, ListenersSource
from .hooks import IngressHooks
from .routes import LISTENERS_PATH, MAX_LISTENERS_BYTES, ListenersError, Route, RouteTable


def listeners_reader(fs: GuestFS) -> ListenersSource:
    """Read ``/etc/gondolin/listeners`` from the guest (None when it does not exist)."""

    async def read() -> bytes | None:
        try:
            return await fs.read_bytes(LISTENERS_PATH, max_size=MAX_LISTENERS_BYTES)
        except GuestFileError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            if exc.errno == errno.EFBIG:
                raise ListenersError(f"{LISTENERS_PATH} is larger than {MAX_LISTENERS_BYTES} bytes") from None
            raise

    return read


async def expose_http(link: ControlLink, connector: Connector, fs: GuestFS, *, port: int | None,
                      routes: RouteTable | Mapping[str, int] | Iterable[Route] | None, host: str,
                      listen_port: int, hooks: IngressHooks | None, limits: IngressLimits | None,
                      allow_remote: bool, listeners_file: bool) -> IngressGateway:
    table = RouteTable.of(routes)
    if port is not None:
        table = RouteTable([Route("/", port)]).merged(table)
    if not len(table) and not listeners_file:
        raise ValueError("nothing to expose: give port=, routes= or listeners_file=True")
    link.control()  # a closed or dead VM fails here
    gateway = IngressGateway(connector, routes=table, hooks=hooks,
                             listeners=listeners_reader(fs) if listeners_file else None, limits=limits)
    await gateway.listen(host, listen_port, allow_remote=allow_remote)
    try:
        link.spawn(f"ingress gateway {gateway.url}", gateway.serve, critical=False)
    except BaseException:
        await gateway.close()
        raise
    return gateway
