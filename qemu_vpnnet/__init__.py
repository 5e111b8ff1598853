"""qemu-vpnnet: a user-mode network backend for QEMU virtual machines."""

__version__ = "0.1.0"
