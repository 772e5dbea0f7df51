"""Volumes: persistent storage that outlives VMs (issue 21).

``store.py`` is the contract (``VolumeStore``), ``local.py`` the local-disk implementation (one ext4 image
per volume, on an XFS pool so checkpoints are reflinks), ``paths.py`` the pure path rules and
``tree.py`` the file operations on an attached volume that never follow a symlink a VM planted.
"""
