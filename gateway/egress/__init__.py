"""The egress plane: what VMs may reach outside, decided by name, through a userspace proxy."""
