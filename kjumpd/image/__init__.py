"""The image on a target: byte formats, device I/O, the streaming save and restore pipelines.

Standard library + lz4 only: this package runs inside the save kernel's initramfs.
"""
