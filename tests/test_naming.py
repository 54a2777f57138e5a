"""Names from URLs and from callers: decoded, sanitised, bounded, never escaping dest."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from fetchpool import InvalidURL, UnsafeFilenameError
from fetchpool.naming import (
    RESERVED_PREFIX,
    check_relative_filename,
    derived_name,
    name_from_content_disposition,
    name_from_url,
    origin_url,
    redact_url,
    sanitize,
    validate_url,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h/a/cat.jpg", "cat.jpg"),
        ("http://h/a/cat.jpg?size=large#frag", "cat.jpg"),
        ("http://h/caf%C3%A9.png", "café.png"),
        ("http://h/a%20b.png", "a b.png"),
        ("http://h/a%5cb.png", "a_b.png"),
        ("http://h/a%2fb.png", "a_b.png"),
        ("http://h/%00x.png", "x.png"),
        ("http://h/.hidden.png", "hidden.png"),
        ("http://h/con.png", "_con.png"),
    ],
)
def test_name_from_url(url: str, expected: str) -> None:
    assert name_from_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://h/%2e%2e%2f",
        "http://h/..%2F..%2Fetc%2Fpasswd",
        "http://h/%2e%2e",
        "http://h/a/..",
        "http://h/%5c..%5c..%5cwin.ini",
        "http://h/" + RESERVED_PREFIX + "0123.lock",
    ],
)
def test_hostile_names_stay_plain_files(url: str) -> None:
    name = name_from_url(url)
    assert name
    assert "/" not in name
    assert "\\" not in name
    assert ".." not in name
    assert not name.startswith(".")
    assert "\x00" not in name


@pytest.mark.parametrize("url", ["http://h/", "http://h", "http://h/a/", "http://h/%2e%2e"])
def test_empty_name_gets_stable_derived_name(url: str) -> None:
    name = name_from_url(url)
    assert name.startswith("download-")
    assert name == name_from_url(url)
    assert name != name_from_url(url + "x/")


def test_long_names_are_bounded_and_keep_extension() -> None:
    name = name_from_url("http://h/" + "x" * 300 + ".png")
    assert len(name.encode()) <= 200
    assert name.endswith(".png")
    multibyte = name_from_url("http://h/" + "é" * 300 + ".jpeg")
    assert len(multibyte.encode()) <= 200
    assert multibyte.endswith(".jpeg")
    multibyte.encode("utf-8")  # no broken character at the cut


def test_derived_name_inserts_hash_before_extension() -> None:
    a = derived_name("cat.jpg", "http://h/a/cat.jpg")
    b = derived_name("cat.jpg", "http://h/b/cat.jpg")
    assert a != b
    assert a.startswith("cat-")
    assert a.endswith(".jpg")
    assert a == derived_name("cat.jpg", "http://h/a/cat.jpg")
    assert derived_name("README", "u").startswith("README-")


def test_derived_name_ignores_userinfo_and_fragment() -> None:
    assert derived_name("a.png", "http://u:p@h/a.png#x") == derived_name("a.png", "http://h/a.png")


def test_sanitize_removes_control_and_separators() -> None:
    assert sanitize("a\x01b\x7f/c\\d\n.png") == "ab_c_d.png"
    assert sanitize("...") == ""
    assert sanitize("  ") == ""


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('attachment; filename="photo.jpg"', "photo.jpg"),
        ("attachment; filename=photo.jpg", "photo.jpg"),
        ('attachment; filename="../../etc/passwd"', "passwd"),
        ('attachment; filename="..\\\\..\\\\boot.ini"', "boot.ini"),
        ("attachment; filename*=UTF-8''caf%C3%A9.png", "café.png"),
        ('attachment; filename=".."', None),
        ("inline", None),
        ("", None),
        (None, None),
    ],
)
def test_content_disposition(header: str | None, expected: str | None) -> None:
    assert name_from_content_disposition(header) == expected


@pytest.mark.parametrize(
    ("filename", "parts"),
    [
        ("a.png", ("a.png",)),
        ("sub/dir/a.png", ("sub", "dir", "a.png")),
        ("./a//b.png", ("a", "b.png")),
    ],
)
def test_caller_filenames_accepted(filename: str, parts: tuple[str, ...]) -> None:
    assert check_relative_filename(filename).parts == parts
    assert check_relative_filename(PurePosixPath(filename)).parts == parts


@pytest.mark.parametrize(
    "filename",
    [
        "",
        "/etc/passwd",
        "../x.png",
        "a/../../x.png",
        "a\\b.png",
        "C:x.png",
        "a\x00b",
        "dir/",
        "x" * 256,
        RESERVED_PREFIX + "x.part",
        ".",
    ],
)
def test_caller_filenames_refused(filename: str) -> None:
    with pytest.raises(UnsafeFilenameError):
        check_relative_filename(filename, "http://h/x")


def test_caller_filename_of_wrong_type() -> None:
    with pytest.raises(TypeError):
        check_relative_filename(b"x.png")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h/x.png",
        "file:///etc/passwd",
        "h/x.png",
        "http:///x.png",
        "http://h:99999/x.png",
        "http://h/x y.png",
        "http://h/x\r\nHost: evil",
        "",
        "javascript:alert(1)",
    ],
)
def test_invalid_urls(url: str) -> None:
    with pytest.raises(InvalidURL) as info:
        validate_url(url)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("url", [None, 12, b"http://h/x.png", ["http://h/x.png"]])
def test_non_string_urls(url: object) -> None:
    with pytest.raises(InvalidURL):
        validate_url(url)


def test_redaction() -> None:
    assert redact_url("https://user:pw@h:8443/x?q=1#f") == "https://h:8443/x?q=1#f"
    assert redact_url("https://h/x") == "https://h/x"
    assert origin_url("https://user:pw@h/x?q=1#f") == "https://h/x?q=1"
