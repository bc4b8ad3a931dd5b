"""Reading the kernel's freezer report: a failed jump names the tasks that refused."""

from __future__ import annotations

import os

from kjumpd.linux.kmsg import KernelLog, freezer_failure, text_of
from kjumpd.sysroot import Sysroot

# /dev/kmsg records as Linux 6.12 prints them when kexec -e cannot freeze two writers blocked
# on a frozen filesystem (one of them with its "pid:" part as a record of its own)
DUMP = """\
6,2001,51000000,-;PM: freeze of devices complete after 0.101 msecs
3,2002,71000000,-;
3,2003,71000100,-;Freezing user space processes failed after 20.004 seconds (2 tasks refusing to freeze, wq_busy=0):
6,2004,71000200,-;task:sqlite-writer   state:D stack:0     pid:412   tgid:412   ppid:1      flags:0x00004002
6,2005,71000210,-;Call Trace:
6,2006,71000220,-; <TASK>
6,2007,71000230,-; __schedule+0x3a4/0xb10
6,2008,71000240,-; schedule+0x27/0xa0
6,2009,71000250,-; percpu_rwsem_wait+0x10d/0x130
6,2010,71000260,-; __percpu_down_read+0x51/0x60
6,2011,71000270,-; ext4_page_mkwrite+0x2c5/0x4f0
6,2012,71000280,-; do_page_mkwrite+0x4b/0xa0
6,2013,71000290,-; </TASK>
6,2014,71000300,-;task:appender        state:D
6,2015,71000310,-; stack:0     pid:413   tgid:413   ppid:1      flags:0x00004002
6,2016,71000320,-;Call Trace:
6,2017,71000330,-; __schedule+0x3a4/0xb10
6,2018,71000340,-; schedule+0x27/0xa0
6,2019,71000350,-; percpu_rwsem_wait+0x10d/0x130
6,2020,71000360,-; ? __percpu_down_read+0x51/0x60
6,2021,71000370,-; vfs_write+0x3c1/0x4b0
6,2022,71000380,-; ksys_write+0x6b/0xf0
6,2023,71000390,-;OOM killer enabled.
6,2024,71000400,-;Restarting tasks ... done.
"""


def test_the_freezer_report_names_each_task_and_where_it_waits():
    f = freezer_failure(DUMP.splitlines())
    assert f is not None
    assert f.what == "user space processes" and f.seconds == 20.004 and f.count == 2
    assert [(t.pid, t.comm, t.state, t.waits_in) for t in f.tasks] == [
        (412, "sqlite-writer", "D", "ext4_page_mkwrite"),
        (413, "appender", "D", "vfs_write"),
    ]
    s = f.summary()
    assert "pid 412 (sqlite-writer) state D in ext4_page_mkwrite" in s
    assert "gave up on user space processes after 20.004 s (2 refusing to freeze)" in s


def test_a_log_without_a_freezer_failure_has_none():
    lines = [x for x in DUMP.splitlines() if "Freezing" not in x]
    assert freezer_failure(lines) is None
    assert freezer_failure([]) is None


def test_plain_dmesg_lines_parse_the_same():
    plain = [text_of(x) for x in DUMP.splitlines()]
    f = freezer_failure(plain)
    assert f is not None and [t.pid for t in f.tasks] == [412, 413]
    assert text_of("not a record; with a semicolon") == "not a record; with a semicolon"


def test_the_kernel_log_reader_returns_only_what_came_after_it_opened(tmp_path):
    kmsg = tmp_path / "dev" / "kmsg"
    kmsg.parent.mkdir()
    kmsg.write_text("6,1,1,-;before the jump\n")
    klog = KernelLog(Sysroot(tmp_path)).open()
    with open(kmsg, "a") as f:
        f.write(DUMP)
    lines = klog.read()
    klog.close()
    assert "before the jump" not in " ".join(lines)
    assert freezer_failure(lines) is not None


def test_an_unreadable_kernel_log_reads_empty_and_says_why(tmp_path):
    klog = KernelLog(Sysroot(tmp_path)).open()
    assert klog.read() == [] and "/dev/kmsg" in klog.error
    assert not os.path.exists(tmp_path / "dev" / "kmsg")
