"""The restore-first environment R: its /init (restore_init.py), its initramfs builder
(initramfs.py) and the boot loader templates (templates/) that kjumpd.daemon.bootentry installs."""
