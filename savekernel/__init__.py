"""Save kernel: kernel config fragment and builder, initramfs builders."""
