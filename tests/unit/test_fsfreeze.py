"""Which filesystems are frozen, in which order (pure: mountinfo text in, list out)."""

from kjumpd.daemon.fsfreeze import freezable
from kjumpd.linux.mountinfo import parse as parse_mountinfo

MOUNTINFO = r"""21 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
22 21 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw
23 21 0:21 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw
24 21 254:2 / /home rw,relatime shared:6 - xfs /dev/vda2 rw
25 24 254:2 /user/shared /srv/shared rw,relatime shared:6 - xfs /dev/vda2 rw
26 21 254:3 / /boot/efi rw,relatime shared:7 - vfat /dev/vda3 rw
27 21 254:4 / /mnt/ro ro,relatime shared:8 - ext4 /dev/vda4 ro
28 24 7:0 / /home/u/My\040Images rw,relatime shared:9 - ext4 /dev/loop0 rw
29 21 0:40 / /mnt/nfs rw - nfs4 server:/export rw
30 21 0:39 /@home /data rw,relatime - btrfs /dev/vda5 rw,subvol=/@home
"""


def test_only_local_writable_filesystems_once_each():
    got = freezable(parse_mountinfo(MOUNTINFO))
    assert [m.mountpoint for m in got] == ["/home/u/My Images", "/boot/efi", "/data", "/home", "/"]


def test_loop_backed_filesystems_go_first_then_leaves():
    got = [m.mountpoint for m in freezable(parse_mountinfo(MOUNTINFO))]
    assert got[0] == "/home/u/My Images"  # its backing file may be on /home
    assert got.index("/home") < got.index("/")
    assert got[-1] == "/"


def test_mountinfo_fields():
    m = {x.mount_id: x for x in parse_mountinfo(MOUNTINFO)}
    assert m[28].mountpoint == "/home/u/My Images" and m[28].devno == "7:0"
    assert m[30].fstype == "btrfs" and m[30].source == "/dev/vda5"
    assert "ro" in m[27].options.split(",")
