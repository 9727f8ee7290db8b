"""The CPU stand-in for ``sgl_kernel`` (sglang_ckpt_plugin/cpu_support/stub): its one real kernel moves KV-cache rows
byte for byte, and every other name fails loudly, naming itself."""

import importlib.util

import pytest
import torch

from sglang_ckpt_plugin.cpu_support import STUB_PATH


@pytest.fixture(scope="module")
def stub():
    spec = importlib.util.spec_from_file_location("sgl_kernel_stub", STUB_PATH / "sgl_kernel" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_copy_all_layer_kv_cache_moves_each_layers_rows_as_sglang_asks(stub):
    """Two layers' buffers of different row widths (K of 3x8 bf16, V of 5 float32 per slot): row tgt[j] takes the
    bytes of row src[j] in every buffer, sources read before any is written (slots 4 and 2 swap), nothing else moves."""
    k = torch.randn(10, 3, 8).to(torch.bfloat16)
    v = torch.randn(12, 5)
    before = [k.clone(), v.clone()]
    ptrs = torch.tensor([k.data_ptr(), v.data_ptr()], dtype=torch.uint64)
    strides = torch.tensor([k[0].nbytes, v[0].nbytes], dtype=torch.int64)
    tgt, src = torch.tensor([1, 4, 2, 7]), torch.tensor([3, 2, 4, 0])
    stub.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for buf, old in zip((k, v), before):
        expected = old.clone()
        expected[tgt] = old[src]
        assert torch.equal(buf, expected)
    stub.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt[:0], src[:0])  # nothing to move: nothing read


def test_every_other_kernel_names_itself_when_called(stub):
    with pytest.raises(NotImplementedError, match="sgl_kernel.assign_req_to_token_pool_cpu is not available"):
        stub.assign_req_to_token_pool_cpu()
