"""The wire form of requests and answers between processes (Ray, Monarch): round trips and bad input."""
import re

import pytest
import torch
from tensordict import TensorDict

from rlserve import RequestError
from rlserve.transports import _codec
from rlserve.transports._codec import MAGIC, decode_td, encode_td
from rlserve.transports._remote import encode_rows, unwrap_reply
from remote_probes import wire_frame

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
          torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]


def _same(a: TensorDict, b: TensorDict) -> None:
    assert set(a.keys()) == set(b.keys())
    assert a.batch_size == b.batch_size
    for k in a.keys():
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips(dtype):
    x = (torch.randn(3, 5) * 50).to(dtype)
    td = TensorDict(x=x, scalar=torch.tensor(3).to(dtype), empty=torch.empty(0, 2, dtype=dtype), batch_size=[])
    payload = encode_td(td)
    assert type(payload) is bytes and payload[:2] == MAGIC
    _same(decode_td(payload), td)


def test_batch_dims_odd_sizes_and_non_contiguous_leaves():
    base = torch.arange(2 * 3 * 7, dtype=torch.float32).reshape(2, 3, 7)
    td = TensorDict(
        t=base.transpose(1, 2).transpose(1, 2)[:, :, ::2],  # strided view
        b=torch.ones(2, 3, dtype=torch.bool),
        i=torch.arange(6, dtype=torch.int16).reshape(2, 3, 1),  # 2-byte leaf: padding follows
        batch_size=[2, 3],
    )
    assert not td["t"].is_contiguous()
    _same(decode_td(encode_td(td)), td)


def test_decoded_tensors_are_writable_and_alias_nothing():
    obs = torch.zeros(4)
    payload = encode_td(TensorDict(a=obs, b=torch.zeros(4)))
    one, two = decode_td(payload), decode_td(payload)
    one["a"].add_(1)  # no warning, no error: a fresh buffer
    assert obs.sum() == 0 and two["a"].sum() == 0 and one["b"].sum() == 0
    assert payload == encode_td(TensorDict(a=torch.zeros(4), b=torch.zeros(4)))


def test_what_cannot_take_the_wire_form_travels_as_the_tensordict():
    nested = TensorDict(a=TensorDict(b=torch.zeros(2)))
    grad = TensorDict(w=torch.zeros(2, requires_grad=True))
    assert encode_td(nested) is nested
    assert encode_td(grad) is grad
    assert decode_td(nested) is nested
    with pytest.raises(RequestError, match="must be a TensorDict, got dict"):
        encode_td({"a": torch.zeros(1)})


@pytest.mark.parametrize("payload, says", [
    (b"\x80\x05junk", "not an rlserve wire message"),
    (MAGIC + b"\x01", "unpack"),
    (wire_frame(((), (("a", "torch.float32", (2,)),)), bytes(4)), "4 data bytes, the header says 16"),
    (wire_frame(((), (("a", "torch.float32", (2,)),)), bytes(32)), "32 data bytes"),
    (wire_frame(((), (("a", "torch.qint8", (2,)),)), bytes(16)), "unsupported dtype"),
    (wire_frame(((3,), (("a", "torch.float32", (2,)),)), bytes(16)), "batch_size is [3]"),
    (wire_frame(((), ((1, "torch.float32", (2,)),)), bytes(16)), "bad key"),
    (wire_frame(((), (("a", "torch.float32", (-2,)),)), b""), "bad shape"),
    (wire_frame(("x", ()), b""), "bad batch_size"),
    (12, "must be a TensorDict, got int"),
], ids=["pickle", "truncated", "short-data", "long-data", "dtype", "batch-size", "key", "shape", "header", "int"])
def test_malformed_payloads_are_request_errors(payload, says):
    with pytest.raises(RequestError, match=re.escape(says)):
        decode_td(payload)


def test_answer_rows_carry_each_row():
    out = TensorDict(
        observation=torch.randn(5, 8),
        action=torch.randn(5, 4).to(torch.bfloat16),
        done=torch.tensor([True, False, True, False, True]),
        grid=torch.arange(5 * 6, dtype=torch.int64).reshape(5, 2, 3),
        policy_version=torch.full((5,), 7),
        batch_size=[5],
    )
    rows = encode_rows(out)
    assert len(rows) == 5 and all(type(r) is bytes for r in rows)
    for i, r in enumerate(rows):
        got = unwrap_reply(r)
        assert got.batch_size == torch.Size([])
        assert got["policy_version"].dtype == torch.int64 and got["policy_version"].item() == 7
        for k in ("observation", "action", "done", "grid"):
            assert torch.equal(got[k], out[k][i]), k


def test_answer_rows_keep_the_row_batch_size():
    out = TensorDict(a=torch.arange(6.0).reshape(2, 3), v=torch.full((2, 3), 4), batch_size=[2, 3])
    second = unwrap_reply(encode_rows(out)[1])
    assert second.batch_size == (3,) and torch.equal(second["a"], out["a"][1]) and (second["v"] == 4).all()


def test_header_caches_stay_bounded(monkeypatch):
    monkeypatch.setattr(_codec, "_CACHE_MAX", 8)
    monkeypatch.setattr(_codec, "_headers", {})
    monkeypatch.setattr(_codec, "_layouts", {})
    for n in range(1, 40):
        td = TensorDict(x=torch.zeros(n))
        _same(decode_td(encode_td(td)), td)
    assert len(_codec._headers) <= 8 and len(_codec._layouts) <= 8


def test_bfloat16_leaves_with_one_element_and_any_stride():
    # torch calls a one-element tensor contiguous whatever its stride: e.g. logits[:, 0] of a
    # batch of one, the lone-actor case.
    logits = torch.randn(1, 3).to(torch.bfloat16)
    td = TensorDict(first=logits[:, 0], scalar=torch.tensor(2.5, dtype=torch.bfloat16).expand(1), batch_size=[1])
    _same(decode_td(encode_td(td)), td)
    row = unwrap_reply(encode_rows(td)[0])
    assert torch.equal(row["first"], logits[0, 0]) and row["scalar"].item() == 2.5


def test_conjugate_negative_and_sparse_leaves_still_travel():
    # No plain memory to show: these go as TensorDicts (or, once made contiguous, as bytes),
    # never as an error.
    z = torch.randn(2, 3, dtype=torch.complex64)
    cases = {
        "conj": TensorDict(x=z.conj(), batch_size=[2]),
        "neg": TensorDict(x=z.conj().imag, batch_size=[2]),
        "neg-contiguous": TensorDict(x=torch.randn(2, 3)._neg_view(), batch_size=[2]),
        "sparse": TensorDict(x=torch.eye(2).to_sparse(), batch_size=[2]),
    }
    for name, td in cases.items():
        got = decode_td(encode_td(td))
        assert torch.equal(got["x"].resolve_conj().resolve_neg().to_dense(),
                           td["x"].resolve_conj().resolve_neg().to_dense()), name
        rows = encode_rows(td)
        for i, r in enumerate(rows):
            assert torch.equal(unwrap_reply(r)["x"].resolve_conj().resolve_neg().to_dense(),
                               td["x"][i].resolve_conj().resolve_neg().to_dense()), name
    assert encode_td(cases["conj"]) is cases["conj"] and encode_td(cases["sparse"]) is cases["sparse"]
