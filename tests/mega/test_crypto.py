"""Known-answer tests for megafs.mega.crypto (vectors from mega-protocol.md §8).

Every expected value below comes from a published test suite (megajs, rmega, AlttiRi,
the MEGA SDK's own fingerprint tests) or from §8.2, where it was cross-checked against
mega.py, megatools and megajs. Nothing here is computed by the code under test.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from megafs.mega import crypto
from megafs.mega.crypto import (
    FileKey,
    MegaCryptoError,
    RsaKey,
    b64decode,
    b64encode,
)


def tbuf(size: int, start: int = 0, step: int = 1) -> bytes:
    """megajs's ``testBuffer``: byte i = (start + i * step) mod 255."""
    return bytes((start + i * step) % 255 for i in range(size))


def a32(*words: int) -> bytes:
    """rmega/mega.py a32 arrays (signed or unsigned words) as big-endian bytes."""
    return struct.pack(f">{len(words)}I", *(w & 0xFFFFFFFF for w in words))


def cbc_decrypt_raw(key: bytes, data: bytes) -> bytes:
    dec = Cipher(algorithms.AES(key), modes.CBC(bytes(16))).decryptor()
    return dec.update(data) + dec.finalize()


def cbc_encrypt_raw(key: bytes, plain: bytes) -> str:
    plain += b"\0" * (-len(plain) % 16)
    enc = Cipher(algorithms.AES(key), modes.CBC(bytes(16))).encryptor()
    return b64encode(enc.update(plain) + enc.finalize())


MASTER = bytes(range(16))
KEY_300K = FileKey(
    aes_key=bytes(range(0x20, 0x30)), nonce=bytes(range(0x30, 0x38)), meta_mac=bytes(8)
)


# ------------------------------------------------------------------------ encodings


def test_b64_vectors() -> None:
    assert b64encode(b"ice_lord") == "aWNlX2xvcmQ"  # rmega utils_spec
    assert b64decode("aWNlX2xvcmQ") == b"ice_lord"
    assert b64encode(bytes([0xFB, 0xFF])) == "-_8"


def test_b64decode_is_lenient() -> None:
    assert b64decode("-_8") == bytes([0xFB, 0xFF])
    assert b64decode("+/8=") == bytes([0xFB, 0xFF])
    assert b64decode("aWNl,X2xv,cmQ") == b"ice_lord"
    assert b64decode("") == b""


@pytest.mark.parametrize("bad", ["a", "ab!c", "ab=c", "é", "abcde"])
def test_b64decode_rejects_garbage(bad: str) -> None:
    with pytest.raises(MegaCryptoError):
        b64decode(bad)


# ------------------------------------------------------------------- AES and key wrap


def test_aes_single_block_rmega() -> None:
    key = a32(1380895471, 1656741118, 372674858, 886637722)
    plain = a32(447236115, -1585310199, -1864656235, -1137211605)
    expected = a32(-1780228062, 945709550, 1098116349, -1813988988)
    assert crypto.aes_ecb_encrypt(key, plain) == expected
    assert crypto.aes_ecb_decrypt(key, expected) == plain


def test_ecb_needs_whole_blocks() -> None:
    with pytest.raises(MegaCryptoError):
        crypto.aes_ecb_encrypt(MASTER, b"x" * 15)
    with pytest.raises(MegaCryptoError):
        crypto.aes_ecb_decrypt(MASTER, b"x" * 17)
    with pytest.raises(MegaCryptoError):
        crypto.aes_ecb_encrypt(b"short", bytes(16))


def test_wrapped_master_keys() -> None:
    v1_key = bytes.fromhex("b87aa444ed3d28ca688d12733ad4ec42")
    v2_key = bytes.fromhex("177a37735683d7f5b66dd5e2b94221ae")
    assert crypto.encrypt_key(v1_key, MASTER) == "poxSdI-q_mJhRE2XYRYOwQ"
    assert crypto.encrypt_key(v2_key, MASTER) == "kMqA7fhcqMI_bRr9F_arMA"
    assert crypto.decrypt_key(v1_key, "poxSdI-q_mJhRE2XYRYOwQ") == MASTER
    assert crypto.decrypt_key(v2_key, "kMqA7fhcqMI_bRr9F_arMA") == MASTER


def test_decrypt_key_validates_lengths() -> None:
    for size in (0, 8, 15, 17, 24, 48):
        with pytest.raises(MegaCryptoError):
            crypto.decrypt_key(MASTER, b64encode(bytes(size)))
    with pytest.raises(MegaCryptoError):
        crypto.decrypt_key(MASTER, "not base64!")
    with pytest.raises(MegaCryptoError):
        crypto.encrypt_key(MASTER, bytes(20))


# ------------------------------------------------------------------- v1 / v2 logins


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        (tbuf(8), "c4589a459956887caf0b408635c3c03b"),  # megajs prepareKey.test
        (tbuf(10), "59930b1c55d783ac77df4c4ff261b0f1"),
        (tbuf(64), "83bd84689f057f9ed9834b3ecb81d80e"),
        (b"my kingdom 4 a horse", a32(-24267049, 354638668, -845953520, 1348163508).hex()),
        (
            a32(1684081408, -1313687523, 845282884, -1735274811),
            a32(1380895471, 1656741118, 372674858, 886637722).hex(),
        ),
        (b"secret", "5d63b08ddf20de47e920484d3209cd6c"),  # §8.2
        (b"MEGA-test-pw-1", "b87aa444ed3d28ca688d12733ad4ec42"),
    ],
)
def test_prepare_key_v1(password: bytes, expected: str) -> None:
    assert crypto.prepare_key_v1(password).hex() == expected


def test_prepare_key_rmega_base64() -> None:
    key = crypto.prepare_key_v1(crypto.password_bytes_v1("my kingdom 4 a horse"))
    assert b64encode(key) == "_o221xUjW0zNk8YQUFtXtA"


@pytest.mark.parametrize(
    ("size", "expected"),
    [(10, "9e791646c66840b5"), (16, "6ba07aca224e84a4"), (32, "6a1e6c5539c0ed48")],
)
def test_stringhash_megajs(size: int, expected: str) -> None:
    key = crypto.prepare_key_v1(tbuf(8))
    text = "".join(map(chr, tbuf(size)))  # bytes < 0x80: lower() leaves them alone
    assert b64decode(crypto.user_hash_v1(text, key)).hex() == expected


def test_user_hash_v1() -> None:
    secret_key = crypto.prepare_key_v1(crypto.password_bytes_v1("secret"))
    assert crypto.user_hash_v1("alice@example.com", secret_key) == "WaMWTRKAoMI"
    key = crypto.prepare_key_v1(crypto.password_bytes_v1("MEGA-test-pw-1"))
    assert crypto.user_hash_v1("Alice@Example.com", key) == "KoOskdO1Dlw"
    assert crypto.user_hash_v1("alice@example.com", key) == "KoOskdO1Dlw"


def test_password_bytes_v1() -> None:
    assert crypto.password_bytes_v1("johnsnow") == a32(1785686126, 1936617335)  # rmega
    assert crypto.password_bytes_v1("") == b""
    assert crypto.password_bytes_v1("abcde") == b"abcde"


def test_non_ascii_v1_password_uses_sdk_scheme() -> None:
    raw = crypto.password_bytes_v1("pässwörd")
    assert raw.hex() == "70e4737377f67264"
    assert crypto.prepare_key_v1(raw).hex() == "f38493e354193dd028c8ed07d52c7a25"
    # megatools/go-mega/megajs feed UTF-8 and get a different key (§8.2).
    utf8_key = crypto.prepare_key_v1("pässwörd".encode())
    assert utf8_key.hex() == "dee8f3cc78a7d97fad4d03df2e09d207"


def test_password_bytes_v1_wide_code_units_follow_js_shifts() -> None:
    # U+20AC at slot 1 of a word is shifted left by 16: its high byte 0x20 is OR-ed into
    # slot 0 ('a' = 0x61 | 0x20 = 0x61) and its low byte lands in slot 1.
    assert crypto.password_bytes_v1("a€").hex() == "61ac"
    # In slot 0 the shift by 24 truncates to 32 bits: only the low byte survives.
    assert crypto.password_bytes_v1("€").hex() == "ac"
    # A non-BMP character is two UTF-16 code units (surrogates D83D DE00).
    # "x" then D8 3D (shift 16) then DE 00 (shift 8), OR-ed into one word, 3 bytes long.
    assert crypto.password_bytes_v1("x\U0001f600").hex() == "f8ff00"


def test_derive_key_v2() -> None:
    salt = b64decode("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8")
    assert salt == bytes(range(32))
    key, uh = crypto.derive_key_v2("MEGA-test-pw-1", salt)
    assert key.hex() == "177a37735683d7f5b66dd5e2b94221ae"
    assert uh == "50atEOcOB7Rat5an_pzE-w"
    assert crypto.v2_verifier(uh) == hashlib.sha256(b64decode(uh)).digest()[:16]


def test_new_v2_salt() -> None:
    a, b = crypto.new_v2_salt(), crypto.new_v2_salt()
    assert len(a) == 32 and a != b


# --------------------------------------------------------------------- attributes


FOLDER_KEY = bytes(range(0x10, 0x20))


def test_folder_attribute_vector() -> None:
    blob = "bN-DbMmD6O8DR4YYyml9iFHME0UPo4VA4JnIDSSxN6Y"
    assert crypto.encrypt_attributes({"n": "hello.txt"}, FOLDER_KEY) == blob
    assert crypto.decrypt_attributes(blob, FOLDER_KEY) == {"n": "hello.txt"}
    assert crypto.encrypt_key(MASTER, FOLDER_KEY) == "B_7vdOHVA26QDu4RjpSSkw"


def test_attribute_decryption_vector_with_nul_padding() -> None:
    key = b64decode("Kij-CWPJrjTiFVqbUTICCQ")
    assert key == bytes([42, 40, 254, 9, 99, 201, 174, 52, 226, 21, 90, 155, 81, 50, 2, 9])
    blob = "ZlDcSbnpVQfDxIlrQZaioVBSGhJu972wI8WMBIpLn8VLWIMX631gUSmq3C1ANx5EJwZwwvPRsa02RxWsPpNwTA"
    attrs = {"n": "SharedFile.jpg", "c": "GRSM8+c1HUmlmyDuTJVrDwSDpqRV"}
    assert cbc_decrypt_raw(key, b64decode(blob)) == (
        b'MEGA{"n":"SharedFile.jpg","c":"GRSM8+c1HUmlmyDuTJVrDwSDpqRV"}\0\0\0'
    )
    assert crypto.decrypt_attributes(blob, key) == attrs
    assert crypto.encrypt_attributes(attrs, key) == blob


def test_file_attribute_vector() -> None:
    blob = "ksL-Njvp3wRkWNQwiGv7JxIV1j7YvAIz82uqFC6FIwk"
    assert crypto.encrypt_attributes({"n": "test300000.bin"}, KEY_300K.aes_key) == blob
    assert crypto.decrypt_attributes(blob, KEY_300K.aes_key) == {"n": "test300000.bin"}


def test_attributes_accept_spaced_json_unicode_and_exact_blocks() -> None:
    spaced = cbc_encrypt_raw(FOLDER_KEY, b'MEGA{"n": "x", "c": "y"}')
    assert crypto.decrypt_attributes(spaced, FOLDER_KEY) == {"n": "x", "c": "y"}
    # 'MEGA' + '{"n":"<20 chars>"}' is exactly 32 bytes: no NUL padding is added.
    exact = {"n": "abcdefghijklmnopqrst"}
    blob = crypto.encrypt_attributes(exact, FOLDER_KEY)
    assert len(b64decode(blob)) == 32
    assert cbc_decrypt_raw(FOLDER_KEY, b64decode(blob)).endswith(b'"}')
    assert crypto.decrypt_attributes(blob, FOLDER_KEY) == exact
    junk = cbc_encrypt_raw(FOLDER_KEY, b'MEGA{"n":"x"}junk')  # tolerated, like go-mega
    assert crypto.decrypt_attributes(junk, FOLDER_KEY) == {"n": "x"}
    name = {"n": "Grüße ☃ 😀", "rr": "AbCdEfGh", "extra": [1, {"x": None}]}
    assert crypto.decrypt_attributes(crypto.encrypt_attributes(name, FOLDER_KEY), FOLDER_KEY) == (
        name
    )


@pytest.mark.parametrize(
    "blob",
    [
        "not base64!",
        b64encode(bytes(15)),
        "",
        crypto.encrypt_attributes({"n": "x"}, bytes(16)),  # another key
        cbc_encrypt_raw(FOLDER_KEY, b'MEGA{"n":'),
        cbc_encrypt_raw(FOLDER_KEY, b'MEGA{"n":"\xff"}'),
        cbc_encrypt_raw(FOLDER_KEY, b'MEGA["n"]'),
        cbc_encrypt_raw(FOLDER_KEY, b'MEGA{"' + b"[" * 100),  # unterminated string
        cbc_encrypt_raw(FOLDER_KEY, b'MEGA{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"),
    ],
)
def test_decrypt_attributes_errors(blob: str) -> None:
    with pytest.raises(MegaCryptoError):
        crypto.decrypt_attributes(blob, FOLDER_KEY)


def test_attribute_keys_must_be_aes128() -> None:
    with pytest.raises(MegaCryptoError):
        crypto.encrypt_attributes({"n": "x"}, bytes(32))
    with pytest.raises(MegaCryptoError):
        crypto.decrypt_attributes("bN-DbMmD6O8DR4YYyml9iFHME0UPo4VA4JnIDSSxN6Y", bytes(32))


# ------------------------------------------------------------------------ file keys


def test_file_key_pack_unpack() -> None:
    raw = bytes.fromhex("b0b0909070707093e957d163217c2f3fd4dbe2e9f0f7fe0675f47bd299c3e9f2")
    key = FileKey.unpack(raw)
    assert key.nonce == raw[16:24] and key.meta_mac == raw[24:]
    assert key.pack() == raw
    with pytest.raises(MegaCryptoError):
        FileKey.unpack(raw[:16])
    fresh = FileKey.random()
    assert fresh.meta_mac == bytes(8) and len(fresh.aes_key) == 16 and len(fresh.nonce) == 8
    assert FileKey.random().aes_key != fresh.aes_key
    assert "aes_key" not in repr(fresh)


def test_file_link() -> None:
    key = FileKey.unpack(b64decode("EBAQEBAQEBC8SogV2ZKCjDAxMjM0NTY3lGOiPvW_rKM"))
    assert crypto.file_link("AbCdEfGh", key) == (
        "https://mega.nz/file/AbCdEfGh#EBAQEBAQEBC8SogV2ZKCjDAxMjM0NTY3lGOiPvW_rKM"
    )


# ---------------------------------------------------------------------- CTR and MAC


def encrypt_file(aes_key: bytes, nonce: bytes, data: bytes) -> tuple[bytes, list[bytes], bytes]:
    """Chunk by chunk, as an uploader does: (ciphertext, chunk MACs, packed key)."""
    parts, macs = [], []
    for start, length in crypto.chunk_bounds(len(data)):
        plain = data[start : start + length]
        parts.append(crypto.ctr_crypt(aes_key, nonce, start, plain))
        macs.append(crypto.chunk_mac(aes_key, nonce, plain))
    mac8 = crypto.condensed_mac(aes_key, macs)
    return b"".join(parts), macs, FileKey(aes_key, nonce, mac8).pack()


def test_ctr_vectors_megajs() -> None:
    material = tbuf(24)
    key, nonce = material[:16], material[16:]
    assert crypto.ctr_crypt(key, nonce, 0, tbuf(32)).hex() == (
        "8de7dac3d95eca9fd74f30c1ecf8247a8f25d1b3fd2d11a8a7b458d16a085434"
    )
    ciphertext = crypto.ctr_crypt(key, nonce, 0, tbuf(151511))
    assert hashlib.sha1(ciphertext).hexdigest() == "2ec4f058ba6100f7e28b4ff7bb9a711a5de57c64"


def test_full_file_encryption_megajs() -> None:
    material = tbuf(24, 100, 7)
    ciphertext, _, packed = encrypt_file(material[:16], material[16:], tbuf(151511))
    assert packed.hex() == "b0b0909070707093e957d163217c2f3fd4dbe2e9f0f7fe0675f47bd299c3e9f2"
    assert hashlib.sha1(ciphertext).hexdigest() == "addb96c07ac4e6b66316b81530256c911b0b49d1"


def test_condensed_mac_megajs() -> None:
    key = FileKey.unpack(b64decode("AAAAAAAAAABnFCfbJFwAxwAAAAAAAAAAZxQn2yRcAMc"))
    assert key.aes_key == bytes(16) and key.nonce == bytes(8)
    _, _, packed = encrypt_file(key.aes_key, key.nonce, tbuf(151511))
    assert packed[24:].hex() == "671427db245c00c7" == key.meta_mac.hex()


def test_file_300000_vector() -> None:
    data = tbuf(300000)
    aes_key, nonce = KEY_300K.aes_key, KEY_300K.nonce
    assert crypto.chunk_bounds(len(data)) == [(0, 131072), (131072, 168928)]
    ciphertext, macs, packed = encrypt_file(aes_key, nonce, data)
    assert [m.hex() for m in macs] == [
        "0166fbf3c041c75429acd35c756a2e33",
        "eef39cff2254bf14a894063a8489a5af",
    ]
    assert crypto.condensed_mac(aes_key, macs).hex() == "fedf77e9d0a1886e"
    assert packed.hex() == ("1010101010101010d6f65dc2fc8ca6413031323334353637fedf77e9d0a1886e")
    assert b64encode(packed) == "EBAQEBAQEBDW9l3C_IymQTAxMjM0NTY3_t936dChiG4"
    assert crypto.encrypt_key(MASTER, packed) == "LaWCEgKYz3XElauufpHxPBm59XM75qqde2eKcYXRRgw"
    assert crypto.decrypt_key(MASTER, "LaWCEgKYz3XElauufpHxPBm59XM75qqde2eKcYXRRgw") == packed
    assert hashlib.sha256(ciphertext).hexdigest() == (
        "675eb3f9be6bb9764d172809bcd5d675ce603f4e859e6cc043c25bf67692ec6c"
    )
    assert ciphertext[:16].hex() == "fd3ed87634c9f0685d90bd0212a85af1"
    window = bytes.fromhex("c682a32e6e047ad332dc97d95a8cf933")
    assert ciphertext[131152:131168] == window
    # Random access: decrypt that block alone, starting the counter at its offset.
    assert crypto.ctr_crypt(aes_key, nonce, 131152, window) == data[131152:131168]


def test_ctr_at_unaligned_offsets_matches_whole_file() -> None:
    data = tbuf(300000)
    ciphertext, _, _ = encrypt_file(KEY_300K.aes_key, KEY_300K.nonce, data)
    for start, end in [(1, 2), (5, 37), (131071, 131090), (131155, 131170), (299990, 300000)]:
        part = crypto.ctr_crypt(KEY_300K.aes_key, KEY_300K.nonce, start, ciphertext[start:end])
        assert part == data[start:end], (start, end)
    assert crypto.ctr_crypt(KEY_300K.aes_key, KEY_300K.nonce, 7, b"") == b""


def test_ctr_uses_64_bit_block_counter() -> None:
    aes_key, nonce = KEY_300K.aes_key, KEY_300K.nonce
    offset = (1 << 40) + 16 * 3
    block = offset // 16
    # Independent keystream: AES-ECB of nonce || uint64_be(block).
    stream = crypto.aes_ecb_encrypt(
        aes_key, nonce + block.to_bytes(8, "big") + nonce + (block + 1).to_bytes(8, "big")
    )
    assert crypto.ctr_crypt(aes_key, nonce, offset, bytes(32)) == stream
    assert crypto.ctr_crypt(aes_key, nonce, offset + 5, bytes(27)) == stream[5:]
    with pytest.raises(MegaCryptoError):
        crypto.ctr_crypt(aes_key, nonce, -1, b"x")


def test_hello_vector() -> None:
    aes_key, nonce = KEY_300K.aes_key, KEY_300K.nonce
    ciphertext, macs, packed = encrypt_file(aes_key, nonce, b"hello")
    assert ciphertext.hex() == "955ab6195f"
    assert crypto.condensed_mac(aes_key, macs).hex() == "9463a23ef5bfaca3"
    assert b64encode(packed) == "EBAQEBAQEBC8SogV2ZKCjDAxMjM0NTY3lGOiPvW_rKM"


def test_chunk_mac_matches_block_by_block_definition() -> None:
    aes_key, nonce = KEY_300K.aes_key, KEY_300K.nonce
    for size in (1, 15, 16, 17, 100, 4096 + 3):
        data = tbuf(size, 9, 5)
        state = nonce + nonce
        padded = data + bytes(-size % 16)
        for i in range(0, len(padded), 16):
            mixed = bytes(a ^ b for a, b in zip(state, padded[i : i + 16], strict=True))
            state = crypto.aes_ecb_encrypt(aes_key, mixed)
        assert crypto.chunk_mac(aes_key, nonce, data) == state, size
        assert crypto.chunk_mac(aes_key, nonce, memoryview(bytearray(data))) == state
    assert crypto.chunk_mac(aes_key, nonce, b"") == nonce + nonce


def test_condensed_mac_of_no_chunks_is_zero() -> None:
    assert crypto.condensed_mac(KEY_300K.aes_key, []) == bytes(8)
    with pytest.raises(MegaCryptoError):
        crypto.condensed_mac(KEY_300K.aes_key, [bytes(15)])


# ------------------------------------------------------------------------ chunk layout


CHUNK_TABLE = [
    (0, 0, 131072),
    (1, 131072, 262144),
    (2, 393216, 393216),
    (3, 786432, 524288),
    (4, 1310720, 655360),
    (5, 1966080, 786432),
    (6, 2752512, 917504),
    (7, 3670016, 1048576),
    (8, 4718592, 1048576),
    (9, 5767168, 1048576),
]


@pytest.mark.parametrize(("index", "start", "size"), CHUNK_TABLE)
def test_chunk_table(index: int, start: int, size: int) -> None:
    assert crypto.chunk_start(index) == start
    assert crypto.chunk_start(index + 1) - start == size
    assert crypto.chunk_index(start) == index
    assert crypto.chunk_index(start + size - 1) == index
    assert crypto.chunk_index(start + size) == index + 1


def test_chunk_index_far_out() -> None:
    offset = 1 << 40
    index = crypto.chunk_index(offset)
    assert crypto.chunk_start(index) <= offset < crypto.chunk_start(index + 1)


def test_chunk_bounds_mega_py_sizes() -> None:
    assert crypto.chunk_bounds(0) == []
    assert crypto.chunk_bounds(10) == [(0, 10)]
    assert crypto.chunk_bounds(1000) == [(0, 1000)]
    assert crypto.chunk_bounds(1000000) == [
        (0, 131072),
        (131072, 262144),
        (393216, 393216),
        (786432, 213568),
    ]
    bounds = crypto.chunk_bounds(10000000)
    assert bounds[:9] == [(start, size) for _, start, size in CHUNK_TABLE[:9]]
    assert bounds[-1] == (9961472, 38528)
    assert len(bounds) == 14
    assert sum(size for _, size in bounds) == 10000000
    assert crypto.chunk_bounds(131072) == [(0, 131072)]


# ----------------------------------------------------------------------- upload crc


def naive_upload_crc(body: bytes) -> str:
    acc = bytearray(12)
    for i, byte in enumerate(body):
        acc[i % 12] ^= byte
    return b64encode(bytes(acc))


@pytest.mark.parametrize("size", [0, 1, 11, 12, 13, 24, 25, 36, 100, 131072, 168928])
def test_upload_crc(size: int) -> None:
    body = tbuf(size, 3, 11)
    assert crypto.upload_crc(body) == naive_upload_crc(body)
    assert len(crypto.upload_crc(body)) == 16


# ---------------------------------------------------------------------- fingerprint


_M32 = 0xFFFFFFFF


def _xorshift(x: int) -> int:
    x ^= (x << 13) & _M32
    x ^= x >> 17
    return x ^ ((x << 5) & _M32)


def _apply(columns: list[int], vector: int) -> int:
    out, bit = 0, 0
    while vector:
        if vector & 1:
            out ^= columns[bit]
        vector >>= 1
        bit += 1
    return out


def xorshift_reader(seed: int) -> Callable[[int, int], bytes]:
    """Random access into the SDK test's xorshift32 byte stream (byte k = low byte of
    the state after k + 1 steps), jumping ahead with GF(2) matrix powers."""
    powers = [[_xorshift(1 << i) for i in range(32)]]
    for _ in range(40):
        powers.append([_apply(powers[-1], c) for c in powers[-1]])

    def read(offset: int, length: int) -> bytes:
        state, k, n = seed, 0, offset
        while n:
            if n & 1:
                state = _apply(powers[k], state)
            n >>= 1
            k += 1
        out = bytearray()
        for _ in range(length):
            state = _xorshift(state)
            out.append(state & 0xFF)
        return bytes(out)

    return read


def test_xorshift_reader_matches_sequential_stream() -> None:
    state, stream = 0xA5A5A5A5, bytearray()
    for _ in range(300):
        state = _xorshift(state)
        stream.append(state & 0xFF)
    assert xorshift_reader(0xA5A5A5A5)(123, 77) == bytes(stream[123:200])


@pytest.mark.parametrize(
    ("mib", "expected"),
    [
        (40, "6iqpUy7DdAKx5NIRg31i_g"),
        (52, "7SMVr_-v9_H7MDsN9yuVGA"),
        (88, "3hhTVPVhwzudmjN1odbO6w"),
    ],
)
def test_fingerprint_crc_sdk_vectors(mib: int, expected: str) -> None:
    # meganz/sdk tests/unit/FileFingerprint_CRC_test.cpp (64-bit sparse offsets).
    crc = crypto.fingerprint_crc(xorshift_reader(0xA5A5A5A5), mib << 20)
    assert b64encode(crc) == expected


def reader_for(data: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, length: data[offset : offset + length]


def test_fingerprint_crc_tiny_files_store_content() -> None:
    assert crypto.fingerprint_crc(reader_for(b""), 0) == bytes(16)
    assert crypto.fingerprint_crc(reader_for(b"hello"), 5) == b"hello" + bytes(11)
    data = bytes(range(1, 17))
    assert crypto.fingerprint_crc(reader_for(data), 16) == data


@pytest.mark.parametrize("size", [17, 18, 19, 1000, 8191, 8192])
def test_fingerprint_crc_small_files_four_slices(size: int) -> None:
    data = tbuf(size, 1, 3)
    cuts = [i * size // 4 for i in range(5)]
    expected = b"".join(
        zlib.crc32(data[cuts[i] : cuts[i + 1]]).to_bytes(4, "big") for i in range(4)
    )
    assert crypto.fingerprint_crc(reader_for(data), size) == expected


def test_fingerprint_crc_short_read() -> None:
    with pytest.raises(MegaCryptoError):
        crypto.fingerprint_crc(reader_for(b"abc"), 100)


def test_fingerprint_vector_from_alttiri() -> None:
    c = "GRSM8+c1HUmlmyDuTJVrDwSDpqRV"
    raw = b64decode(c)
    assert raw[:16].hex() == "19148cf3e7351d49a59b20ee4c956b0f" and raw[16] == 4
    assert crypto.fingerprint_mtime(c) == 1436853891
    assert crypto.fingerprint_mtime(c.replace("+", "-")) == 1436853891
    assert crypto.encode_fingerprint(raw[:16], 1436853891) == "GRSM8-c1HUmlmyDuTJVrDwSDpqRV"


@pytest.mark.parametrize("mtime", [0, 1, 255, 256, 1700000000, (1 << 40) + 7, -1])
def test_fingerprint_mtime_round_trip(mtime: int) -> None:
    c = crypto.encode_fingerprint(bytes(range(16)), mtime)
    assert crypto.fingerprint_mtime(c) == mtime


def test_fingerprint_mtime_compact_encoding() -> None:
    assert b64decode(crypto.encode_fingerprint(bytes(16), 0))[16:] == b"\x00"
    assert b64decode(crypto.encode_fingerprint(bytes(16), 0x0102))[16:] == b"\x02\x02\x01"


@pytest.mark.parametrize(
    "c",
    [
        "",
        "!!!",
        b64encode(bytes(16)),
        b64encode(bytes(16) + b"\x04\x01\x02"),
        b64encode(bytes(16) + b"\x09" + bytes(9)),
    ],
)
def test_fingerprint_mtime_undecodable(c: str) -> None:
    assert crypto.fingerprint_mtime(c) is None


# -------------------------------------------------------------------------- hashcash

HASHCASH_TOKEN = "K4QHo4I6XmnLNNsFqutTwObWZMClxf7ov--5OHLdGXSMHRwN8bLvrUTlpnhXVdtO"


def test_hashcash_threshold() -> None:
    assert crypto.hashcash_threshold(200) == 0x11000000
    assert crypto.hashcash_threshold(192) == 1 << 24
    assert crypto.hashcash_threshold(180) == 105 << 17
    assert crypto.hashcash_threshold(100) == 73 << 10
    with pytest.raises(MegaCryptoError):
        crypto.hashcash_threshold(256)


def test_hashcash_check_vector() -> None:
    assert crypto.hashcash_check(HASHCASH_TOKEN, "CgAAAA", 200)
    assert not crypto.hashcash_check(HASHCASH_TOKEN, "CQAAAA", 200)  # prefix 09000000
    assert not crypto.hashcash_check(HASHCASH_TOKEN, "CgAAAA", 0)
    assert not crypto.hashcash_check(HASHCASH_TOKEN, "CgAA", 200)  # 3 bytes
    assert not crypto.hashcash_check("short", "CgAAAA", 200)
    buffer = bytes.fromhex("0a000000") + b64decode(HASHCASH_TOKEN) * 262144
    assert hashlib.sha256(buffer).digest()[:4].hex() == "063d88c9"


def test_solve_hashcash_vector() -> None:
    assert crypto.solve_hashcash(HASHCASH_TOKEN, 200) == "CgAAAA"


def test_solve_hashcash_threads() -> None:
    cash = crypto.solve_hashcash(HASHCASH_TOKEN, 255, workers=2)
    assert crypto.hashcash_check(HASHCASH_TOKEN, cash, 255)


@pytest.mark.parametrize("workers", [1, 2])
def test_solve_hashcash_cancel(workers: int) -> None:
    calls = 0

    def cancelled() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    with pytest.raises(MegaCryptoError, match="hashcash cancelled"):
        crypto.solve_hashcash(HASHCASH_TOKEN, 0, workers=workers, cancelled=cancelled)


def test_solve_hashcash_rejects_bad_token() -> None:
    with pytest.raises(MegaCryptoError):
        crypto.solve_hashcash("AAAA", 200)


# ------------------------------------------------------------------- handles, tsid


def test_handle_auth_vector() -> None:
    assert crypto.handle_auth(MASTER, "AbCdEfGh") == "n_iRYupN5bTWOjpmph_3Hw"
    with pytest.raises(MegaCryptoError):
        crypto.handle_auth(MASTER, "AbCdEfG")


def test_tsid_transcript_structure() -> None:
    # megatools transcript: ts = C || AES(MK, C) was sent with "up", tsid came back.
    ts = b64decode("W9fg4kOw8p44KWoWICbgEd3rfMovr5HoSjI1vN7845s")
    tsid = b64decode("W9fg4kOw8p44KWoWICbgES1hMURIZVdmZ3VZ3et8yi-vkehKMjW83vzjmw")
    assert len(ts) == 32 and len(tsid) == 43
    assert tsid[:16] == ts[:16]
    assert tsid[16:27] == b"-a1DHeWfguY"
    assert tsid[27:] == ts[16:]


def test_tsid_round_trip() -> None:
    tsid = crypto.make_tsid(MASTER, "-a1DHeWfguY")
    raw = b64decode(tsid)
    assert len(tsid) == 58 and raw[16:27] == b"-a1DHeWfguY"
    assert crypto.aes_ecb_encrypt(MASTER, raw[:16]) == raw[27:]
    assert crypto.check_tsid(tsid, MASTER)
    assert not crypto.check_tsid(tsid, bytes(16))
    tampered = b64encode(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert not crypto.check_tsid(tampered, MASTER)
    assert not crypto.check_tsid("garbage!", MASTER)
    assert not crypto.check_tsid(b64encode(raw[:42]), MASTER)


def test_session_token_layout() -> None:
    token = crypto.make_session_token("-a1DHeWfguY")
    assert len(token) == 43 and token[16:27] == b"-a1DHeWfguY"
    assert crypto.make_session_token("-a1DHeWfguY") != token
    with pytest.raises(MegaCryptoError):
        crypto.make_session_token("short")


# ------------------------------------------------------------------------------ RSA


@pytest.fixture(scope="module")
def rsa_key() -> RsaKey:
    return crypto.generate_rsa_key(2048)


def test_generated_key_is_consistent(rsa_key: RsaKey) -> None:
    assert rsa_key.n.bit_length() == 2048 and rsa_key.e == 65537
    assert (rsa_key.p * rsa_key.u) % rsa_key.q == 1
    m = 123456789
    assert pow(pow(m, rsa_key.e, rsa_key.n), rsa_key.d, rsa_key.n) == m
    assert str(rsa_key.d) not in repr(rsa_key)


def test_private_key_encoding_round_trip(rsa_key: RsaKey) -> None:
    blob = crypto.encode_private_key(rsa_key)
    assert len(blob) % 16 == 0
    # MPI layout: 2-byte bit length then the magnitude, first prime first.
    assert struct.unpack(">H", blob[:2])[0] == rsa_key.p.bit_length()
    assert int.from_bytes(blob[2 : 2 + (rsa_key.p.bit_length() + 7) // 8], "big") == rsa_key.p
    assert crypto.decode_private_key(blob) == rsa_key
    with pytest.raises(MegaCryptoError):
        crypto.decode_private_key(blob[:100])
    with pytest.raises(MegaCryptoError):
        crypto.decode_private_key(blob + bytes(16))


def test_public_key_encoding(rsa_key: RsaKey) -> None:
    raw = crypto.encode_public_key(rsa_key)
    assert raw[:2] == b"\x08\x00" and raw[-5:] == b"\x00\x11\x01\x00\x01"
    assert crypto.decode_public_key(raw) == (rsa_key.n, 65537)
    # Web-client accounts store e in 4 bytes (bit length 32).
    webclient = raw[:-5] + b"\x00\x20\x00\x01\x00\x01"
    assert crypto.decode_public_key(webclient) == (rsa_key.n, 65537)
    with pytest.raises(MegaCryptoError):
        crypto.decode_public_key(raw[:-1])


def test_session_id_round_trip(rsa_key: RsaKey) -> None:
    pubk = crypto.encode_public_key(rsa_key)
    token = crypto.make_session_token("-a1DHeWfguY")
    csid = crypto.encrypt_session_id(pubk, token)
    assert crypto.decrypt_session_id(csid, rsa_key) == b64encode(token)
    assert len(crypto.decrypt_session_id(csid, rsa_key)) == 58


@pytest.mark.parametrize("lead", [b"\x00", b"\x00\x00\x00", b"\x01"])
def test_session_id_with_leading_zero_bytes(rsa_key: RsaKey, lead: bytes) -> None:
    pubk = crypto.encode_public_key(rsa_key)
    token = lead + crypto.make_session_token("-a1DHeWfguY")[len(lead) :]
    csid = crypto.encrypt_session_id(pubk, token)
    assert crypto.decrypt_session_id(csid, rsa_key) == b64encode(token)


def test_session_id_decrypts_fixed_width_plaintext(rsa_key: RsaKey) -> None:
    # A hand-made csid whose plaintext is 254 bytes starting with 0x00: the first 43
    # bytes of the fixed-width string, not of the minimal encoding.
    plain = bytes(1) + bytes(range(1, 43)) + bytes(211)
    c = pow(int.from_bytes(plain, "big"), rsa_key.e, rsa_key.n)
    csid = b64encode(struct.pack(">H", c.bit_length()) + c.to_bytes((c.bit_length() + 7) // 8))
    assert b64decode(crypto.decrypt_session_id(csid, rsa_key)) == plain[:43]
    with pytest.raises(MegaCryptoError):
        n = rsa_key.n
        crypto.decrypt_session_id(
            b64encode(struct.pack(">H", n.bit_length()) + n.to_bytes(256, "big")), rsa_key
        )


def test_small_rsa_keys_for_tests() -> None:
    key = crypto.generate_rsa_key(1024)
    assert key.n.bit_length() == 1024
    token = bytes(1) + bytes(range(42))
    csid = crypto.encrypt_session_id(crypto.encode_public_key(key), token)
    assert crypto.decrypt_session_id(csid, key) == b64encode(token)


# --------------------------------------------------------------------------- signup


def check_client_login(account: crypto.NewAccount, password: str) -> None:
    """Replay what a client does with the server's records after ``us``."""
    if account.version == 2:
        assert account.salt is not None
        password_key, uh = crypto.derive_key_v2(password, account.salt)
        assert crypto.v2_verifier(uh) == account.verifier
    else:
        password_key = crypto.prepare_key_v1(crypto.password_bytes_v1(password))
        uh = crypto.user_hash_v1(account.email, password_key)
        assert b64decode(uh) == account.verifier
    assert uh == account.uh
    master = crypto.decrypt_key(password_key, account.k)
    assert master == account.master_key
    rsa_key = crypto.decode_private_key(crypto.aes_ecb_decrypt(master, b64decode(account.privk)))
    assert rsa_key == account.rsa
    token = crypto.make_session_token("-a1DHeWfguY")
    csid = crypto.encrypt_session_id(b64decode(account.pubk), token)
    assert crypto.decrypt_session_id(csid, rsa_key) == b64encode(token)


def test_new_account_v2() -> None:
    account = crypto.new_account("Bob@Example.com", "pässwörd 2", rsa_bits=1024)
    assert account.version == 2 and account.email == "bob@example.com"
    assert account.salt is not None and len(account.salt) == 32
    assert len(account.uh) == 22 and len(account.verifier) == 16
    check_client_login(account, "pässwörd 2")
    assert account.master_key.hex() not in repr(account)


def test_new_account_v1() -> None:
    account = crypto.new_account("alice@example.com", "secret", version=1, rsa_bits=1024)
    assert account.salt is None and account.version == 1
    assert account.uh == "WaMWTRKAoMI"  # §8.2: same password key, same hash
    assert account.verifier == b64decode("WaMWTRKAoMI")
    assert account.k == crypto.encrypt_key(
        bytes.fromhex("5d63b08ddf20de47e920484d3209cd6c"), account.master_key
    )
    check_client_login(account, "secret")


def test_new_account_bad_version() -> None:
    with pytest.raises(MegaCryptoError):
        crypto.new_account("a@b.c", "pw", version=3, rsa_bits=1024)
