"""Fake-tensor rules of the ``parallax_cpu`` torch ops (csrc/cpu/torch_ops.cpp): output
shapes and dtypes without running a kernel, so the ops trace under torch.compile and
FakeTensorMode. Imported by ``ops.cpu.torch_ops`` once the shim's library is loaded."""
from __future__ import annotations

import torch

PANEL = 32


def _linear_out(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], n)                                    # (..., N)


@torch.library.register_fake("parallax_cpu::gemm_packed_f32")
def _gemm_packed(x, packed, bias, isa):
    return _linear_out(x, packed.shape[0] * PANEL)


@torch.library.register_fake("parallax_cpu::int8_linear_f32")
def _int8_linear(x, qweight, scales, bias, isa):
    return _linear_out(x, qweight.shape[0])


@torch.library.register_fake("parallax_cpu::block_linear_f32")
def _block_linear(x, qweight, bias, kind, block, block_bytes, isa):
    return _linear_out(x, qweight.shape[0])


@torch.library.register_fake("parallax_cpu::block_linear_ggml")
@torch.library.register_fake("parallax_cpu::block_linear_q8")
def _block_linear_q8(x, qweight, bias, kind, block, block_bytes, isa):
    return _linear_out(x, qweight.shape[0])


@torch.library.register_fake("parallax_cpu::quantize_act")
def _quantize_act(x, kind, isa):
    block, sums = (256, 16) if kind == "q8_k" else (32, 32)
    return (x.new_empty(x.shape, dtype=torch.int8),                        # (M, K) codes
            x.new_empty(x.shape[0], x.shape[1] // block),                  # scales
            x.new_empty(x.shape[0], x.shape[1] // sums))                   # sums


@torch.library.register_fake("parallax_cpu::add_rms_norm_f32")
def _add_rms_norm(x, residual, weight, eps, isa):
    return torch.empty_like(x), (torch.empty_like(x) if residual is not None
                                 else x.new_empty(0))


@torch.library.register_fake("parallax_cpu::silu_and_mul_f32")
def _silu_and_mul(x, isa):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.register_fake("parallax_cpu::argmax_rows_f32")
def _argmax_rows(x, isa):
    return x.new_empty(x.shape[0], dtype=torch.long)


@torch.library.register_fake("parallax_cpu::decode_attention_kv_f32")
def _decode_attention(q, k, v, k_cache, v_cache, cos, sin, context_lens, scale, isa):
    return q.new_empty(q.shape)                                             # (B, Hq, D)


@torch.library.register_fake("parallax_cpu::paged_attention_kv_f32")
def _paged_attention(q, k, v, k_cache, v_cache, cos, sin, slot_mapping, block_tables,
                     context_lens, query_start_loc, scale, window, softcap, isa):
    return q.new_empty(q.shape)                                             # (T, Hq, D)


@torch.library.register_fake("parallax_cpu::attention_half_f32")
def _attention_half(x, residual, norm_weight, eps, w_qkv, qkv_kind, b_qkv, w_o, o_kind,
                    k_cache, v_cache, cos, sin, slot_mapping, block_tables, context_lens,
                    query_start_loc, num_heads, num_kv_heads, scale, window, softcap, isa):
    return torch.empty_like(x), torch.empty_like(x)                         # (T, H) twice


@torch.library.register_fake("parallax_cpu::mlp_half_f32")
def _mlp_half(x, residual, norm_weight, eps, w_gate_up, gate_up_kind, w_down, down_kind,
              intermediate, isa):
    return torch.empty_like(x), torch.empty_like(x)                         # (T, H) twice


@torch.library.register_fake("parallax_cpu::ggml_rms_norm_f32")
def _ggml_rms_norm(x, weight, eps, isa):
    return torch.empty_like(x)


@torch.library.register_fake("parallax_cpu::ggml_swiglu_f32")
def _ggml_swiglu(x, isa):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.register_fake("parallax_cpu::ggml_rope_f32")
def _ggml_rope(x, positions, freq_base, neox, isa):
    return torch.empty_like(x)


@torch.library.register_fake("parallax_cpu::ggml_attention_f32")
def _ggml_attention(q, k, v, positions, scale, step_rows, n_kv, n_threads, isa):
    return torch.empty_like(q)
