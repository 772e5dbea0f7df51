"""Root file system images for VMs: definitions (from the config), the Debian-package builder, the store.

An image is a Debian root file system made by ``mmdebstrap`` from a list of packages; the ``netns``
driver runs each VM on one, read-only, under a writable layer of the VM's own.
"""
