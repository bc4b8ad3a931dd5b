"""The job: what the daemon (A) tells the save kernel's agent (B) to do.

Format (version 1): one UTF-8 JSON object, written by the daemon *after* the filesystems
are frozen into a small cpio archive appended to B's initramfs, so B finds it at
``/kjump/job.json`` (nothing is written to a frozen filesystem: the combined initrd lives
in /run, a tmpfs). Keys, all required::

    version                  1
    target_uuid              str, the target's UUID (lower-case, 36 chars) as in its superblock
    superblock_device_offset int >= 0, byte offset of the target superblock on the whole disk
    device_hint              {"devno": "MAJ:MIN", "name": "sda"}: a hint only; B finds the
                             device by magic + UUID at superblock_device_offset
    blockmap                 [[logical, device_offset, length], ...] bytes; device offsets are
                             relative to the whole disk; sorted by logical, contiguous from 0,
                             non-overlapping, lengths > 0
    ranges                   [[start, end), ...] physical memory ranges to save; sorted,
                             non-overlapping, start < end, page aligned
    mode                     one of MODES
    compression              "lz4" or "none"
    chunk_size               int, power of two, 4 KiB .. 64 MiB accepted; B saves with at most
                             MAX_CHUNK_SIZE (1 MiB): larger chunks break its 64 MiB RSS bound
    main_kernel              {"release": str, "build_id": str}
    save_kernel_hash         str, "sha256:<64 hex>"
    jump_area                [start, size], page aligned, size > 0
    fs_stamps                [{...}, ...] records from kjumpd.fsstamp (FsStamp.to_dict())
    created                  int, unix time
    cancel_key               bool: B offers "press c to cancel" on its console

Optional keys (added within version 1; an absent key takes its default, so an older job
still reads)::

    vmcoreinfo               [phys, size] of A's VMCOREINFO ELF note (from A's
                             /sys/kernel/vmcoreinfo), or null: B reads A's allocator state
                             through it (kjumpd.agent.freepages). Default null.
    free_page_exclusion      bool: B leaves A's free (buddy) pages out of the image (they
                             restore as zeros). Default true; needs vmcoreinfo.
    free_page_check          bool, a debug check for A booted with init_on_free=1: B reads
                             every page it calls free and verifies it is all zero (prints the
                             verdict; saves every page when it fails). Default false.
    free_pages_zeroed        bool: A expects its free pages to hold zeros (init_on_free), so
                             a wholly free chunk is an all-zero record that the restore writes
                             back as zeros. False: it is a free record (format.ENC_FREE) and
                             the restore leaves that memory as it finds it. Default true.
    ram_map                  {"source": "firmware"|"iomem", "ranges": [[start, end), ...]}: the
                             RAM A runs on (kjumpd.linux.iomem.RamMap), recorded in the image
                             so the restore-first environment refuses an image saved on
                             different RAM. Default null (nothing recorded: R checks only that
                             the saved ranges are RAM).
    image_key                str, 64 hex digits: the image key (kjumpd.image.seal); B encrypts
                             the image with it. It exists only in memory: this archive lives
                             in RAM (/run, then the kexec segments). Default null (plaintext).
    seal                     the image key sealed to the machine's public key (a seal object,
                             kjumpd.image.seal), recorded in the image. Given with image_key
                             only. Default null.
    volume                   the LUKS volume the target is inside (kjumpd.linux.luks.Volume
                             as a dict) plus "key": its volume key, hex. B rebuilds the
                             volume's mapping with it and finds the target inside;
                             superblock_device_offset and blockmap are then offsets in the
                             volume's plaintext. In memory only, as image_key. Default null.
    finish                   what B does once the image is SAVED: "jump-back" (A finishes the
                             mode), "power-off" or "reboot" (B does it: no jump back, no device
                             resume in A; a failed power-off falls back to the jump back).
                             Default "jump-back".
    park                     int: the generation of a warm-up (kjumpd.daemon.warm). B only
                             finds the target, answers PARKED(park) in the job slot
                             (kjumpd.image.jobslot) and jumps back, saving nothing; its
                             later jobs come through that slot, each with a higher
                             generation. Default 0: a save.
    answer                   [phys, nonce] or null: a page of A's memory at physical address
                             ``phys`` (page aligned) holding A's blank answer record with
                             ``nonce`` (32 hex digits), where B says why it could not save
                             (kjumpd.answer). Default null: no answer.

The archive is the kernel's cpio "newc" format, written and read by kjumpd/cpio.py.
"""

from __future__ import annotations

import json
import re
import stat
from dataclasses import asdict, dataclass, field
from typing import Any

from kjumpd import cpio
from kjumpd.errors import ImageFormatError, ImageKeyError, JobError, MemoryMapError
from kjumpd.linux.iomem import RamMap
from kjumpd.modes import MODES

# Largest chunk a save uses (config, kjump-agent --chunk-size, B's kernel role): each worker
# holds chunk-sized buffers of its own, so the agent's peak RSS grows with the chunk size;
# 1 MiB keeps it within its 64 MiB bound (docs/PERFORMANCE.md has the targets).
MAX_CHUNK_SIZE = 1 << 20

VERSION = 1
JOB_PATH = "kjump/job.json"
COMPRESSIONS = ("lz4", "none")
PAGE = 4096
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_DEVNO_RE = re.compile(r"^\d+:\d+$")
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Job:
    target_uuid: str
    superblock_device_offset: int
    device_hint: dict[str, str]
    blockmap: list[tuple[int, int, int]]
    ranges: list[tuple[int, int]]
    mode: str
    compression: str
    chunk_size: int
    main_kernel: dict[str, str]
    save_kernel_hash: str
    jump_area: tuple[int, int]
    fs_stamps: list[dict[str, Any]] = field(default_factory=list)
    created: int = 0
    cancel_key: bool = True
    vmcoreinfo: tuple[int, int] | None = None
    free_page_exclusion: bool = True
    free_page_check: bool = False
    free_pages_zeroed: bool = True
    ram_map: dict[str, Any] | None = None
    image_key: str | None = field(default=None, repr=False)
    seal: dict[str, Any] | None = None
    finish: str = "jump-back"
    volume: dict[str, Any] | None = field(default=None, repr=False)
    park: int = 0
    answer: tuple[int, str] | None = None
    version: int = VERSION

    def __post_init__(self) -> None:
        validate(self)

    # -- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blockmap"] = [list(e) for e in self.blockmap]
        d["ranges"] = [list(r) for r in self.ranges]
        d["jump_area"] = list(self.jump_area)
        d["vmcoreinfo"] = list(self.vmcoreinfo) if self.vmcoreinfo is not None else None
        d["answer"] = list(self.answer) if self.answer is not None else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_dict(cls, d: Any) -> Job:
        if not isinstance(d, dict):
            raise JobError("job is not a JSON object", fix="regenerate the job")
        version = d.get("version")
        if version != VERSION:
            raise JobError(
                f"job version {version!r} is not supported",
                why=f"this agent reads version {VERSION}",
                fix="use a save kernel built from the same kjumpd release",
            )
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(names - set(d) - set(_OPTIONAL))
        unknown = sorted(set(d) - names)
        if missing or unknown:
            raise JobError(
                "job fields do not match version 1",
                why=f"missing {missing}, unknown {unknown}",
                fix="use a save kernel built from the same kjumpd release",
            )
        try:
            return cls(
                target_uuid=d["target_uuid"],
                superblock_device_offset=d["superblock_device_offset"],
                device_hint=d["device_hint"],
                blockmap=[tuple(e) for e in _list(d["blockmap"], "blockmap")],
                ranges=[tuple(r) for r in _list(d["ranges"], "ranges")],
                mode=d["mode"],
                compression=d["compression"],
                chunk_size=d["chunk_size"],
                main_kernel=d["main_kernel"],
                save_kernel_hash=d["save_kernel_hash"],
                jump_area=tuple(_list(d["jump_area"], "jump_area")),
                fs_stamps=d["fs_stamps"],
                created=d["created"],
                cancel_key=d["cancel_key"],
                vmcoreinfo=(
                    None
                    if d.get("vmcoreinfo") is None
                    else tuple(_list(d["vmcoreinfo"], "vmcoreinfo"))
                ),
                free_page_exclusion=d.get("free_page_exclusion", _OPTIONAL["free_page_exclusion"]),
                free_page_check=d.get("free_page_check", _OPTIONAL["free_page_check"]),
                free_pages_zeroed=d.get("free_pages_zeroed", _OPTIONAL["free_pages_zeroed"]),
                ram_map=d.get("ram_map", _OPTIONAL["ram_map"]),
                image_key=d.get("image_key", _OPTIONAL["image_key"]),
                seal=d.get("seal", _OPTIONAL["seal"]),
                finish=d.get("finish", _OPTIONAL["finish"]),
                volume=d.get("volume", _OPTIONAL["volume"]),
                park=d.get("park", _OPTIONAL["park"]),
                answer=(None if d.get("answer") is None else tuple(_list(d["answer"], "answer"))),
                version=version,
            )
        except TypeError as e:
            raise JobError(
                "job field has the wrong shape", why=str(e), fix="regenerate the job"
            ) from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # nested too deep
            raise JobError("job is not valid JSON", why=str(e), fix="regenerate the job") from None
        return cls.from_dict(d)

    # -- cpio -------------------------------------------------------------------------
    def to_cpio(self, mtime: int | None = None) -> bytes:
        """A newc cpio holding ``kjump/`` and ``kjump/job.json``, to append to an initramfs."""
        t = self.created if mtime is None else mtime
        return cpio.write(
            [
                cpio.Entry.directory("kjump"),
                cpio.Entry(
                    JOB_PATH, stat.S_IFREG | 0o600, self.to_json().encode(), mtime=t & 0xFFFFFFFF
                ),
            ]
        )

    @property
    def image_bytes_max(self) -> int:
        return sum(e - s for s, e in self.ranges)


# keys a version-1 job may leave out, with the value they then take
_OPTIONAL: dict[str, Any] = {
    "vmcoreinfo": None,
    "free_page_exclusion": True,
    "free_page_check": False,
    "free_pages_zeroed": True,
    "ram_map": None,
    "image_key": None,
    "seal": None,
    "finish": "jump-back",
    "volume": None,
    "park": 0,
    "answer": None,
}
#: what B may do once the image is SAVED (the job's ``finish``)
FINISHES = ("jump-back", "power-off", "reboot")


def _list(v: Any, key: str) -> list[Any]:
    if not isinstance(v, list):
        raise JobError(f"job field {key} must be a list", fix="regenerate the job")
    return v


def _int(v: Any, key: str, minimum: int = 0) -> int:
    if type(v) is not int or v < minimum:
        raise JobError(
            f"job field {key} must be an integer >= {minimum}",
            why=f"got {v!r}",
            fix="regenerate the job",
        )
    return v


def validate(job: Job) -> None:
    """Raise JobError when a field is out of its documented domain."""
    if job.version != VERSION:
        raise JobError(f"job version {job.version!r} is not supported")
    if not isinstance(job.target_uuid, str) or not _UUID_RE.match(job.target_uuid):
        raise JobError(
            "job field target_uuid must be a lower-case UUID",
            why=f"got {job.target_uuid!r}",
            fix="re-run kjumpctl setup",
        )
    _int(job.superblock_device_offset, "superblock_device_offset")
    hint = job.device_hint
    if (
        not isinstance(hint, dict)
        or set(hint) != {"devno", "name"}
        or not isinstance(hint.get("devno"), str)
        or not _DEVNO_RE.match(hint["devno"])
        or not isinstance(hint.get("name"), str)
    ):
        raise JobError(
            "job field device_hint must be {devno: 'MAJ:MIN', name: str}", why=f"got {hint!r}"
        )
    expect = 0
    if not job.blockmap:
        raise JobError("job field blockmap is empty", fix="re-run kjumpctl setup")
    for i, ext in enumerate(job.blockmap):
        if not isinstance(ext, tuple) or len(ext) != 3:
            raise JobError(f"job blockmap[{i}] must be [logical, device_offset, length]")
        lo, dev, ln = (_int(x, f"blockmap[{i}]") for x in ext)
        if lo != expect or ln <= 0:
            raise JobError(
                f"job blockmap[{i}] is not contiguous from 0",
                why=f"expected logical {expect}, got {lo} (length {ln})",
            )
        expect = lo + ln
    last = -1
    for i, r in enumerate(job.ranges):
        if not isinstance(r, tuple) or len(r) != 2:
            raise JobError(f"job ranges[{i}] must be [start, end]")
        s, e = (_int(x, f"ranges[{i}]") for x in r)
        if not (s < e) or s < last or s % PAGE or e % PAGE:
            raise JobError(
                f"job ranges[{i}] is not sorted, page aligned and non-empty",
                why=f"[{s:#x}, {e:#x}) after end {last:#x}",
            )
        last = e
    if job.mode not in MODES:
        raise JobError(f"job field mode must be one of {', '.join(MODES)}", why=f"got {job.mode!r}")
    if job.compression not in COMPRESSIONS:
        raise JobError("job field compression must be lz4 or none", why=f"got {job.compression!r}")
    cs = _int(job.chunk_size, "chunk_size", PAGE)
    if cs & (cs - 1) or cs > 64 << 20:
        raise JobError(
            "job field chunk_size must be a power of two in 4 KiB..64 MiB", why=f"got {cs}"
        )
    mk = job.main_kernel
    if (
        not isinstance(mk, dict)
        or set(mk) != {"release", "build_id"}
        or not all(isinstance(v, str) for v in mk.values())
    ):
        raise JobError(
            "job field main_kernel must be {release: str, build_id: str}", why=f"got {mk!r}"
        )
    if not isinstance(job.save_kernel_hash, str) or not _HASH_RE.match(job.save_kernel_hash):
        raise JobError(
            "job field save_kernel_hash must be sha256:<64 hex>",
            why=f"got {job.save_kernel_hash!r}",
        )
    ja = job.jump_area
    if not isinstance(ja, tuple) or len(ja) != 2:
        raise JobError("job field jump_area must be [start, size]")
    js, jn = _int(ja[0], "jump_area"), _int(ja[1], "jump_area", 1)
    if js % PAGE or jn % PAGE:
        raise JobError("job field jump_area must be page aligned", why=f"[{js:#x}, {jn:#x}]")
    for s, e in job.ranges:
        if s < js + jn and js < e:
            raise JobError(
                "job ranges overlap the jump area", why=f"[{s:#x}, {e:#x}) vs [{js:#x}, +{jn:#x})"
            )
    if not isinstance(job.fs_stamps, list) or not all(isinstance(x, dict) for x in job.fs_stamps):
        raise JobError("job field fs_stamps must be a list of objects")
    _int(job.created, "created")
    if not isinstance(job.cancel_key, bool):
        raise JobError("job field cancel_key must be true or false", why=f"got {job.cancel_key!r}")
    if job.vmcoreinfo is not None:
        vc = job.vmcoreinfo
        if not isinstance(vc, tuple) or len(vc) != 2:
            raise JobError("job field vmcoreinfo must be [phys, size] or null", why=f"got {vc!r}")
        _int(vc[0], "vmcoreinfo")
        _int(vc[1], "vmcoreinfo", 1)
    if job.ram_map is not None:
        try:
            RamMap.from_dict(job.ram_map)
        except MemoryMapError as e:
            raise JobError(f"job field ram_map: {e.what}", why=e.why) from None
    for key in ("free_page_exclusion", "free_page_check", "free_pages_zeroed"):
        if not isinstance(getattr(job, key), bool):
            raise JobError(
                f"job field {key} must be true or false", why=f"got {getattr(job, key)!r}"
            )
    _int(job.park, "park")
    if job.answer is not None:
        if len(job.answer) != 2:
            raise JobError("job field answer must be [phys, nonce]", why=f"got {job.answer!r}")
        phys, nonce = job.answer
        _int(phys, "answer address")
        if phys % PAGE:
            raise JobError("job field answer: the address is not page aligned", why=f"{phys:#x}")
        if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
            raise JobError("job field answer: the nonce is not 32 hex digits", why=f"{nonce!r}")
    if job.finish not in FINISHES:
        raise JobError(
            f"job field finish must be one of {', '.join(FINISHES)}", why=f"got {job.finish!r}"
        )
    if job.volume is not None:
        from kjumpd.errors import VolumeError

        if not isinstance(job.volume, dict):
            raise JobError("job field volume must be an object or null")
        try:
            volume_of(job)
        except VolumeError as e:
            raise JobError(f"job field volume: {e.what}", why=e.why) from None
    if (job.image_key is None) != (job.seal is None):
        raise JobError("job fields image_key and seal must be given together")
    if job.image_key is not None:
        if not isinstance(job.image_key, str) or not _KEY_RE.match(job.image_key):
            raise JobError("job field image_key must be 64 lower-case hex digits")
        from kjumpd.image.seal import check_seal

        try:
            check_seal(job.seal, "job field seal")
        except ImageKeyError as e:
            raise JobError(e.what, why=e.why) from None


def volume_of(job: Job) -> tuple[Any, bytes] | None:
    """(kjumpd.linux.luks.Volume, its key) of a job whose target is inside a LUKS volume."""
    if job.volume is None:
        return None
    from kjumpd.linux.luks import keyed_from_dict

    return keyed_from_dict(job.volume)


def image_key_bytes(job: Job) -> bytes | None:
    """The job's image key (None: the image is saved in plaintext)."""
    return bytes.fromhex(job.image_key) if job.image_key is not None else None


def read_cpio(blob: bytes) -> dict[str, bytes]:
    """{name: data} of the regular files in concatenated newc archives (NUL padding between
    them allowed). Used by tests and by ``kjumpctl plan`` to show a job."""
    try:
        return cpio.regular_files(cpio.read_concatenated(blob))
    except ImageFormatError as e:
        raise JobError("the job archive is not a whole newc cpio", why=e.message) from None


def job_from_cpio(blob: bytes) -> Job:
    files = read_cpio(blob)
    if JOB_PATH not in files:
        raise JobError(f"{JOB_PATH} is not in the archive", fix="regenerate the job")
    return Job.from_json(files[JOB_PATH])
