"""GraphDecoder: the fixed decode step gives the tokens of transformers' generate (CPU, eager)."""

import pytest
import torch

import yaqa
from yaqa.nn.graph_decode import GraphDecoder

from tiny_models import tiny_model


def _hf_greedy(model, prompt, n):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_tokens_equal_generate(family):
    model = tiny_model(family, layers=2)
    prompt = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    dec = GraphDecoder(model, max_len=32)
    assert torch.equal(dec.generate(prompt, 12), _hf_greedy(model, prompt, 12))
    # The cache is reused: a second, different prompt starts from a clean position.
    other = prompt.flip(1)
    assert torch.equal(dec.generate(other, 6), _hf_greedy(model, other, 6))


def test_greedy_tokens_equal_generate_on_a_packed_model():
    model = tiny_model("llama", hidden=128, intermediate=256, layers=2)
    yaqa.quantize(model, method="rtn", quantizer="int4", group_size=32, incoherence=True,
                  progress=False)
    prompt = torch.randint(1, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(GraphDecoder(model, max_len=24).generate(prompt, 10),
                       _hf_greedy(model, prompt, 10))


def test_unsupported_blocks_and_overlong_prompts_are_refused():
    with pytest.raises(ValueError, match="Llama-style"):
        GraphDecoder(tiny_model("qwen3"), max_len=16)
    dec = GraphDecoder(tiny_model("llama"), max_len=8)
    with pytest.raises(ValueError, match="exceed max_len"):
        dec.generate(torch.ones(1, 6, dtype=torch.long), 4)


def test_the_step_never_reads_a_tensor_back_to_the_host():
    # A CUDA graph cannot capture a host read (.item(), nonzero, data-dependent shapes): record
    # every op the step dispatches and look for those.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    dec = GraphDecoder(tiny_model("llama"), max_len=16)
    dec.prefill(torch.tensor([3, 4]))
    with Record() as rec:
        dec.step()
    assert rec.ops and not {o for o in rec.ops
                            if any(s in o for s in ("_local_scalar_dense", "nonzero", "item"))}


def test_decoding_past_the_cache_is_refused_on_the_host():
    dec = GraphDecoder(tiny_model("llama"), max_len=6)
    dec.prefill(torch.tensor([1, 2, 3]))
    dec.decode(3)
    with pytest.raises(ValueError, match="past max_len"):
        dec.decode(1)


def test_the_warm_up_before_a_capture_does_not_change_the_tokens():
    # On CUDA the first step() runs two throw-away steps before capturing the graph; each feeds its
    # argmax back into the input token.  Emulated here on CPU: the first step warms up first.
    model = tiny_model("llama", layers=2)
    prompt = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    ref = GraphDecoder(model, max_len=32).generate(prompt, 8)
    dec = GraphDecoder(model, max_len=32)
    plain_step, warmed = dec._step, []

    def step_after_warm_up():
        if not warmed:
            warmed.append(True)
            dec._warm_up(2)
        plain_step()

    dec._step = step_after_warm_up
    assert torch.equal(dec.generate(prompt, 8), ref)
    assert warmed
