"""Integrations: attach to a running QEMU, the launcher, libvirt."""
