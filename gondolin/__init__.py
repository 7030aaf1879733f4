"""Gondolin: local QEMU micro-VMs for untrusted code, with host-side policy."""
