"""QEMU control: command line, process, accelerator choice."""
