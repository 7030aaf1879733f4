"""vhost-user device backends served from the host process (sans-IO core).

The target file path of docs/filesystem.md: the guest kernel's virtiofs driver talks to a
``vhost-user-fs-pci`` device whose backend lives in this process. QEMU shares guest RAM as
memfd regions; the backend maps them and reads requests straight out of the virtqueues.

This package holds the parts that need no QEMU and no sockets, each testable on its own:

- :mod:`.memory` — guest memory regions and bounds-checked address translation;
- :mod:`.virtqueue` — split virtqueues: descriptor chains popped with every guest-controlled
  field checked (addresses, lengths, loops, indirect tables), used entries pushed, notification
  suppression;
- :mod:`.protocol` — vhost-user messages: framing, payload layouts, and the device state machine
  that answers the frontend (features, memory table, vring set-up) without doing any I/O.
"""
