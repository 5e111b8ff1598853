import sys

from qemu_vpnnet.cli import main

sys.exit(main())
