"""postcopy: live migration of KVM micro-VMs in Python, with userfaultfd-based postcopy.

Layers, lowest first (a lower layer never imports a higher one):
linux -> ram -> wire -> transport -> migration -> vm -> qmp, cli.
"""

__version__ = "0.1.0"
