"""kjump-agent: the save kernel's userspace (``boot``) and file-based ``save``/``restore``.

Standard library + lz4 only: this package runs inside the save kernel's initramfs.
"""
