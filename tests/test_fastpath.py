"""The direct call of a plain TensorDictModule gives what calling the module gives."""
import pytest
import torch
import torch.nn as nn
from tensordict import TensorDict
from tensordict.nn import TensorDictModule

from rlserve import InferenceServer, RequestError, ThreadingTransport
from rlserve._fastpath import direct_call


def batch_of(server_model, tds, **kw):
    """Serve ``tds`` as exactly one batch (min_batch_size = len) and return the answers."""
    tr = ThreadingTransport()
    with InferenceServer(server_model, tr, max_batch_size=len(tds), min_batch_size=len(tds), timeout=5, **kw):
        client = tr.client()
        futs = [client.submit(td) for td in tds]
        return [f.result(timeout=10) for f in futs]


def test_direct_path_equals_calling_the_module(policy):
    assert direct_call(policy) is not None
    tds = [TensorDict(observation=torch.randn(8)) for _ in range(6)]
    direct = batch_of(policy, tds)
    wrapped = batch_of(lambda b: policy(b), tds)  # not a TensorDictModule: the general path
    for a, b in zip(direct, wrapped):
        assert set(a.keys()) == set(b.keys()) == {"observation", "action", "policy_version"}
        assert torch.equal(a["action"], b["action"])  # same batch, same kernel: bitwise equal


def test_several_outputs_and_batched_requests():
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y, (x * y).sum(-1)

    m = TensorDictModule(Two(), in_keys=["x", "y"], out_keys=["s", "p"])
    tds = [TensorDict(x=torch.ones(5, 3) * i, y=torch.ones(5, 3), batch_size=[5]) for i in range(3)]
    outs = batch_of(m, tds)
    for i, o in enumerate(outs):
        assert o.batch_size == (5,)
        assert torch.equal(o["s"], torch.ones(5, 3) * (i + 1))
        assert torch.equal(o["p"], torch.full((5,), 3.0 * i))


def test_hooks_disable_the_direct_path(policy):
    seen = []
    tr = ThreadingTransport()
    with InferenceServer(policy, tr):
        client = tr.client()
        client(TensorDict(observation=torch.randn(8)))
        handle = policy.register_forward_hook(lambda mod, args, out: seen.append(out.batch_size))
        client(TensorDict(observation=torch.randn(8)))
        handle.remove()
    assert seen == [torch.Size([1])]  # registered after start, still honoured


@pytest.mark.parametrize(
    "kw",
    [dict(inplace=False), dict(in_keys={"input": "observation"})],
)
def test_other_tensordictmodule_settings_take_the_general_path(kw):
    class Id(nn.Module):
        def forward(self, input):
            return input * 2

    in_keys = kw.pop("in_keys", ["observation"])
    m = TensorDictModule(Id(), in_keys=in_keys, out_keys=["action"], **kw)
    assert direct_call(m) is None
    out = batch_of(m, [TensorDict(observation=torch.ones(2))])[0]
    assert torch.equal(out["action"], torch.full((2,), 2.0))


def test_a_module_that_drops_the_batch_dim_is_a_clear_error():
    class Mean(nn.Module):
        def forward(self, x):
            return x.mean()

    m = TensorDictModule(Mean(), in_keys=["observation"], out_keys=["action"])
    tr = ThreadingTransport()
    with InferenceServer(m, tr) as server:
        with pytest.raises(RuntimeError, match="does not start with the batch size"):
            tr.client()(TensorDict(observation=torch.ones(3)))
        assert server.is_alive


def test_missing_key_on_the_direct_path(policy):
    tr = ThreadingTransport()
    with InferenceServer(policy, tr):
        client = tr.client()
        with pytest.raises(KeyError, match="observation"):  # nothing accepted yet: the plain error
            client(TensorDict(obs=torch.randn(8)))
        client(TensorDict(observation=torch.randn(8)))
        with pytest.raises(RequestError, match=r"missing keys \['observation'\]"):
            client(TensorDict(obs=torch.randn(8)))
