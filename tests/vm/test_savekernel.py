"""The save kernel on a real CONFIG_KEXEC_JUMP kernel under QEMU (TCG): the first real jumps.

A (the main kernel) runs a busybox + python initramfs (tests/vm/savekernel_guest.py) that fills
memory with known data, makes the virtio disk a kjumpd target, loads B (the save kernel with
savekernel.initramfs's save initramfs + the job) with ``kexec -c --load-preserve-context`` into
the jump area and jumps. B's agent saves A's memory and jumps back. Every verdict is printed
by the guest after checking its own data and the image header (``KJT-VERDICT: PASS ...``);
nothing here is judged by timing. Console timestamps are only *reported* (figures.json in the
test's artifacts directory).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from savekernel.initramfs import InitramfsImage, build_initramfs, build_save_initramfs
from tests.vm.harness import (
    MAIN_APPEND,
    VM,
    VMConfig,
    artifacts_dir,
    kernel_image,
    require_vm_prereqs,
)

pytestmark = pytest.mark.vm

GUEST = Path(__file__).resolve().parent / "savekernel_guest.py"
A_INIT = """#!/bin/sh
export PATH=/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
/usr/bin/python3 -S -E -B -u /kjt/guest.py
echo "KJT: guest script ended; powering off"
sync
poweroff -f
"""
GUEST_MODULES = (
    "kjumpd.image.store",
    "kjumpd.image.device",
    "kjumpd.job",
    "hashlib",
    "mmap",
    "random",
    "subprocess",
    "uuid",
    "traceback",
    "runpy",
)
PANIC = r"Kernel panic|Attempted to kill init|general protection fault|BUG: unable to handle"
DISK_SIZE = 1536 << 20
MIB = 192


@pytest.fixture(scope="module")
def kernel() -> Path:
    require_vm_prereqs()
    return kernel_image()


@pytest.fixture(scope="module")
def b_initramfs() -> InitramfsImage:
    return build_save_initramfs()


@pytest.fixture(scope="module")
def b_plain() -> InitramfsImage:
    return build_save_initramfs(compress=False)


@pytest.fixture(scope="module")
def a_initramfs(
    kernel: Path, b_initramfs: InitramfsImage, b_plain: InitramfsImage
) -> InitramfsImage:
    return build_initramfs(
        None,
        A_INIT,
        {
            "boot/bzImage": kernel,
            "boot/b.cpio.gz": b_initramfs.path,
            "boot/b.cpio": b_plain.path,
            "kjt/guest.py": GUEST,
        },
        name="kjt-guest",
        python_modules=GUEST_MODULES,
        python_packages=("kjumpd", "lz4"),
        host_binaries=("/usr/sbin/kexec",),
    )


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    with open(p, "wb") as f:
        f.truncate(DISK_SIZE)
    return p


def _vm(
    request: pytest.FixtureRequest, kernel: Path, initrd: InitramfsImage, disk: Path, append: str
) -> VM:
    cfg = VMConfig(
        kernel=kernel,
        initrd=initrd.path,
        append=f"{MAIN_APPEND} {append}",
        disks=[disk],
        memory_mb=1024,
        smp=2,
    )
    return VM(cfg, artifacts_dir(request.node.name), name="guest")


def _figures(request: pytest.FixtureRequest, vm: VM, b: InitramfsImage, **more: object) -> dict:
    """Console-derived figures for the report (host clock; never asserted)."""

    def t(pattern: str) -> float | None:
        return vm.line_time(pattern)

    fig: dict[str, object] = {
        "b_initramfs_gzip_bytes": b.compressed_size,
        "b_initramfs_uncompressed_bytes": b.uncompressed_size,
    }
    jump = t(r"KJT: jumping to the save kernel")
    up = t(r"kjump-agent: save kernel up")
    back = t(r"KJT: back in the main kernel")
    if jump is not None and up is not None:
        fig["jump_to_agent_first_line_s"] = round(up - jump, 2)
    if up is not None and back is not None:
        fig["agent_first_line_to_back_in_A_s"] = round(back - up, 2)
    if jump is not None:  # where the time from the jump to the agent's first line goes
        after = [ln for ln in vm.lines if ln.t >= jump]

        def first(rx: str) -> float | None:
            return next((ln.t for ln in after if re.search(rx, ln.text)), None)

        banner, init = first(r"\] Linux version"), first(r"\] Run /init as init process")
        if banner is not None and init is not None:
            fig["jump_to_B_banner_s"] = round(banner - jump, 2)
            fig["B_banner_to_init_s"] = round(init - banner, 2)
            agent = first(r"kjump-agent: save kernel up")
            if agent is not None:
                fig["B_init_to_agent_first_line_s"] = round(agent - init, 2)
    for m in vm.find(r"kjump-agent: (SAVED|RESTORED).*"):
        fig.setdefault("agent_lines", []).append(m.group(0))  # type: ignore[union-attr]
    fig.update(more)
    out = artifacts_dir(request.node.name) / "figures.json"
    out.write_text(json.dumps(fig, indent=1) + "\n")
    return fig


def test_save_then_jump_back_keeps_memory_and_writes_saved(
    request, kernel, a_initramfs, b_initramfs, disk
) -> None:
    # init_on_free=1: A zeroes every page it frees, so every page B calls free (A's buddy
    # allocator, read through A's VMCOREINFO) must read as zero; B checks each one
    with _vm(
        request,
        kernel,
        a_initramfs,
        disk,
        f"init_on_free=1 kjt.step=jump kjt.mib={MIB} kjt.cancel=0 kjt.freecheck=1",
    ) as vm:
        m = vm.wait_for(r"KJT-VERDICT: (PASS|FAIL) (.*)", timeout=1200, fail=PANIC)
        _figures(request, vm, b_initramfs)
        assert vm.find(r"kjump-agent: save kernel up: role save"), "B's agent never ran"
        assert m.group(1) == "PASS", m.group(0)
        assert "state=SAVED" in m.group(2) and "data=intact" in m.group(2)
        free = vm.find(r"kjump-agent: free pages: (\d+) \((\d+) MiB\) of A's memory skipped")
        assert free, "B did not find A's free pages"
        # A filled MIB of its ~1 GiB; most of the rest is free
        assert int(free[0].group(2)) > 256, free[0].group(0)
        check = vm.find(r"kjump-agent: free-page check: (PASS|FAIL).*")
        assert check and check[0].group(1) == "PASS", check[0].group(0) if check else "no check"


def test_a_key_on_the_save_kernel_console_cancels_and_jumps_back(
    request, kernel, a_initramfs, b_initramfs, disk
) -> None:
    with _vm(
        request,
        kernel,
        a_initramfs,
        disk,
        f"kjt.step=jump kjt.mib={MIB} kjt.cancel=1 kjt.expect=ABORTED",
    ) as vm:
        vm.wait_for(
            r"kjump-agent: press any key on this console to cancel", timeout=900, fail=PANIC
        )
        vm.send("c")
        m = vm.wait_for(r"KJT-VERDICT: (PASS|FAIL) (.*)", timeout=900, fail=PANIC)
        _figures(request, vm, b_initramfs)
        assert m.group(1) == "PASS", m.group(0)
        assert "state=ABORTED" in m.group(2) and "data=intact" in m.group(2)


def test_power_cycle_restore_continues_the_same_process(
    request, kernel, a_initramfs, b_initramfs, disk
) -> None:
    with _vm(
        request,
        kernel,
        a_initramfs,
        disk,
        f"kjt.step=jump kjt.mib={MIB} kjt.cancel=0 kjt.mode=shutdown",
    ) as vm:
        vm.wait_for(r"KJT: image SAVED .* powering off", timeout=1200, fail=PANIC)
        vm.wait_exit(timeout=300)
        save_fig = _figures(request, vm, b_initramfs)
        # the machine is off; boot it again the way a boot loader would start R
        vm.restart(append=f"{MAIN_APPEND} kjt.step=restore")
        vm.wait_for(r"KJT: restore-first: executing the restore kernel", timeout=900, fail=PANIC)
        vm.wait_for(r"kjump-agent: save kernel up: role restore", timeout=600, fail=PANIC)
        m = vm.wait_for(r"KJT-VERDICT: (PASS|FAIL) (.*)", timeout=1200, fail=PANIC)
        restored_at = vm.last_line.t if vm.last_line else None
        _figures(request, vm, b_initramfs, save=save_fig, qemu_start_to_A_verdict_s=restored_at)
        assert m.group(1) == "PASS", m.group(0)
        assert re.search(r"restored state=RESTORING\(1\) data=intact .* consumed=yes", m.group(2))


def test_a_second_jump_resumes_the_save_kernel_which_returns_at_once(
    request, kernel, a_initramfs, b_initramfs, disk
) -> None:
    """B stays loaded after its jump back; A's next kexec -e resumes B inside its reboot(2);
    B reads the target's header (its disk works after the resume) and, finding no new job in
    the target's job slot, jumps straight back; the image stays SAVED."""
    with _vm(
        request, kernel, a_initramfs, disk, "kjt.step=jump kjt.mib=32 kjt.cancel=0 kjt.again=1"
    ) as vm:
        m = vm.wait_for(r"KJT-VERDICT: (PASS|FAIL) (.*)", timeout=1200, fail=PANIC)
        again = vm.line_time(r"KJT: jumping to the save kernel again")
        resumed = vm.line_time(r"kjump-agent: the main kernel jumped here again")
        back = vm.line_time(r"KJT: back in the main kernel again")
        _figures(
            request,
            vm,
            b_initramfs,
            second_jump_round_trip_s=round(back - again, 2) if back and again else None,
        )
        assert resumed is not None, "B did not resume after the second jump"
        # B's virtio disk works after A resumed it (the warm save kernel's precondition)
        assert vm.find(r"kjump-agent: after the resume: /dev/vd\w+ readable, image SAVED")
        assert back is not None
        assert m.group(1) == "PASS", m.group(0)
        assert "state=SAVED" in m.group(2) and "data=intact" in m.group(2)


def test_without_a_job_the_save_kernel_jumps_back_and_no_image_appears(
    request, kernel, a_initramfs, b_initramfs, b_plain, disk
) -> None:
    """Also measures B's boot side by side in one VM: gzip'd initramfs, plain initramfs, and
    gzip'd with ``quiet`` on B's command line (less console output)."""
    rounds = 2
    with _vm(request, kernel, a_initramfs, disk, f"kjt.step=bootrounds kjt.rounds={rounds}") as vm:
        m = vm.wait_for(r"KJT-VERDICT: (PASS|FAIL) (.*)", timeout=1500, fail=PANIC)
        lines = list(vm.lines)
        times: dict[str, list[float]] = {"gz": [], "plain": [], "quiet": []}
        for i, ln in enumerate(lines):
            j = re.search(r"KJT: jumping to the save kernel \((\w+), round", ln.text)
            if j:
                up = next((x.t for x in lines[i:] if "kjump-agent: save kernel up" in x.text), None)
                if up is not None:
                    times[j.group(1)].append(round(up - ln.t, 2))
        _figures(
            request,
            vm,
            b_initramfs,
            b_plain_bytes=b_plain.compressed_size,
            jump_to_agent_first_line_gz_s=times["gz"],
            jump_to_agent_first_line_plain_s=times["plain"],
            jump_to_agent_first_line_quiet_s=times["quiet"],
        )
        assert len(vm.find(r"kjump-agent: save kernel up")) == 3 * rounds
        assert m.group(1) == "PASS", m.group(0)
        assert "state=EMPTY" in m.group(2)
