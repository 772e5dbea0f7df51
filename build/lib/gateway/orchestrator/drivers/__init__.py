"""VM drivers: the VmDriver protocol (base), netns (namespaces + cgroups, root) and process (development).

Concrete drivers are named only in ``registry``; ``_host`` and ``_cgroups`` are their shared plumbing.
"""
