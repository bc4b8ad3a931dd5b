"""Encrypted, authenticated images (seal format version 1).

An image saved with a key holds A's memory only as AES-256-GCM ciphertext, and nothing in
it can be changed (damaged or crafted) without the restore refusing it before any of it
is decoded. Hibernation stays unattended: the daemon needs only the *public* half of the
machine's image key; the private half is protected by a passphrase typed at restore time
(uswsusp's model).

Per image, the daemon draws a random 32-byte *image key* K, seals K to the public key and
hands K to the save kernel in memory only (the job in B's initramfs, which lives in RAM).
K never reaches a disk in the clear.

Key file (``[encryption] key`` in kjumpd.toml, /etc/kjumpd/image-key.json by default,
mode 0600; a copy goes into the restore-first initramfs), one UTF-8 JSON object::

    version  1
    kind     "kjumpd-image-key"
    public   hex, the X25519 public key (32 bytes)
    kdf      {"name": "scrypt", "n": int, "r": int, "p": int}
    salt     hex (16 bytes), scrypt's salt
    nonce    hex (12 bytes)
    private  hex, AES-256-GCM(scrypt(passphrase), nonce, X25519 private key,
             aad = b"kjumpd image key 1" + public): 48 bytes

Seal (the job's ``seal`` and the image identity's ``seal``), one JSON object::

    version    1
    algorithm  "x25519-hkdf-sha256-aes-256-gcm"
    key_id     hex, the first 8 bytes of SHA-256(public): which key file opens it
    ephemeral  hex, a fresh X25519 public key (32 bytes)
    wrapped    hex, AES-256-GCM(kek, 12 zero bytes, K, aad = b"kjumpd seal 1"): 48 bytes
               kek = HKDF-SHA256(X25519(ephemeral private, public), salt = ephemeral + public,
               info = b"kjumpd seal 1"); the nonce may be fixed: every kek wraps one key

Derived keys, each HKDF-SHA256(K, salt = target UUID (16 bytes) + header "created"
(float64 LE), info): ``b"kjumpd records 1"`` (records), ``b"kjumpd header 1"`` (header).
The salt makes them differ per save even if a key were ever reused.

Chunk records (format.py's layout; header flag FLAG_ENCRYPTED): the payload is
AES-256-GCM(record key, nonce = u32 0 + u64 chunk index (LE), plain payload, aad = the
record header's bytes [0, 36) with payload length and CRC set to 0, then the zero-page
bitmap). It is 16 bytes longer than the plain payload; an all-zero or free record holds the
16-byte tag alone, so it is authenticated too. The record CRC covers the stored
(encrypted) payload: damage is still told apart from a wrong key.

Header: ``Header.auth`` = HMAC-SHA256(header key, auth_bytes(header) + the metadata bytes as
stored), where auth_bytes packs every field fixed when the save begins (see ``auth_bytes``).
The fields a later state change rewrites (state, attempt, sequence, times, reason) and those
known only at the end (data length and CRC, statistics; each record is authenticated, the
plan fixes their count) are not covered.

Needs the ``cryptography`` package, imported only when an image is encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from kjumpd.errors import ImageAlteredError, ImageCorruptError, ImageKeyError
from kjumpd.image.format import CHUNK_HEADER_SIZE, ChunkHeader, Header, crc32

SEAL_VERSION = 1
KEY_KIND = "kjumpd-image-key"
ALGORITHM = "x25519-hkdf-sha256-aes-256-gcm"
KEY_SIZE = 32
TAG_SIZE = 16

#: scrypt cost of the passphrase: 32 MiB and about 0.1 s on a laptop, about 1 s per try in
#: the VM tier's emulated R; what an offline guess costs an attacker holding the file
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1

_KEYFILE_AAD = b"kjumpd image key 1"
if TYPE_CHECKING:  # chunk imports lz4, which R does not have
    from kjumpd.image.chunk import EncodedChunk

_SEAL_INFO = b"kjumpd seal 1"
_RECORDS_INFO = b"kjumpd records 1"
_HEADER_INFO = b"kjumpd header 1"
_NONCE = struct.Struct("<IQ")
_AUTH_FIXED = struct.Struct("<H16sdQQQIIQQIQ")


def _crypto() -> Any:
    """The cryptography primitives, imported on first use (B and R import them only for an
    encrypted image)."""
    # no algorithm here needs OpenSSL 3's legacy provider: newer cryptography releases then
    # skip loading it (38, Debian 12's, always loads it: the archives carry legacy.so)
    os.environ.setdefault("CRYPTOGRAPHY_OPENSSL_NO_LEGACY", "1")
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric.x25519 import (
            X25519PrivateKey,
            X25519PublicKey,
        )
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    except ImportError as e:
        raise ImageKeyError(
            "encrypted images need the cryptography package",
            why=str(e),
            fix="install it (Debian/Ubuntu: apt-get install python3-cryptography; "
            "Fedora: dnf install python3-cryptography), then run kjumpctl install",
        ) from None

    return SimpleNamespace(
        InvalidTag=InvalidTag,
        hashes=hashes,
        AESGCM=AESGCM,
        HKDF=HKDF,
        Scrypt=Scrypt,
        X25519PrivateKey=X25519PrivateKey,
        X25519PublicKey=X25519PublicKey,
    )


def _raw_public(priv: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return bytes(priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def _raw_private(priv: Any) -> bytes:
    # cryptography 38 (Debian 12) has no private_bytes_raw()
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    return bytes(priv.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    c = _crypto()
    return bytes(
        c.HKDF(algorithm=c.hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(key)
    )


def _unhex(d: dict[str, Any], key: str, size: int | None, where: str) -> bytes:
    v = d.get(key)
    try:
        raw = bytes.fromhex(v) if isinstance(v, str) else None
    except ValueError:
        raw = None
    if raw is None or (size is not None and len(raw) != size):
        want = f"{size} bytes of hex" if size else "hex"
        raise ImageKeyError(f"{where}: {key!r} is not {want}", fix="create the key again")
    return raw


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


# ---------------------------------------------------------------------------- key file


@dataclass(frozen=True)
class KeyFile:
    """The machine's image key: the public half in the clear, the private half under a
    passphrase."""

    public: bytes
    salt: bytes
    nonce: bytes
    protected: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    @classmethod
    def create(cls, passphrase: str, *, n: int = SCRYPT_N) -> KeyFile:
        if not passphrase:
            raise ImageKeyError(
                "the image key passphrase is empty",
                fix="choose a passphrase (it is asked for at every restore)",
            )
        c = _crypto()
        priv = c.X25519PrivateKey.generate()
        public = _raw_public(priv)
        salt, nonce = os.urandom(16), os.urandom(12)
        kek = _scrypt(passphrase, salt, n, SCRYPT_R, SCRYPT_P)
        protected = c.AESGCM(kek).encrypt(nonce, _raw_private(priv), _KEYFILE_AAD + public)
        return cls(public, salt, nonce, protected, n=n)

    def unlock(self, passphrase: str) -> bytes:
        """The private key; ImageKeyError(wrong passphrase) when it does not open."""
        c = _crypto()
        kek = _scrypt(passphrase, self.salt, self.n, self.r, self.p)
        try:
            return bytes(
                c.AESGCM(kek).decrypt(self.nonce, self.protected, _KEYFILE_AAD + self.public)
            )
        except c.InvalidTag:
            raise ImageKeyError(
                "the passphrase does not open the image key",
                why="wrong passphrase (or the key file was altered)",
                fix="type the passphrase given to kjumpctl image-key create",
            ) from None

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": SEAL_VERSION,
                "kind": KEY_KIND,
                "public": self.public.hex(),
                "kdf": {"name": "scrypt", "n": self.n, "r": self.r, "p": self.p},
                "salt": self.salt.hex(),
                "nonce": self.nonce.hex(),
                "private": self.protected.hex(),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "image key file") -> KeyFile:
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ImageKeyError(f"{where} is not JSON", why=str(e)) from None
        if not isinstance(d, dict) or d.get("kind") != KEY_KIND:
            raise ImageKeyError(f"{where} is not a kjumpd image key", fix="create it again")
        if d.get("version") != SEAL_VERSION:
            raise ImageKeyError(
                f"{where} has version {d.get('version')!r}; this kjumpd reads {SEAL_VERSION}"
            )
        kdf = d.get("kdf")
        if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
            raise ImageKeyError(f"{where}: the kdf is not scrypt")
        costs = [kdf.get(k) for k in ("n", "r", "p")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in costs):
            raise ImageKeyError(f"{where}: scrypt n, r, p must be integers")
        n, r, p = (int(v) for v in costs)  # type: ignore[arg-type]
        if n < 2 or n & (n - 1) or n > 1 << 20 or not 1 <= r <= 32 or not 1 <= p <= 16:
            raise ImageKeyError(
                f"{where}: scrypt costs n={n} r={r} p={p} are out of range",
                fix="create the key again",
            )
        return cls(
            public=_unhex(d, "public", KEY_SIZE, where),
            salt=_unhex(d, "salt", 16, where),
            nonce=_unhex(d, "nonce", 12, where),
            protected=_unhex(d, "private", KEY_SIZE + TAG_SIZE, where),
            n=n,
            r=r,
            p=p,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyFile:
        try:
            text = Path(path).read_bytes()
        except OSError as e:
            raise ImageKeyError(
                f"cannot read the image key {path}",
                why=e.strerror or str(e),
                fix="create it with kjumpctl image-key create",
                path=str(path),
            ) from None
        return cls.from_json(text, where=str(path))


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    c = _crypto()
    kdf = c.Scrypt(salt=salt, length=KEY_SIZE, n=n, r=r, p=p)
    return bytes(kdf.derive(passphrase.encode("utf-8")))


# ---------------------------------------------------------------------------- sealing


def new_image_key() -> bytes:
    return os.urandom(KEY_SIZE)


def seal_key(public: bytes, image_key: bytes) -> dict[str, Any]:
    """The seal of ``image_key`` to ``public`` (a JSON object, see the module doc)."""
    c = _crypto()
    eph = c.X25519PrivateKey.generate()
    eph_pub = _raw_public(eph)
    shared = eph.exchange(c.X25519PublicKey.from_public_bytes(public))
    kek = _hkdf(shared, eph_pub + public, _SEAL_INFO)
    wrapped = c.AESGCM(kek).encrypt(bytes(12), image_key, _SEAL_INFO)
    return {
        "version": SEAL_VERSION,
        "algorithm": ALGORITHM,
        "key_id": key_id(public),
        "ephemeral": eph_pub.hex(),
        "wrapped": wrapped.hex(),
    }


def check_seal(seal: Any, where: str = "image seal") -> dict[str, Any]:
    """``seal`` when it is a well-formed seal object, else ImageKeyError."""
    if not isinstance(seal, dict):
        raise ImageKeyError(f"{where} is not an object")
    if seal.get("version") != SEAL_VERSION or seal.get("algorithm") != ALGORITHM:
        raise ImageKeyError(
            f"{where} is {seal.get('algorithm')!r} version {seal.get('version')!r}",
            why=f"this kjumpd opens {ALGORITHM} version {SEAL_VERSION}",
            fix="restore with the kjumpd release that saved it",
        )
    kid = seal.get("key_id")
    if not isinstance(kid, str) or len(kid) != 16:
        raise ImageKeyError(f"{where}: key_id is not 16 hex digits")
    _unhex(seal, "ephemeral", KEY_SIZE, where)
    _unhex(seal, "wrapped", KEY_SIZE + TAG_SIZE, where)
    return seal


def unseal_key(private: bytes, public: bytes, seal: Any) -> bytes:
    """The image key inside ``seal``; ImageKeyError when this key pair did not seal it."""
    c = _crypto()
    seal = check_seal(seal)
    if seal["key_id"] != key_id(public):
        raise ImageKeyError(
            "the image was sealed to another image key",
            why=f"its key id is {seal['key_id']}, this machine's is {key_id(public)}",
            fix="restore with the key file the image was saved with, or boot normally",
        )
    eph_pub = bytes.fromhex(seal["ephemeral"])
    shared = c.X25519PrivateKey.from_private_bytes(private).exchange(
        c.X25519PublicKey.from_public_bytes(eph_pub)
    )
    kek = _hkdf(shared, eph_pub + public, _SEAL_INFO)
    try:
        return bytes(c.AESGCM(kek).decrypt(bytes(12), bytes.fromhex(seal["wrapped"]), _SEAL_INFO))
    except c.InvalidTag:
        raise ImageKeyError(
            "the image key does not unseal",
            why="the seal was altered",
            fix="the image cannot be used; boot normally and hibernate again",
        ) from None


# ---------------------------------------------------------------------------- records, header


def auth_bytes(header: Header) -> bytes:
    """The header fields fixed when the save begins, as authenticated (module doc)."""
    from kjumpd.image.format import FLAG_VERIFIED

    fixed = _AUTH_FIXED.pack(
        header.version,
        header.uuid,
        header.created,
        header.jump_area_start,
        header.jump_area_size,
        header.jump_back_entry,
        header.flags & ~FLAG_VERIFIED,  # set at the end, by the read-back check
        header.chunk_size,
        header.metadata_offset,
        header.metadata_length,
        header.metadata_crc,
        header.data_offset,
    )
    for s in (header.mode, header.compression, header.main_kernel, header.save_kernel_hash):
        raw = s.encode("utf-8")
        fixed += struct.pack("<H", len(raw)) + raw
    return fixed


def _salt(header: Header) -> bytes:
    return header.uuid + struct.pack("<d", header.created)


class ImageCipher:
    """The keys of one image: seals records as they are written, opens them as they are
    read, authenticates the header. Thread-safe (AES-GCM objects keep no state)."""

    def __init__(self, record_key: bytes, header_key: bytes) -> None:
        self._c = _crypto()
        self._aead = self._c.AESGCM(record_key)
        self._header_key = header_key

    @classmethod
    def for_header(cls, image_key: bytes, header: Header) -> ImageCipher:
        if len(image_key) != KEY_SIZE:
            raise ImageKeyError(f"an image key is {KEY_SIZE} bytes, not {len(image_key)}")
        salt = _salt(header)
        return cls(_hkdf(image_key, salt, _RECORDS_INFO), _hkdf(image_key, salt, _HEADER_INFO))

    def header_mac(self, header: Header, metadata: bytes) -> bytes:
        return hmac.new(self._header_key, auth_bytes(header) + metadata, "sha256").digest()

    def check_header(self, header: Header, metadata: bytes) -> None:
        """ImageAlteredError unless the header's fixed fields and the metadata are the ones
        the save wrote."""
        if not hmac.compare_digest(self.header_mac(header, metadata), header.auth):
            raise ImageAlteredError(
                "the image header or metadata was altered",
                why="their authentication tag does not match (the jump-back address, the "
                "memory map or the identity differ from what the save wrote)",
                fix="the image cannot be used; boot normally and hibernate again",
                structure="header",
                offset=0,
            )

    def seal(
        self, ch: ChunkHeader, bitmap: bytes, payload: bytes | memoryview
    ) -> tuple[ChunkHeader, bytes]:
        """(record header, bitmap, plain payload) -> (record header, stored payload)."""
        ct = self._aead.encrypt(_NONCE.pack(0, ch.index), bytes(payload), _aad(ch, bitmap))
        return _with_payload(ch, len(ct), crc32(ct, crc32(bitmap))), ct

    def seal_chunk(self, item: EncodedChunk) -> EncodedChunk:
        """An encoded record with its payload encrypted (the record header and CRC to match)."""
        ch = ChunkHeader.unpack(item.head[:CHUNK_HEADER_SIZE])
        bitmap = item.head[CHUNK_HEADER_SIZE:]
        sealed, ct = self.seal(ch, bitmap, item.payload)
        return replace(item, head=sealed.pack() + bitmap, payload=ct, crc=sealed.crc)

    def open(
        self, ch: ChunkHeader, bitmap: bytes, payload: bytes | memoryview, offset: int
    ) -> tuple[ChunkHeader, bytes]:
        """(record header, bitmap, stored payload, offset) -> (the record header as if it
        were stored in the clear, plain payload); ImageAlteredError when the record does
        not authenticate."""
        if len(payload) < TAG_SIZE:
            raise _unauthentic(ch, offset, f"its payload of {len(payload)} bytes has no tag")
        try:
            # bytes: Debian 12's cryptography (38) refuses any other buffer, a view included
            plain = self._aead.decrypt(_NONCE.pack(0, ch.index), bytes(payload), _aad(ch, bitmap))
        except self._c.InvalidTag:
            raise _unauthentic(
                ch,
                offset,
                "its authentication tag does not match (altered, or not written with this "
                "image's key)",
            ) from None
        return _with_payload(ch, len(plain), crc32(plain, crc32(bitmap))), plain


def _aad(ch: ChunkHeader, bitmap: bytes) -> bytes:
    return _with_payload(ch, 0, 0).pack()[:36] + bitmap


def _with_payload(ch: ChunkHeader, length: int, crc: int) -> ChunkHeader:
    return replace(ch, payload_length=length, crc=crc)


def _unauthentic(ch: ChunkHeader, offset: int, why: str) -> ImageCorruptError:
    from kjumpd.image.chunk import chunk_error  # chunk imports lz4, which R does not have

    return chunk_error(ch, offset, why, what="fails authentication", error=ImageAlteredError)
