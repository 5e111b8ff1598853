"""The control plane: the QMP server and the ctl client."""
