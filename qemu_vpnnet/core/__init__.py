"""The sans-IO core: frames and host-socket events in, frames and socket operations out.

Nothing in this package touches a socket, the event loop or the clock; time is passed in.
The modules are compiled with mypyc when the package is installed with it available.
"""
