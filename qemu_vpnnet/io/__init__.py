"""The asyncio shell: moves bytes between QEMU, host sockets and the sans-IO core."""
