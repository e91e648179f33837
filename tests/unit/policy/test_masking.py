"""SecretMask: held values found by value, in the encodings they travel in."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from llmtap.masking import MARKER, NO_MASK, SecretMask

KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
MASK = SecretMask([KEY, "sk-proj/with+odd=chars"])


@given(before=st.binary(max_size=5), after=st.binary(max_size=5), urlsafe=st.booleans())
def test_a_key_inside_any_base64_text_is_masked(before: bytes, after: bytes, urlsafe: bool) -> None:
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    text = "Basic " + encode(before + b"user:" + KEY.encode() + after).decode()
    masked = MASK.text(text)
    assert MARKER in masked
    # What is left of the encoding decodes to no more than two bytes of the key at each end.
    assert KEY[2:-2] not in masked


@pytest.mark.parametrize("text", [KEY, f"?key={KEY}&x=1", quote("sk-proj/with+odd=chars", safe=""),
                                  "sk-proj%2Fwith%2Bodd%3Dchars", f'{{"k": "{KEY}"}}'])
def test_plain_and_url_encoded_values_are_masked(text: str) -> None:
    assert MARKER in MASK.text(text) and KEY not in MASK.text(text)
    assert MASK.data(text.encode()) == MASK.text(text).encode()


def test_deep_masks_keys_values_and_nesting_and_keeps_other_types() -> None:
    record = {"path": f"/v1?q={KEY}", KEY: [1, None, True, {"cmd": f"curl -H api-key:{KEY}"}]}
    masked = MASK.deep(record)
    assert KEY not in repr(masked) and masked[MARKER][:3] == [1, None, True]


def test_short_values_and_no_values_mask_nothing() -> None:
    assert not SecretMask(["abc"]) and not NO_MASK
    assert NO_MASK.text(KEY) == KEY and NO_MASK.deep({"a": KEY}) == {"a": KEY}
    assert MASK.found_in(f"x {KEY} y") == [(2, 2 + len(KEY))]
