"""Initramfs builders: the save kernel's (B) and a generic one other environments reuse (R, tests).

An initramfs here is a compressed cpio "newc" archive (format: kjumpd/cpio.py) holding
- busybox-static (a shell, mount, poweroff) with an applet link for each of its commands,
- optionally Debian's python3 (the host's /usr/bin/python3) with a *trimmed* standard library:
  only the modules an import trace of the entry modules loaded, compiled to sourceless .pyc,
  plus the extension modules they need; whole packages (kjumpd from this checkout, python3-lz4
  from /usr/lib/python3/dist-packages) are copied as trees into the interpreter's stdlib
  directory, so ``python3 -S -E`` finds them without site-packages,
- host binaries with every shared library ``ldd`` names (e.g. kexec-tools' /usr/sbin/kexec),
- extra files, and an /init script.

Compression: the kernel's "legacy" lz4 format as ``lz4 -l -9`` writes it, by python3-lz4
(kjumpd.initrd.lz4_legacy_compress: an 18 MB archive of B in 1.0 s on one core, where gzip -9
takes 3.6 s), else gzip -9. Measured in the TCG VM (the same 17 MB archive of B, kernel
alone, two boots each): the kernel unpacks lz4 in ~0.6 s, gzip in ~1.2 s, zstd -19 in ~1.3 s
(no faster than gzip there, despite 3x in userspace), plain cpio in ~0.9 s; lz4 is 8.1 MB
against gzip's 7.0.
Kernels read it with CONFIG_RD_LZ4, which defaults to y wherever CONFIG_BLK_DEV_INITRD is
(Debian's and savekernel/'s kernels have it), and unpack an archive appended after it (the
job) like after gzip. zstd archives are read here too (decompress()), not written.

Builds are cached under ${KJUMPD_CACHE:-~/.cache/kjumpd}/initramfs/NAME-KEY.cpio.{lz4,gz} where
KEY hashes RECIPE, the compression, the init script and the bytes of every input file, so any
change to an input (including the kjumpd package) makes a new archive and an unchanged tree
costs only hashing.

Command line:  python -m savekernel.initramfs save [--out FILE]   (prints the archive's path)
               python -m savekernel.initramfs list FILE            (members, for inspection)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python savekernel/initramfs.py` as well as `-m`
    sys.path.insert(0, str(REPO))

from kjumpd import cpio
from kjumpd.errors import KjumpError
from kjumpd.initrd import (  # noqa: F401 - read_archive and decompress are this module's API too
    LZ4_LEGACY_MAGIC,
    decompress,
    lz4_legacy_compress,
    lz4_legacy_length,
    read_archive,
)
from savekernel import buildcache

log = logging.getLogger("kjumpd.savekernel.initramfs")

#: Bump when the way archives are assembled changes (invalidates every cached archive).
RECIPE = "initramfs-v2"
HOST_PYTHON = Path("/usr/bin/python3")
BUSYBOX = Path("/bin/busybox")
DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")

#: Standard-library modules B's agent may import lazily (an import trace cannot see them).
SAVE_EXTRA_MODULES = (
    "runpy",
    "ctypes",
    "ctypes.util",
    "mmap",
    "json",
    "json.decoder",
    "json.encoder",
    "logging",
    "argparse",
    "concurrent.futures",
    "concurrent.futures.thread",
    "threading",
    "queue",
    "hashlib",
    "zlib",
    "struct",
    "uuid",
    "select",
    "termios",
    "tty",
    "signal",
    "dataclasses",
    "enum",
    "errno",
    "fcntl",
    "binascii",
    "traceback",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
    "encodings.aliases",
    "lz4.frame",
    "lz4.block",
)
#: What encrypted images need (kjumpd.image.seal imports them lazily): Debian's
#: python3-cryptography and the cffi backend its OpenSSL bindings load.
CRYPTO_MODULES = (
    "kjumpd.image.seal",
    "cryptography.exceptions",
    "cryptography.hazmat.primitives.hashes",
    "cryptography.hazmat.primitives.serialization",
    "cryptography.hazmat.primitives.asymmetric.x25519",
    "cryptography.hazmat.primitives.ciphers.aead",
    "cryptography.hazmat.primitives.kdf.hkdf",
    "cryptography.hazmat.primitives.kdf.scrypt",
)
CRYPTO_PACKAGES = ("cryptography", "_cffi_backend")


def crypto_host_files() -> tuple[Path, ...]:
    """OpenSSL 3's legacy provider: cryptography 38 loads it at import and fails without
    it (libcrypto looks for it where the host's is, so it goes to the same path)."""
    return tuple(sorted(Path("/usr/lib").glob("*/ossl-modules/legacy.so")))


#: Modules left out although an import trace loads them: each has a fallback in the stdlib
#: (hashlib uses its builtin _sha256/_blake2 without OpenSSL's 4.7 MB libcrypto; shutil and
#: tarfile treat bz2/lzma as optional).
DEFAULT_EXCLUDE = ("_hashlib", "_ssl", "ssl", "_bz2", "bz2", "_lzma", "lzma")
#: The agent's entry module (/init runs it) and the modules it imports lazily.
SAVE_ENTRY = (
    "kjumpd.agent.kernel_role",
    "kjumpd.agent.devmem",
    "kjumpd.agent.jumpback",
    "kjumpd.image.save",
    "kjumpd.image.restore",
    "kjumpd.image.store",
    "kjumpd.job",
    "kjumpd.agent.freepages",
    "kjumpd.agent.pageclass",
    "kjumpd.agent.watchdog",
    "kjumpd.image.heap",
    "kjumpd.linux.luks",
    "kjumpd.linux.devmapper",
)

#: what B's /init runs with python3 -c (and the arguments "boot" or "boot --rescue")
AGENT_CODE = (
    "import sys, kjumpd_bootcache; kjumpd_bootcache.install(); "
    "from kjumpd.agent.kernel_role import main; sys.exit(main(sys.argv[1:]))"
)

SAVE_INIT = """#!/bin/sh
# /init of kjumpd's save kernel (B): mount the kernel filesystems, run the agent.
export PATH=/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "kjump-init: starting the agent"
# one glibc heap arena per worker thread would keep freed chunk buffers around: B has ~80 MiB
export MALLOC_ARENA_MAX=2
# PYTHONHASHSEED=0: python reads no random bytes at start-up. Started by R (which boots
# without an RNG seed), this kernel has none either, and python's first /dev/urandom read
# would wait for the kernel's jitter entropy (1-2 s under TCG). The agent uses no randomness.
# env -i instead of python's -E (which would ignore PYTHONHASHSEED): nothing else is passed.
# -c, not -m: runpy and what it imports are not needed (every module costs under TCG)
PY="env -i PATH=$PATH MALLOC_ARENA_MAX=2 PYTHONHASHSEED=0 /usr/bin/python3 -S -B -u"
AGENT="{agent}"
$PY -c "$AGENT" boot
rc=$?
# The agent jumps back to the main kernel itself; reaching this line means it could not
# (e.g. it was OOM-killed). Try once more with a minimal agent: image ABORTED, jump back.
echo "kjump-init: the agent exited with status $rc without jumping back"
$PY -c "$AGENT" boot --rescue
# Still here: reboot; the restore-first entry boots the normal system (the image is not SAVED).
echo "kjump-init: no way back to the main kernel; rebooting"
sync
reboot -f
""".replace("{agent}", AGENT_CODE)


class InitramfsError(KjumpError):
    """An initramfs could not be assembled from the host's files."""


@dataclass(frozen=True)
class InitramfsImage:
    """A built (or cached) archive and the figures worth reporting."""

    path: Path
    key: str
    compressed_size: int
    uncompressed_size: int
    members: int
    cached: bool


@dataclass
class _Plan:
    """Archive members before compression: name -> (kind, payload)."""

    files: dict[str, Path | bytes] = field(default_factory=dict)  # regular files
    modes: dict[str, int] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # symlinks
    compile: dict[str, Path] = field(default_factory=dict)  # .pyc name -> .py source
    #: files made by the build from the inputs (not hashed into the key: derived from
    #: what is, and their bytes need not be reproducible)
    generated: dict[str, bytes] = field(default_factory=dict)
    trace: tuple[str, ...] = ()  # the modules traced (what ``generated`` came from)
    python: Path = HOST_PYTHON  # compiles the .pyc files

    def add_file(self, name: str, src: Path | bytes, mode: int = 0o644) -> None:
        name = name.lstrip("/")
        self.files[name] = src
        self.modes[name] = mode

    def names(self) -> set[str]:
        return set(self.files) | set(self.links) | set(self.compile) | set(self.generated)


def codec() -> str:
    """ "lz4" when python3-lz4 is there (kjumpd needs it anyway), else "gzip"."""
    try:
        import lz4.block  # noqa: F401
    except ImportError:
        return "gzip"
    return "lz4"


def _compress(raw: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(raw, compresslevel=9, mtime=0)
    if how == "lz4":
        return lz4_legacy_compress(raw)
    return raw


def cache_dir() -> Path:
    return buildcache.cache_root() / "initramfs"


# ---------------------------------------------------------------------------------------------
# host files and their shared libraries

_MERGED = ("bin", "sbin", "lib", "lib64")


def _host_canonical(path: Path) -> str:
    """The archive name for a host path: its parent directory resolved (merged /usr)."""
    return str(Path(os.path.realpath(path.parent)) / path.name).lstrip("/")


def _add_host_path(plan: _Plan, path: Path, mode: int | None = None) -> None:
    """Add a host file, following symlinks (each link is recreated, then its target added)."""
    for _ in range(40):
        name = _host_canonical(path)
        if path.is_symlink():
            target = os.readlink(path)
            plan.links[name] = target
            path = (path.parent / target) if not os.path.isabs(target) else Path(target)
            continue
        if not path.is_file():
            raise InitramfsError(
                f"{path} is not a regular file on this host",
                fix="install the Debian package that provides it",
            )
        st = path.stat()
        plan.add_file(name, path, mode if mode is not None else stat.S_IMODE(st.st_mode))
        return
    raise InitramfsError(f"{path}: too many levels of symbolic links")


_LDD_LINE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")

#: what ldd resolved, by (path, mtime, size): one install builds two or more archives that
#: share the interpreter and its extension modules, and each ldd run starts a shell (under
#: an emulator, most of the cost of an archive whose inputs did not change)
_LDD_CACHE: dict[tuple[str, int, int], list[Path]] = {}


def _ldd_key(binary: Path) -> tuple[str, int, int] | None:
    try:
        st = binary.stat()
    except OSError:
        return None
    return (str(binary), st.st_mtime_ns, st.st_size)


def _run_ldd(binaries: Sequence[Path]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["ldd", *map(str, binaries)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise InitramfsError("ldd is missing", fix="apt-get install libc-bin") from None


def _parse_ldd(binary: Path, lines: Iterable[str]) -> list[Path]:
    libs = []
    for line in lines:
        if "not found" in line:
            raise InitramfsError(
                f"{binary} needs a library that is not installed",
                why=line.strip(),
                fix="install the missing library package",
            )
        m = _LDD_LINE.search(line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def prefetch_shared_libraries(binaries: Iterable[Path]) -> None:
    """Resolve the shared objects of several files with one ``ldd`` run; shared_libraries()
    then answers from memory. A file ldd lists nothing for (static, unreadable) is left
    to shared_libraries(), which asks about it alone and says what is wrong."""
    todo = {k: b for b in binaries if (k := _ldd_key(b)) is not None and k not in _LDD_CACHE}
    if len(todo) < 2:
        return
    out = _run_ldd(list(todo.values()))
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.stdout.splitlines():
        if not line.startswith(("\t", " ")) and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
        elif current is not None:
            current.append(line)
    for key, b in todo.items():
        lines = sections.get(str(b))
        if lines and not any("not found" in ln for ln in lines):
            _LDD_CACHE[key] = _parse_ldd(b, lines)


def shared_libraries(binary: Path) -> list[Path]:
    """The shared objects ``ldd`` resolves for binary (empty for a static binary)."""
    key = _ldd_key(binary)
    if key is not None and key in _LDD_CACHE:
        return list(_LDD_CACHE[key])
    out = _run_ldd([binary])
    if out.returncode != 0 and "not a dynamic executable" not in out.stdout + out.stderr:
        raise InitramfsError(f"ldd {binary} failed", why=(out.stderr or out.stdout).strip())
    libs = _parse_ldd(binary, out.stdout.splitlines()) if out.returncode == 0 else []
    if key is not None:
        _LDD_CACHE[key] = libs
    return list(libs)


def add_host_binary(plan: _Plan, binary: Path) -> None:
    _add_host_path(plan, binary)
    for lib in shared_libraries(binary):
        _add_host_path(plan, lib)


def _add_busybox(plan: _Plan) -> None:
    if not BUSYBOX.is_file():
        raise InitramfsError(f"{BUSYBOX} is missing", fix="apt-get install busybox-static")
    if shared_libraries(BUSYBOX):
        raise InitramfsError(f"{BUSYBOX} is not static", fix="apt-get install busybox-static")
    out = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    plan.add_file("usr/bin/busybox", BUSYBOX, 0o755)
    taken = plan.names()
    for applet in out.stdout.split():
        name = f"usr/bin/{applet}"
        if name not in taken and "/" not in applet:
            plan.links[name] = "busybox"


# ---------------------------------------------------------------------------------------------
# the trimmed python

_RESOLVE = r"""
import importlib, json, sys, sysconfig
paths, modules = json.loads(sys.argv[1]), json.loads(sys.argv[2])
dc_out = sys.argv[3]
sys.path[:0] = paths
texts = []
if dc_out:
    import builtins, dataclasses
    def _record(source, globals=None, locals=None, /):
        if isinstance(source, str):
            texts.append(source)
        return builtins.exec(source, globals, locals)
    dataclasses.exec = _record
missing = []
for m in modules:
    try:
        importlib.import_module(m)
    except ImportError as e:
        missing.append(f"{m}: {e}")
if dc_out:
    import importlib.util, marshal
    codes = {t: compile(t, "<string>", "exec", dont_inherit=True) for t in dict.fromkeys(texts)}
    src = BOOTCACHE_SOURCE.replace("CODES", repr(marshal.dumps(codes)))
    code = compile(src, "/" + BOOTCACHE_NAME, "exec", dont_inherit=True)
    pyc = importlib._bootstrap_external._code_to_hash_pyc(
        code, importlib.util.source_hash(src.encode()), checked=False)
    with open(dc_out, "wb") as f:
        f.write(pyc)
files = {}
for name, mod in sorted(sys.modules.items()):
    f = getattr(mod, "__file__", None)
    if f:
        files[name] = f
print(json.dumps({"files": files, "missing": missing, "stdlib": sysconfig.get_paths()["stdlib"],
                  "platstdlib": sysconfig.get_paths()["platstdlib"],
                  "version": "%d.%d" % sys.version_info[:2]}))
"""

#: The module B's and R's python import first (``install()``): the code of the methods
#: @dataclass generates, compiled when the archive is built. dataclasses writes each
#: __init__/__repr__/__eq__/... as source text and compiles it when the class is created;
#: under TCG that was ~0.6 ms a method natively, ~100 methods for B's modules: about a tenth
#: of B's python start-up. install() makes dataclasses' exec() take the precompiled code
#: for a text it knows (the same text compiled the same way) and compile any other.
BOOTCACHE = "kjumpd_bootcache"
BOOTCACHE_SOURCE = '''"""Precompiled code of the methods @dataclass generates
(savekernel/initramfs.py)."""
import builtins
import marshal

#: texts that had no precompiled code (compiled at run time, as without this module)
misses = []


def install():
    import dataclasses
    codes = marshal.loads(CODES)

    def exec(source, globals=None, locals=None, /):
        if isinstance(source, str):
            code = codes.get(source)
            if code is None:
                misses.append(source)
            else:
                source = code
        return builtins.exec(source, globals, locals)

    dataclasses.exec = exec
'''
#: what python -c runs first in B and R
BOOTCACHE_INSTALL = f"import {BOOTCACHE}; {BOOTCACHE}.install()"

_COMPILE = r"""
import json, py_compile, sys
for src, out, dfile in json.loads(sys.stdin.read()):
    py_compile.compile(src, cfile=out, dfile=dfile, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def _package_dir(name: str, search: Sequence[Path]) -> Path:
    """The directory of package ``name``, or the file of a top-level extension module
    (``_cffi_backend``, which cryptography's OpenSSL bindings load)."""
    top = name.split(".")[0]
    for base in search:
        if (base / top / "__init__.py").is_file():
            return base / top
        ext = sorted(base.glob(f"{top}.cpython-*.so")) if base.is_dir() else []
        if ext:
            return ext[0]
    raise InitramfsError(
        f"python package {top} not found",
        why=f"searched {', '.join(map(str, search))}",
        fix="install it (e.g. apt-get install python3-lz4)",
    )


def _add_python(
    plan: _Plan,
    modules: Sequence[str],
    packages: Sequence[str],
    python: Path,
    exclude: Sequence[str],
    scripts: Mapping[str, Path] | None = None,
) -> None:
    # beside kjumpd (a checkout, or the site-packages a wheel went to), Debian's packages,
    # then wherever this python finds them (lz4 from a venv)
    search = [REPO, DIST_PACKAGES, *(Path(p) for p in sys.path if p)]
    pkg_dirs = [_package_dir(p, search) for p in packages]
    resolve = (
        f"BOOTCACHE_SOURCE = {BOOTCACHE_SOURCE!r}\n"
        f"BOOTCACHE_NAME = {BOOTCACHE + '.py'!r}\n" + _RESOLVE
    )
    with tempfile.TemporaryDirectory(prefix="kjumpd-trace-") as tmp:
        dc_out = str(Path(tmp) / "bootcache.pyc") if packages else ""
        proc = subprocess.run(
            [
                str(python),
                "-S",
                "-E",
                "-B",
                "-c",
                resolve,
                json.dumps([str(d.parent) for d in pkg_dirs]),
                json.dumps(list(modules)),
                dc_out,
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
        bootcache = Path(dc_out).read_bytes() if dc_out and proc.returncode == 0 else None
    if proc.returncode != 0:
        raise InitramfsError(
            f"{python} could not trace the agent's imports",
            why=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "",
            fix="run the command by hand to see the error",
        )
    info = json.loads(proc.stdout)
    if info["missing"]:
        raise InitramfsError(
            "modules for the initramfs cannot be imported",
            why="; ".join(info["missing"]),
            fix="install them or fix the import",
        )
    stdlib = Path(info["stdlib"])
    pydir = f"usr/lib/python{info['version']}"
    objects = [python, *(Path(f) for f in info["files"].values() if f.endswith(".so"))]
    for d in pkg_dirs:
        objects += [d] if d.is_file() else sorted(p for p in d.rglob("*.so") if p.is_file())
    prefetch_shared_libraries(objects)
    add_host_binary(plan, python)
    pkg_roots = {d.name.split(".")[0]: d for d in pkg_dirs}
    for name, f in info["files"].items():
        path = Path(f)
        if name.split(".")[0] in pkg_roots:
            continue  # copied as a whole tree below
        if name in exclude or name.split(".")[0] in exclude:
            continue
        try:
            rel = path.relative_to(stdlib)
        except ValueError:
            raise InitramfsError(
                f"module {name} comes from {path}, outside the standard library",
                fix=f"name its package in packages= (e.g. {name.split('.')[0]})",
            ) from None
        if path.suffix == ".py":
            plan.compile[f"{pydir}/{rel.with_suffix('.pyc')}"] = path
        elif path.suffix == ".so":
            _add_host_path(plan, path)
            for lib in shared_libraries(path):
                _add_host_path(plan, lib)
        else:
            raise InitramfsError(f"module {name} has an unexpected file {path}")
    if f"{pydir}/os.pyc" not in plan.compile:
        raise InitramfsError("the import trace did not load os", why="unexpected interpreter")
    if bootcache is not None:
        plan.generated[f"{pydir}/{BOOTCACHE}.pyc"] = bootcache
    for mod, src in (scripts or {}).items():
        # a script run at every boot is compiled here, not by python at each start (under
        # TCG compiling R's ~300-line /init cost as much as importing a dozen modules)
        plan.compile[f"{pydir}/{mod}.pyc"] = Path(src)
    for d in pkg_roots.values():
        if d.is_file():  # a top-level extension module
            plan.add_file(f"{pydir}/{d.name}", d)
            for lib in shared_libraries(d):
                _add_host_path(plan, lib)
            continue
        for src in sorted(d.rglob("*")):
            if "__pycache__" in src.parts or not src.is_file():
                continue
            rel = src.relative_to(d.parent)
            name = f"{pydir}/{rel}"
            if src.suffix == ".py":
                plan.add_file(name, src)
                tag = "cpython-" + info["version"].replace(".", "")
                cache_name = f"{pydir}/{rel.parent}/__pycache__/{src.stem}.{tag}.pyc"
                plan.compile[cache_name] = src
            elif src.suffix == ".so":
                plan.add_file(name, src)
                for lib in shared_libraries(src):
                    _add_host_path(plan, lib)
    plan.python = python
    plan.trace = tuple(modules)


def _compile_all(plan: _Plan, work: Path) -> dict[str, bytes]:
    if not plan.compile:
        return {}
    jobs = []
    for i, (name, src) in enumerate(sorted(plan.compile.items())):
        # the file name tracebacks show: the module's path inside the archive
        if "__pycache__" in name:
            dfile = "/" + str(Path(name).parent.parent / (src.stem + ".py"))
        else:
            dfile = "/" + name[:-1]
        jobs.append((str(src), str(work / f"{i}.pyc"), dfile))
    proc = subprocess.run(
        [str(plan.python), "-S", "-E", "-c", _COMPILE],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise InitramfsError(
            "compiling the initramfs's python modules failed",
            why=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "",
        )
    return {
        name: (work / f"{i}.pyc").read_bytes()
        for i, (name, _src) in enumerate(sorted(plan.compile.items()))
    }


# ---------------------------------------------------------------------------------------------
# the archive


def _key(plan: _Plan, init_script: str) -> str:
    h = hashlib.sha256()
    h.update(
        RECIPE.encode() + b"\0" + init_script.encode() + b"\0" + str(plan.python).encode() + b"\0"
    )

    def content(src: Path | bytes) -> bytes:
        if isinstance(src, bytes):
            return hashlib.sha256(src).digest()
        with open(src, "rb") as f:
            return hashlib.file_digest(f, "sha256").digest()

    for name in sorted(plan.files):
        h.update(
            b"F" + name.encode() + b"\0" + b"%o" % plan.modes[name] + content(plan.files[name])
        )
    for name in sorted(plan.links):
        h.update(b"L" + name.encode() + b"\0" + plan.links[name].encode() + b"\0")
    for name in sorted(plan.compile):
        h.update(b"C" + name.encode() + b"\0" + content(plan.compile[name]))
    for name in sorted(plan.generated):
        h.update(b"G" + name.encode() + b"\0")
    h.update(b"T" + "\0".join(plan.trace).encode())
    return h.hexdigest()[:20]


def _entries(plan: _Plan, init_script: str, compiled: Mapping[str, bytes]) -> Iterable[cpio.Entry]:
    for d in ("dev", "proc", "sys", "tmp", "run", "usr/bin", "usr/sbin", "usr/lib", "usr/lib64"):
        yield cpio.Entry.directory(d, 0o1777 if d == "tmp" else 0o755)
    yield cpio.Entry.chardev("dev/console", 5, 1)
    yield cpio.Entry.chardev("dev/null", 1, 3, 0o666)
    for top in _MERGED:
        if f"{top}" not in plan.names():
            yield cpio.Entry.symlink(top, f"usr/{top}")
    yield cpio.Entry.file("init", init_script.encode(), 0o755)
    items: list[tuple[str, cpio.Entry]] = []
    for name, src in plan.files.items():
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        items.append((name, cpio.Entry.file(name, data, plan.modes[name])))
    for name, target in plan.links.items():
        if name not in plan.files:
            items.append((name, cpio.Entry.symlink(name, target)))
    for name, data in (*compiled.items(), *plan.generated.items()):
        items.append((name, cpio.Entry.file(name, data)))
    for _name, e in sorted(items, key=lambda t: t[0]):
        yield e


def build_initramfs(
    out: Path | None,
    init_script: str,
    extra_files: Mapping[str, Path | bytes] | None = None,
    *,
    name: str = "custom",
    python_modules: Sequence[str] = (),
    python_packages: Sequence[str] = (),
    host_binaries: Sequence[Path | str] = (),
    busybox: bool = True,
    python: Path = HOST_PYTHON,
    exclude_modules: Sequence[str] = DEFAULT_EXCLUDE,
    compress: bool = True,
    python_scripts: Mapping[str, Path] | None = None,
) -> InitramfsImage:
    """Build (or reuse from the cache) a compressed (lz4, else gzip: see codec()) cpio
    initramfs; copy it to out when given. With compress=False the archive is plain cpio
    (larger to load, nothing to inflate).

    init_script becomes /init (give it a #! line; /bin/sh is busybox). extra_files maps archive
    paths ("kjump/job.json", "boot/bzImage") to host files or bytes. python_modules are traced
    with the host's python3 (nothing python is added when both python lists are empty);
    python_packages are copied whole (e.g. ("kjumpd", "lz4")); exclude_modules are left out
    even when traced (their importers must cope). host_binaries are added with the shared
    libraries ldd lists. python_scripts maps module names to source files compiled into
    the archive as sourceless modules (``python3 -c "import NAME"`` runs one without
    compiling it at start-up); the modules they import must be in python_modules.
    """
    plan = _Plan()
    if busybox:
        _add_busybox(plan)
    prefetch_shared_libraries(Path(b) for b in host_binaries)
    for b in host_binaries:
        add_host_binary(plan, Path(b))
    if python_modules or python_packages:
        _add_python(
            plan,
            list(python_modules) + list(python_packages),
            python_packages,
            python,
            exclude_modules,
            python_scripts,
        )
    for arc, src in (extra_files or {}).items():
        arc = arc.lstrip("/")
        if isinstance(src, (str, Path)) and not Path(src).is_file():
            raise InitramfsError(f"extra file {src} for {arc} is missing")
        mode = 0o755 if isinstance(src, Path) and os.access(src, os.X_OK) else 0o644
        plan.add_file(arc, src if isinstance(src, bytes) else Path(src), mode)
    how = codec() if compress else "none"
    key = _key(plan, init_script + {"gzip": "", "none": "\0plain"}.get(how, f"\0{how}"))
    cdir = cache_dir()
    cached = (
        cdir / f"{name}-{key}.cpio{ {'gzip': '.gz', 'zstd': '.zst', 'lz4': '.lz4'}.get(how, '') }"
    )
    meta = cdir / f"{name}-{key}.json"

    def complete(archive: Path) -> bool:
        return archive.is_file() and meta.is_file()

    def make(tmp_out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="kjumpd-initramfs-") as tmp:
            compiled = _compile_all(plan, Path(tmp))
            raw = cpio.write(_entries(plan, init_script, compiled))
        packed = _compress(raw, how)
        if how == "lz4":
            # an lz4 legacy stream has no end mark: the kernel's reader stops at a zero block
            # size, else it takes the next archive's "0707" for one ("Decoding failed")
            packed += bytes(4)
        # Zero padding to a multiple of 4: the kernel only takes an archive appended after
        # this one (the job) when it starts 4-byte aligned (init/initramfs.c, unpack_to_rootfs)
        # and skips zeros between archives (its gzip, lz4 and zstd readers stop at the end
        # of their stream).
        packed += bytes(-len(packed) % 4)
        # the figures first: the archive is renamed into place last, so one that exists
        # always has them
        tmp_meta = meta.with_name(f".{meta.name}.partial-{os.getpid()}")
        tmp_meta.write_text(
            json.dumps({"uncompressed_size": len(raw), "members": len(cpio.read(raw))})
        )
        os.replace(tmp_meta, meta)
        with open(tmp_out, "wb") as f:
            f.write(packed)
        log.info("initramfs %s: %d bytes (%d uncompressed)", cached, len(packed), len(raw))

    hit = not buildcache.build_entry(cached, make, valid=complete)
    if not hit:
        prune_cache(cdir, name)
    else:
        os.utime(cached)  # in use: pruning spares recently used archives
    info = json.loads(meta.read_text())
    result = cached
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_copy = out.with_name(out.name + ".tmp")
        shutil.copyfile(cached, tmp_copy)
        os.replace(tmp_copy, out)
        result = out
    return InitramfsImage(
        result, key, cached.stat().st_size, info["uncompressed_size"], info["members"], hit
    )


#: archives of one name kept whatever their age (the newest first), and how long one stays
#: safe from pruning after its last use (a VM test run may still pass it to QEMU)
MAX_ARCHIVES = 4
PRUNE_AGE = 2 * 3600


def prune_cache(cdir: Path, name: str, now: float | None = None) -> list[Path]:
    """Remove old cached archives called ``name`` (with their .json); return them. Keeps the
    two newest and any used in the last PRUNE_AGE seconds, but never more than MAX_ARCHIVES:
    each change to kjumpd/ makes a new one (2.8 GiB of them after a day of work)."""
    now = time.time() if now is None else now
    archives = sorted(
        (
            p
            for p in cdir.glob(f"{name}-*.cpio*")
            if not p.name.endswith(".tmp") and p.name[len(name) + 1 :].split(".", 1)[0].isalnum()
        ),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    gone = [
        p
        for i, p in enumerate(archives)
        if i >= MAX_ARCHIVES or (i >= 2 and now - p.stat().st_mtime >= PRUNE_AGE)
    ]
    for p in gone:
        p.unlink(missing_ok=True)
        p.with_name(p.name.split(".cpio", 1)[0] + ".json").unlink(missing_ok=True)
    return gone


def build_save_initramfs(
    out: Path | None = None, compress: bool = True, crypto: bool = False
) -> InitramfsImage:
    """B's initramfs: busybox, trimmed python3, python3-lz4, kjumpd, /init running the agent;
    with ``crypto`` python3-cryptography for encrypted images."""
    return build_initramfs(
        out,
        SAVE_INIT,
        name="save",
        python_modules=(*SAVE_ENTRY, *SAVE_EXTRA_MODULES, *(CRYPTO_MODULES if crypto else ())),
        python_packages=("kjumpd", "lz4", *(CRYPTO_PACKAGES if crypto else ())),
        host_binaries=crypto_host_files() if crypto else (),
        compress=compress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    p = argparse.ArgumentParser(
        prog="python -m savekernel.initramfs",
        description="Build kjumpd's initramfs archives (cached).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="the save kernel's initramfs; prints its path")
    s.add_argument("--out", type=Path, help="copy the archive here")
    s.add_argument(
        "--plain", action="store_true", help="no compression (nothing to inflate, larger)"
    )
    ls = sub.add_parser("list", help="list the members of an archive")
    ls.add_argument("archive", type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "save":
            img = build_save_initramfs(args.out, compress=not args.plain)
            print(f"{img.path}", flush=True)
            print(
                f"save initramfs: {img.compressed_size} bytes "
                f"{codec() if not args.plain else 'plain'}, {img.uncompressed_size} uncompressed, "
                f"{img.members} members{' (cached)' if img.cached else ''}",
                file=sys.stderr,
            )
        else:
            for e in read_archive(args.archive):
                print(f"{e.mode:07o} {len(e.data):>10} {e.name}")
    except KjumpError as e:
        print(f"initramfs: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
