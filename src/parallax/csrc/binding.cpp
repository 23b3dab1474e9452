// Registers parallax's CUDA kernels with torch as ops in the `parallax` namespace.
//
// Only device-agnostic torch headers are used: the device guard and the current stream come
// through c10's virtual guard interface (which CUDA torch implements at run time), so this file
// compiles against any torch wheel, the CPU one included. Every entry point checks its inputs
// and runs on the inputs' device and current stream. Outputs are allocated by the caller
// (`Tensor!` in the schemas); the typed Python wrappers live in parallax/ops/cuda.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include "ops.h"

namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(t.device()).native_handle());
}

int dtype_code(const at::Tensor& t, const char* op, const char* name) {
  if (t.scalar_type() == at::kHalf) return PARALLAX_F16;
  if (t.scalar_type() == at::kBFloat16) return PARALLAX_BF16;
  TORCH_CHECK(false, "parallax.", op, ": ", name, " must be float16 or bfloat16, got ",
              t.scalar_type(), " (use parallax.ops.reference for other dtypes)");
}

void check_on(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "parallax.", op, ": ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == ref.device(), "parallax.", op, ": ", name, " is on ", t.device(),
              " but the other inputs are on ", ref.device());
}

void check_contig(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "parallax.", op, ": ", name,
              " must be contiguous (call .contiguous() first), got strides ", t.strides());
}

void check_dtype(const at::Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, "parallax.", op, ": ", name, " must be ", want, ", got ",
              t.scalar_type());
}

// t must sit on x's device with x's dtype and shape, contiguous.
void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_on(t, x, op, name);
  check_contig(t, op, name);
  check_dtype(t, x.scalar_type(), op, name);
  TORCH_CHECK(t.sizes() == x.sizes(), "parallax.", op, ": ", name, " has shape ", t.sizes(),
              ", expected ", x.sizes());
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "parallax.", op, ": CUDA launch failed: ", parallax_error_string(err));
}

// out, x: (..., d); weight: (d,). residual/residual_out: like x, or absent for plain rms_norm.
void norm_impl(const char* op, at::Tensor& out, at::Tensor* residual_out, const at::Tensor& x,
               const at::Tensor* residual, const at::Tensor& weight, double eps) {
  check_on(x, x, op, "x");
  const int code = dtype_code(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, "parallax.", op, ": x must have at least one dimension");
  const int64_t d = x.size(-1);
  check_like(x, x, op, "x");
  check_like(out, x, op, "out");
  check_on(weight, x, op, "weight");
  check_contig(weight, op, "weight");
  check_dtype(weight, x.scalar_type(), op, "weight");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "parallax.", op,
              ": weight must have shape (", d, ",), got ", weight.sizes());
  if (residual) {
    check_like(*residual, x, op, "residual");
    check_like(*residual_out, x, op, "residual_out");
  }
  c10::DeviceGuard guard(x.device());
  const int64_t rows = d == 0 ? 0 : x.numel() / d;
  check_launch(parallax_add_rms_norm(out.data_ptr(), residual_out ? residual_out->data_ptr() : nullptr,
                                     x.data_ptr(), residual ? residual->data_ptr() : nullptr,
                                     weight.data_ptr(), rows, d, static_cast<float>(eps), code,
                                     current_stream(x)),
               op);
}

void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  norm_impl("rms_norm", out, nullptr, x, nullptr, weight, eps);
}

void add_rms_norm(at::Tensor out, at::Tensor residual_out, const at::Tensor& x,
                  const at::Tensor& residual, const at::Tensor& weight, double eps) {
  norm_impl("add_rms_norm", out, &residual_out, x, &residual, weight, eps);
}

// q: (B, T, Hq, D), k: (B, T, Hk, D), last dim contiguous; cos, sin: (B, T, D/2) float32.
void rotary_embedding(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin) {
  const char* op = "rotary_embedding";
  check_on(q, q, op, "q");
  const int code = dtype_code(q, op, "q");
  check_on(k, q, op, "k");
  check_dtype(k, q.scalar_type(), op, "k");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "parallax.", op,
              ": q and k must be (B, T, H, D), got ", q.sizes(), " and ", k.sizes());
  const int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), Hk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == T && k.size(3) == D, "parallax.", op,
              ": k has shape ", k.sizes(), ", incompatible with q ", q.sizes());
  TORCH_CHECK(D % 2 == 0, "parallax.", op, ": head dim must be even, got ", D);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, "parallax.", op,
              ": the head dim of q and k must be contiguous (stride 1)");
  for (const at::Tensor* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    check_on(*t, q, op, name);
    check_dtype(*t, at::kFloat, op, name);
    check_contig(*t, op, name);
    TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(1) == T && t->size(2) == D / 2,
                "parallax.", op, ": ", name, " must have shape (", B, ", ", T, ", ", D / 2,
                "), got ", t->sizes());
  }
  c10::DeviceGuard guard(q.device());
  check_launch(parallax_rotary_embedding(q.data_ptr(), k.data_ptr(), cos.data_ptr<float>(),
                                         sin.data_ptr<float>(), B, T, Hq, Hk, D, q.stride(0),
                                         q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                                         k.stride(2), code, current_stream(q)),
               op);
}

// q, out: (B, Hq, D); caches: (B, Hk, S, D) with (S, D) contiguous; context_lens: (B,) int32.
void decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& context_lens, double scale) {
  const char* op = "decode_attention";
  check_on(q, q, op, "q");
  const int code = dtype_code(q, op, "q");
  TORCH_CHECK(q.dim() == 3, "parallax.", op, ": q must be (B, Hq, D), got ", q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(D == 64 || D == 128, "parallax.", op, ": head dim must be 64 or 128, got ", D,
              " (other sizes go to parallax.ops.reference)");
  check_contig(q, op, "q");
  check_like(out, q, op, "out");
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    const char* name = t == &k_cache ? "k_cache" : "v_cache";
    check_on(*t, q, op, name);
    check_dtype(*t, q.scalar_type(), op, name);
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(3) == D, "parallax.", op, ": ",
                name, " must be (B=", B, ", Hk, S, D=", D, "), got ", t->sizes());
    TORCH_CHECK(t->stride(3) == 1 && t->stride(2) == D, "parallax.", op, ": ", name,
                " must have contiguous (S, D) planes, got strides ", t->strides());
  }
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "parallax.", op,
              ": k_cache and v_cache shapes differ: ", k_cache.sizes(), " vs ", v_cache.sizes());
  const int64_t Hk = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, "parallax.", op, ": query heads (", Hq,
              ") must be a multiple of KV heads (", Hk, ")");
  TORCH_CHECK(B <= 65535, "parallax.", op, ": batch must be at most 65535, got ", B);
  check_on(context_lens, q, op, "context_lens");
  check_dtype(context_lens, at::kInt, op, "context_lens");
  check_contig(context_lens, op, "context_lens");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == B, "parallax.", op,
              ": context_lens must be (", B, ",), got ", context_lens.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0 &&
                  k_cache.stride(0) % 8 == 0 && k_cache.stride(1) % 8 == 0 &&
                  v_cache.stride(0) % 8 == 0 && v_cache.stride(1) % 8 == 0,
              "parallax.", op, ": q and the caches must be 16-byte aligned");
  c10::DeviceGuard guard(q.device());
  const int splits = parallax_decode_num_splits(B, Hq, Hk, S, q.device().index());
  at::Tensor part_out, part_lse;
  if (splits > 1) {
    part_out = at::empty({B, Hq, splits, D}, q.options().dtype(at::kFloat));
    part_lse = at::empty({B, Hq, splits}, q.options().dtype(at::kFloat));
  }
  check_launch(parallax_decode_attention(
                   out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   context_lens.data_ptr<int>(),
                   splits > 1 ? part_out.data_ptr<float>() : nullptr,
                   splits > 1 ? part_lse.data_ptr<float>() : nullptr, B, Hq, Hk, S, D,
                   k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                   static_cast<float>(scale), splits, code, current_stream(q)),
               op);
}

// out, q: (T, Hq, D); k, v: (T, Hk, D) (q, k, v: head dim contiguous); caches (N, Hk, bs, D)
// contiguous; cos, sin: (T, D/2) float32; slot_mapping (T,) int64; block_tables (B, W),
// context_lens (B,), query_start_loc (B+1,) int32. window 0 / softcap 0: off.
void paged_attention_with_kvcache(at::Tensor out, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
                                  const at::Tensor& cos, const at::Tensor& sin,
                                  const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens,
                                  const at::Tensor& query_start_loc, double scale, int64_t window,
                                  double softcap) {
  const char* op = "paged_attention_with_kvcache";
  check_on(q, q, op, "q");
  int code = PARALLAX_F32;
  if (q.scalar_type() != at::kFloat) code = dtype_code(q, op, "q");
  TORCH_CHECK(q.dim() == 3, "parallax.", op, ": q must be (T, Hq, D), got ", q.sizes());
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(parallax_paged_head_dim_ok(D), "parallax.", op,
              ": head dim must be 64, 96, 128 or 256, got ", D,
              " (other sizes go to parallax.ops.reference)");
  check_like(out, q, op, "out");
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    const char* name = t == &k_cache ? "k_cache" : "v_cache";
    check_on(*t, q, op, name);
    check_dtype(*t, q.scalar_type(), op, name);
    check_contig(*t, op, name);
    TORCH_CHECK(t->dim() == 4 && t->size(3) == D, "parallax.", op, ": ", name,
                " must be (num_blocks, Hk, block_size, D=", D, "), got ", t->sizes());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "parallax.", op, ": ",
                name, " must be 16-byte aligned");
  }
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "parallax.", op,
              ": k_cache and v_cache shapes differ: ", k_cache.sizes(), " vs ", v_cache.sizes());
  const int64_t N = k_cache.size(0), Hk = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(Hk > 0 && Hq % Hk == 0, "parallax.", op, ": query heads (", Hq,
              ") must be a multiple of KV heads (", Hk, ")");
  TORCH_CHECK(bs > 0, "parallax.", op, ": block_size must be positive");
  TORCH_CHECK(q.stride(2) == 1, "parallax.", op, ": q's head dim must be contiguous");
  for (const at::Tensor* t : {&k, &v}) {
    const char* name = t == &k ? "k" : "v";
    check_on(*t, q, op, name);
    check_dtype(*t, q.scalar_type(), op, name);
    TORCH_CHECK(t->dim() == 3 && t->size(0) == T && t->size(1) == Hk && t->size(2) == D,
                "parallax.", op, ": ", name, " must be (T=", T, ", Hk=", Hk, ", D=", D,
                "), got ", t->sizes());
    TORCH_CHECK(t->stride(2) == 1, "parallax.", op, ": ", name,
                "'s head dim must be contiguous");
  }
  for (const at::Tensor* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    check_on(*t, q, op, name);
    check_dtype(*t, at::kFloat, op, name);
    check_contig(*t, op, name);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == T && t->size(1) == D / 2, "parallax.", op, ": ",
                name, " must be (", T, ", ", D / 2, "), got ", t->sizes());
  }
  check_on(slot_mapping, q, op, "slot_mapping");
  check_dtype(slot_mapping, at::kLong, op, "slot_mapping");
  check_contig(slot_mapping, op, "slot_mapping");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == T, "parallax.", op,
              ": slot_mapping must be (", T, ",), got ", slot_mapping.sizes());
  const int64_t B = context_lens.numel();
  TORCH_CHECK(B >= 1 && B <= 65535, "parallax.", op,
              ": the batch must have 1 to 65535 sequences, got ", B);
  for (const at::Tensor* t : {&block_tables, &context_lens, &query_start_loc}) {
    const char* name = t == &block_tables ? "block_tables"
                       : t == &context_lens ? "context_lens" : "query_start_loc";
    check_on(*t, q, op, name);
    check_dtype(*t, at::kInt, op, name);
    check_contig(*t, op, name);
  }
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B, "parallax.", op,
              ": block_tables must be (", B, ", max_blocks), got ", block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1, "parallax.", op, ": context_lens must be 1-D");
  TORCH_CHECK(query_start_loc.dim() == 1 && query_start_loc.size(0) == B + 1, "parallax.", op,
              ": query_start_loc must be (", B + 1, ",), got ", query_start_loc.sizes());
  TORCH_CHECK(window >= 0 && window <= INT32_MAX, "parallax.", op,
              ": window must be >= 0 (0: no window), got ", window);
  TORCH_CHECK(softcap >= 0, "parallax.", op, ": softcap must be >= 0 (0: none), got ", softcap);
  c10::DeviceGuard guard(q.device());
  const int64_t W = block_tables.size(1);
  const int splits = parallax_paged_num_splits(T, B, Hq, Hk, W * bs, q.device().index());
  at::Tensor status = at::empty({B + 1}, q.options().dtype(at::kInt));
  at::Tensor part_out, part_lse;
  if (splits > 1) {
    part_out = at::empty({T, Hq, splits, D}, q.options().dtype(at::kFloat));
    part_lse = at::empty({T, Hq, splits}, q.options().dtype(at::kFloat));
  }
  ParallaxPagedAttention p{};
  p.out = out.data_ptr();
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.block_tables = block_tables.data_ptr<int32_t>();
  p.context_lens = context_lens.data_ptr<int32_t>();
  p.query_start_loc = query_start_loc.data_ptr<int32_t>();
  p.status = status.data_ptr<int32_t>();
  p.part_out = splits > 1 ? part_out.data_ptr<float>() : nullptr;
  p.part_lse = splits > 1 ? part_lse.data_ptr<float>() : nullptr;
  p.num_tokens = T, p.num_seqs = B, p.num_heads = Hq, p.num_kv_heads = Hk, p.head_dim = D;
  p.num_blocks = N, p.block_size = bs, p.max_blocks = W;
  p.q_st = q.stride(0), p.q_sh = q.stride(1);
  p.k_st = k.stride(0), p.k_sh = k.stride(1);
  p.v_st = v.stride(0), p.v_sh = v.stride(1);
  p.scale = static_cast<float>(scale);
  p.window = static_cast<int32_t>(window);
  p.softcap = static_cast<float>(softcap);
  p.num_splits = splits;
  p.dtype = code;
  check_launch(parallax_paged_attention(&p, current_stream(q)), op);
}

// out: (M, N); x: (M, K); qweight: (N, K) int8; scales, bias: (N,), x's dtype.
void int8_linear(at::Tensor out, const at::Tensor& x, const at::Tensor& qweight,
                 const at::Tensor& scales, const std::optional<at::Tensor>& bias) {
  const char* op = "int8_linear";
  check_on(x, x, op, "x");
  const int code = dtype_code(x, op, "x");
  TORCH_CHECK(x.dim() == 2, "parallax.", op, ": x must be 2-D (M, K), got ", x.sizes(),
              " (the Python wrapper flattens leading dims)");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M <= 16, "parallax.", op, ": the CUDA kernel takes at most 16 rows, got ", M,
              " (larger batches dequantize and use a dense matmul)");
  check_contig(x, op, "x");
  check_on(qweight, x, op, "qweight");
  check_dtype(qweight, at::kChar, op, "qweight");
  check_contig(qweight, op, "qweight");
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == K, "parallax.", op,
              ": qweight must be (N, K=", K, "), got ", qweight.sizes());
  const int64_t N = qweight.size(0);
  TORCH_CHECK(K % 16 == 0, "parallax.", op, ": K must be a multiple of 16, got ", K);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0,
              "parallax.", op, ": x and qweight must be 16-byte aligned");
  check_on(scales, x, op, "scales");
  check_dtype(scales, x.scalar_type(), op, "scales");
  check_contig(scales, op, "scales");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N, "parallax.", op,
              ": scales must be (N=", N, ",), got ", scales.sizes());
  if (bias) {
    check_on(*bias, x, op, "bias");
    check_dtype(*bias, x.scalar_type(), op, "bias");
    check_contig(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "parallax.", op,
                ": bias must be (N=", N, ",), got ", bias->sizes());
  }
  check_on(out, x, op, "out");
  check_dtype(out, x.scalar_type(), op, "out");
  check_contig(out, op, "out");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == M && out.size(1) == N, "parallax.", op,
              ": out must be (", M, ", ", N, "), got ", out.sizes());
  c10::DeviceGuard guard(x.device());
  check_launch(parallax_int8_linear(out.data_ptr(), x.data_ptr(),
                                    static_cast<const int8_t*>(qweight.data_ptr()),
                                    scales.data_ptr(), bias ? bias->data_ptr() : nullptr, M, N, K,
                                    code, current_stream(x)),
               op);
}

}  // namespace

TORCH_LIBRARY(parallax, m) {
  m.def("rms_norm(Tensor! out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("add_rms_norm(Tensor! out, Tensor! residual_out, Tensor x, Tensor residual, "
        "Tensor weight, float eps) -> ()");
  m.def("rotary_embedding(Tensor! q, Tensor! k, Tensor cos, Tensor sin) -> ()");
  m.def("decode_attention(Tensor! out, Tensor q, Tensor k_cache, Tensor v_cache, "
        "Tensor context_lens, float scale) -> ()");
  m.def("int8_linear(Tensor! out, Tensor x, Tensor qweight, Tensor scales, Tensor? bias) -> ()");
  m.def("paged_attention_with_kvcache(Tensor! out, Tensor q, Tensor k, Tensor v, "
        "Tensor! k_cache, Tensor! v_cache, Tensor cos, Tensor sin, Tensor slot_mapping, "
        "Tensor block_tables, Tensor context_lens, Tensor query_start_loc, float scale, "
        "int window, float softcap) -> ()");
}

TORCH_LIBRARY_IMPL(parallax, CUDA, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("decode_attention", &decode_attention);
  m.impl("int8_linear", &int8_linear);
  m.impl("paged_attention_with_kvcache", &paged_attention_with_kvcache);
}
