"""/etc/crypttab and Debian's KEYFILE_PATTERN: the key file the normal initramfs unlocks a
volume with, which R then uses the same way (pure)."""

import pytest

from kjumpd.linux import crypttab

TAB = """# <target name> <source device> <key file> <options>
sda3_crypt UUID=3f2a0c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b /etc/keys/root.key luks,discard
home_crypt /dev/sdb1 none luks
swap_crypt /dev/sdc1 /dev/urandom swap,cipher=aes-xts-plain64
usb_crypt UUID=0b7f6f4e-8c1a-4c53-9d1e-2f3a4b5c6d7e /etc/keys/usb.key luks,keyscript=decrypt_keyctl
broken
"""


def test_crypttab_lines_are_read_as_cryptsetup_reads_them():
    entries = crypttab.parse(TAB)
    assert [e.name for e in entries] == ["sda3_crypt", "home_crypt", "swap_crypt", "usb_crypt"]
    assert entries[0].keyfile == "/etc/keys/root.key" and entries[0].options == ("luks", "discard")
    assert entries[1].keyfile == ""


@pytest.mark.parametrize(
    "hook,want",
    [
        ('KEYFILE_PATTERN="/etc/keys/*.key"\n', "/etc/keys/*.key"),
        ("#KEYFILE_PATTERN=/etc/keys/*.key\n", None),
        ("KEYFILE_PATTERN=/etc/luks/*\nKEYFILE_PATTERN='/etc/keys/*.key'\n", "/etc/keys/*.key"),
        ("UMASK=0077\n", None),
    ],
)
def test_the_pattern_is_the_conf_hooks_last_assignment(hook, want):
    assert crypttab.keyfile_pattern(hook) == want


def test_only_a_key_file_the_initramfs_holds_unlocks_without_a_passphrase():
    """Debian copies a crypttab key file into the initramfs only when it matches the
    pattern; a device, a keyscript's argument or 'none' is not a file R could use."""
    root, home, swap, usb = crypttab.parse(TAB)
    assert crypttab.initramfs_key_file(root, "/etc/keys/*.key") == "/etc/keys/root.key"
    assert crypttab.initramfs_key_file(root, None) is None  # not in the initramfs
    assert crypttab.initramfs_key_file(root, "/etc/luks/*") is None
    assert crypttab.initramfs_key_file(home, "*") is None
    assert crypttab.initramfs_key_file(swap, "*") is None
    assert crypttab.initramfs_key_file(usb, "/etc/keys/*.key") is None


@pytest.mark.parametrize(
    "device,path",
    [
        ("/dev/nvme0n1p3", "/dev/nvme0n1p3"),
        ("PARTUUID=6f1c9a2e-01", "/dev/disk/by-partuuid/6f1c9a2e-01"),
        ('LABEL="cryptroot"', "/dev/disk/by-label/cryptroot"),
        ("partlabel=root", "/dev/disk/by-partlabel/root"),
        ("ID=nvme-Samsung_SSD-part3", "/dev/disk/by-id/nvme-Samsung_SSD-part3"),
        (
            "UUID=3f2a0c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b",
            "/dev/disk/by-uuid/3f2a0c1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b",
        ),
        ("LABEL=../../etc", None),
        ("SERIAL=x", None),
        ("none", None),
    ],
)
def test_a_crypttab_device_is_found_where_udev_links_it(device, path):
    assert crypttab.device_path(device) == path


def test_dracuts_install_items_add_up_in_reading_order():
    confs = [
        'install_items+=" /etc/keys/root.key "\n',
        "install_optional_items+=' /etc/keys/usb.key ' # optional\n",
        '# install_items+=" /etc/keys/old.key "\n',
        'install_items="/etc/keys/home.key"\n',
    ]
    assert crypttab.dracut_install_items(confs) == {"/etc/keys/home.key", "/etc/keys/usb.key"}
    assert crypttab.dracut_install_items(confs[:1]) == {"/etc/keys/root.key"}
    root = crypttab.parse(TAB)[0]
    assert crypttab.initramfs_key_file(root, None, frozenset({"/etc/keys/root.key"})) == (
        "/etc/keys/root.key"
    )
    assert crypttab.initramfs_key_file(root, None, frozenset({"/etc/keys/usb.key"})) is None
