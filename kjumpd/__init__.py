"""kjumpd: hibernation for Linux built on kexec jump.

The main kernel's daemon (kjumpd) prepares a transaction and jumps into a small save
kernel whose userspace (kjump-agent) streams the main kernel's memory into an image and
jumps back; a restore-first boot entry brings the image back.
"""

__version__ = "0.1.0"
