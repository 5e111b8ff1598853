"""Integration test harness of qemu-vpnnet: real QEMU guests and namespaces.

Helpers (importable as ``integration.<module>``):

- ``backend``: :class:`~integration.backend.Backend`, the backend as a subprocess.
- ``vmguest``: :class:`~integration.vmguest.VmGuest`, the tiny TCG VM
  (vm-images/build.sh) on a ``-netdev stream`` socket or any netdev.
- ``nsguest``: :class:`~integration.nsguest.NsGuest`, a network namespace whose
  TAP device QEMU's hub bridges to the backend: the fast guest.
- ``nshost``: :class:`~integration.nshost.NsHost`, a "host" namespace with a veth
  to an "outside" namespace, to run the backend in and test servers behind.
- ``netns``: :class:`~integration.netns.Netns`, the namespace base, and
  :func:`~integration.netns.sweep` for leftovers.
- ``l2switch``: a tiny stream-protocol Ethernet hub, a stand-in backend for
  the harness's own tests.

The fixtures are in ``integration/conftest.py``.
"""
