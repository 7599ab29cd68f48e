import pytest
import torch

from persres.errors import BackendUnavailable
from persres.kernels import Backend, attention, attention_backend, available_backends, resolve_backend
from persres.kernels.attention import lse_attention


def qkv(nk=7, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 16, 8, generator=g)
    k = torch.randn(2, 3, nk, 8, generator=g)
    v = torch.randn(2, 3, nk, 8, generator=g)
    return (t.to(device, dtype) for t in (q, k, v))


@pytest.mark.parametrize("backend", [b for b in available_backends()])
@pytest.mark.parametrize("token_sets", [None, [(1, 2)], [(1,), (3, 4, 5)]])
def test_every_backend_matches_the_reference(backend, token_sets):
    q, k, v = qkv()
    ref_out, ref_maps = attention(q, k, v, token_sets=token_sets, backend=Backend.REFERENCE)
    out, maps = attention(q, k, v, token_sets=token_sets, backend=backend)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    if token_sets is None:
        assert maps is None and ref_maps is None
    else:
        assert maps.shape == (2, len(token_sets), 16)
        torch.testing.assert_close(maps, ref_maps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-lse", "torch-lse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lse_maps_match_the_reference(fused, dtype):
    """SD-like cross-attention (77 keys); sets may share a column."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g).to(dtype) for n in (64, 77, 77))
    sets = [(5, 6), (6, 9, 10), (0,)]
    ref_out, ref_maps = attention(q, k, v, token_sets=sets, backend="reference")
    out, maps = lse_attention(q, k, v, sets, None, fused=fused)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(maps, ref_maps, **(tol if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)))


def test_sdpa_maps_never_form_the_full_attention_matrix():
    """With token sets the sdpa backend takes the kernel's log-sum-exp: no op returns an Nq x Nk tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.seen.append((func.__name__, tuple(t.shape)))
            return out

    q, k, v = qkv(nk=7)
    with Shapes() as fused:
        attention(q, k, v, token_sets=[(1, 2)], backend="sdpa")
    with Shapes() as explicit:
        attention(q, k, v, token_sets=[(1, 2)], backend="reference")
    full = lambda seen: [name for name, shape in seen if shape[-2:] == (16, 7)]  # (…, Nq, Nk)
    assert full(explicit.seen)  # the check sees the reference's probabilities
    assert not full(fused.seen), full(fused.seen)


def test_reference_is_plain_softmax_attention():
    q, k, v = qkv()
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)  # (B, heads, Nq, Nk)
    out, maps = attention(q, k, v, token_sets=[(0, 1, 2, 3, 4, 5, 6), (2,)], backend="reference")
    torch.testing.assert_close(out, probs @ v)
    torch.testing.assert_close(maps[:, 0], torch.ones(2, 16))  # all columns sum to one
    torch.testing.assert_close(maps[:, 1], probs[..., 2].mean(dim=1))  # averaged over heads


def test_unknown_or_unavailable_backend_is_a_clear_error():
    with pytest.raises(BackendUnavailable, match="unknown attention backend"):
        resolve_backend("flash9")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="xformers"):
            resolve_backend("xformers")
    assert resolve_backend(None) is Backend.SDPA


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_processor_matches_diffusers_default_attention(pipe, backend):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 32, 32, generator=g)
    with torch.no_grad():
        base = pipe.unet(sample, 10, encoder_hidden_states=emb).sample
        with attention_backend(pipe.unet, backend):
            ours = pipe.unet(sample, 10, encoder_hidden_states=emb).sample
        again = pipe.unet(sample, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(ours, base, rtol=1e-4, atol=1e-5)
    assert torch.equal(again, base)  # processors restored


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backends_in_half_precision_match_the_reference(backend, dtype):
    if backend not in [b.value for b in available_backends()]:
        pytest.skip(f"{backend} not installed")
    q, k, v = qkv(nk=77, dtype=dtype, device="cuda")
    ref_out, ref_maps = attention(q, k, v, token_sets=[(3, 4)], backend="reference")
    out, _ = attention(q, k, v, backend=backend)
    _, maps = attention(q, k, v, token_sets=[(3, 4)], backend=backend)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(maps.float(), ref_maps.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_cuda_lse_maps_match_the_reference_in_fp32(backend):
    """The fused kernels' log-sum-exp gives the reference's maps: xformers' and PyTorch's efficient kernel."""
    if backend not in [b.value for b in available_backends()]:
        pytest.skip(f"{backend} not installed")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 8, n, 40, generator=g).cuda() for n in (1000, 77, 77))  # Nq not a multiple of 32
    sets = [(5, 6), (9,)]
    ref_out, ref_maps = attention(q, k, v, token_sets=sets, backend="reference")
    out, maps = attention(q, k, v, token_sets=sets, backend=backend)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps, ref_maps, rtol=1e-4, atol=1e-5)


def test_lag_path_honours_upcast_attention(monkeypatch):
    """SD 2.x sets upcast_attention: the kernel then gets fp32 q/k/v, not the model's dtype; the maps
    (from the log-sum-exp, formed in fp32) are right either way."""
    from diffusers.models.attention_processor import Attention

    import persres.kernels.processor as processor
    from persres.kernels import KernelAttnProcessor

    class Sink:
        token_sets = [(1, 2)]

        def record(self, block, maps):
            self.maps = maps

    seen = []

    def spy(q, k, v, **kw):
        seen.append(q.dtype)
        return attention(q, k, v, **kw)

    monkeypatch.setattr(processor, "attention", spy)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 16, 64, generator=g).bfloat16(), torch.randn(1, 8, 64, generator=g).bfloat16()

    def run(upcast: bool):
        torch.manual_seed(0)
        attn = Attention(query_dim=64, cross_attention_dim=64, heads=1, dim_head=64, upcast_attention=upcast)
        with torch.no_grad():
            for lin in (attn.to_q, attn.to_k):
                lin.weight.mul_(8)  # large scores: where low-precision logits go wrong
        attn.to(torch.bfloat16)
        sink = Sink()
        attn.set_processor(KernelAttnProcessor("sdpa", sink, "block"))
        with torch.no_grad():
            out = attn(x, encoder_hidden_states=ctx)
            q, k = attn.to_q(x).float(), attn.to_k(ctx).float()  # the module's own bf16 projections
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)  # (1, 16, 8) in fp32
        expected = probs[..., [1, 2]].sum(-1)  # (1, 16)
        return (sink.maps[:, 0] - expected).abs().max().item(), out.dtype, seen.pop()

    err_plain, dtype, kernel_plain = run(False)
    err_upcast, _, kernel_upcast = run(True)
    assert dtype == torch.bfloat16
    assert (kernel_plain, kernel_upcast) == (torch.bfloat16, torch.float32)
    # the upcast kernel's log-sum-exp is fp32 like the reference; the plain one's comes from bf16
    # arithmetic inside the kernel (native-bf16 CPUs differ there); a wrong column would be off by ~0.1
    assert err_upcast < 1e-5 and err_plain < 1e-3, (err_plain, err_upcast)