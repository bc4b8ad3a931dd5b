"""The QEMU harness itself, on the real kernel with a busybox-only initramfs: console lines,
typing on the console, QMP, a quiet guest's registers, power-off detection, restart with a
new log."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from savekernel.initramfs import build_initramfs
from tests.vm.harness import (
    VM,
    VMConfig,
    VMError,
    VMTimeout,
    artifacts_dir,
    kernel_image,
    require_vm_prereqs,
)

pytestmark = pytest.mark.vm

INIT = """#!/bin/sh
export PATH=/usr/bin:/usr/sbin
mount -t proc proc /proc
echo "HARNESS: ready $(cat /proc/cmdline | tr ' ' '\\n' | grep '^harness.run=')"
read -r line
echo "HARNESS: got <$line>"
poweroff -f
"""


def test_console_keys_qmp_exit_and_restart(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    require_vm_prereqs()
    kernel = kernel_image()
    initrd = build_initramfs(None, INIT, name="harness-test")
    cfg = VMConfig(
        kernel=kernel,
        initrd=initrd.path,
        append="console=ttyS0 panic=1 harness.run=1",
        memory_mb=256,
        smp=1,
    )
    art = artifacts_dir(request.node.name)
    with VM(cfg, artifacts=art, name="h") as vm:
        m = vm.wait_for(r"HARNESS: ready harness\.run=(\d)", timeout=300)
        assert m.group(1) == "1"
        assert vm.qmp("query-status")["status"] == "running"
        with pytest.raises(VMTimeout):
            vm.wait_for(r"HARNESS: got", timeout=2)  # nothing typed yet
        # the guest waits for a key: its silence grows until the kernel prints again
        printed, quiet = len(vm.lines), vm.quiet_for()
        time.sleep(1.5)
        assert vm.quiet_for() >= quiet + 1.5 or len(vm.lines) > printed
        regs = vm.dump_registers()  # where its vCPU is
        assert regs is not None and "RIP=" in regs.read_text()
        vm.send("kjump 42\n")
        assert vm.wait_for(r"HARNESS: got <(.*)>", timeout=120).group(1) == "kjump 42"
        assert vm.quiet_for() < 30  # the line just came
        # QEMU exits while the host still holds its QMP connection (the guest powered off
        # between two polls): asking it then is a VMError, not a broken pipe
        assert vm.proc is not None
        vm.proc.wait(120)
        with pytest.raises(VMError):
            vm.qmp("query-status")
        assert vm.wait_exit(timeout=120) == 0
        vm.restart(append="console=ttyS0 panic=1 harness.run=2")
        assert vm.wait_for(r"HARNESS: ready harness\.run=(\d)", timeout=300).group(1) == "2"
    first = (art / "h-console-1.log").read_text()
    second = (art / "h-console-2.log").read_text()
    assert "HARNESS: got <kjump 42>" in first and "harness.run=2" not in first
    assert "HARNESS: ready harness.run=2" in second
    assert (art / "h-qemu-2.cmdline").read_text().startswith("qemu-system-x86_64 -accel tcg")
