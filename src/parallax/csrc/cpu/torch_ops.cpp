// The CPU kernels as torch ops (namespace parallax_cpu), built just in time by
// torch.utils.cpp_extension (ops/cpu.py: torch_ops()).
//
// The kernels themselves stay plain C, one shared library per instruction-set variant
// (csrc/cpu/*.c built with -mavx512f / -mavx2 / nothing). This shim holds no kernel code:
// `load_variant(isa, path)` dlopens one such library under a name, and every op takes that
// name (`str isa`) and calls the library's entry point through a function table resolved
// once per (library, symbol). So the ISA stays a run-time choice, every variant can be
// loaded side by side (tests run each against the torch twins), and torch sees ordinary
// ops: schemas, fake tensors (registered in Python), torch.compile, torch's thread count.
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace {

struct Library {
    void* handle = nullptr;
    std::unordered_map<std::string, void*> symbols;
};

std::mutex g_mutex;   // guards g_libs; uncontended in the steady state (a few ns a call)
std::unordered_map<std::string, Library> g_libs;

// The entry point `name` of the library loaded as `isa` (an error naming both if absent).
void* symbol(const std::string& isa, const std::string& name) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto lib = g_libs.find(isa);
    TORCH_CHECK(lib != g_libs.end(), "parallax_cpu: no kernel library loaded as '", isa,
                "' (ops/cpu.py loads one per variant before use)");
    auto& syms = lib->second.symbols;
    auto it = syms.find(name);
    if (it != syms.end()) return it->second;
    void* fn = dlsym(lib->second.handle, name.c_str());
    TORCH_CHECK(fn != nullptr, "parallax_cpu: the '", isa, "' kernel library has no ", name);
    syms.emplace(name, fn);
    return fn;
}

template <typename Fn>
Fn entry(const std::string& isa, const char* name) {
    return reinterpret_cast<Fn>(symbol(isa, name));
}

std::string load_variant(const std::string& isa, const std::string& path) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_libs.find(isa);
    if (it == g_libs.end()) {
        void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        TORCH_CHECK(h != nullptr, "parallax_cpu: cannot load ", path, ": ", dlerror());
        it = g_libs.emplace(isa, Library{h, {}}).first;
    }
    auto name = reinterpret_cast<const char* (*)()>(dlsym(it->second.handle, "parallax_cpu_isa"));
    TORCH_CHECK(name != nullptr, "parallax_cpu: ", path, " has no parallax_cpu_isa");
    return name();
}

int threads() { return at::get_num_threads(); }

// Write back and drop every cache line of `t` (x86 clflush, SSE2 so in every x86-64 build),
// so that the next read comes from memory, as a decode step reads each weight: choose()
// times the decode matmuls this way instead of on copies of the weight that would overflow
// the cache (and the process's peak memory). false where there is no such instruction.
bool flush_cache(const at::Tensor& t) {
#if defined(__x86_64__) || defined(_M_X64)
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(),
                "parallax_cpu: flush_cache takes a contiguous CPU tensor");
    const char* p = static_cast<const char*>(t.data_ptr());
    const size_t n = t.numel() * t.element_size();
    for (size_t i = 0; i < n; i += 64) _mm_clflush(p + i);
    if (n > 0) _mm_clflush(p + n - 1);
    _mm_mfence();
    return true;
#else
    (void)t;
    return false;
#endif
}

void check_cpu(const at::Tensor& t, at::ScalarType dtype, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype, "parallax_cpu: ", what,
                " must be a CPU ", c10::toString(dtype), " tensor, got ", t.scalar_type(),
                " on ", t.device());
}

// A row norm's x (..., D) and weight (D,): fp32 CPU, contiguous; returns D.
int64_t check_norm(const at::Tensor& x, const at::Tensor& weight, const char* op) {
    check_cpu(x, at::kFloat, "x");
    check_cpu(weight, at::kFloat, "weight");
    int64_t d = x.size(-1);
    TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.numel() == d,
                "parallax_cpu: ", op, " needs contiguous x (..., D) and weight (D,)");
    return d;
}

// (..., K) -> contiguous (M, K) rows, and the output shape (..., N).
at::Tensor rows_of(const at::Tensor& x, int64_t k, std::vector<int64_t>& out_shape, int64_t n) {
    check_cpu(x, at::kFloat, "x");
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, "parallax_cpu: x has ", x.size(-1),
                " features, the weight ", k);
    out_shape.assign(x.sizes().begin(), x.sizes().end() - 1);
    out_shape.push_back(n);
    return x.reshape({-1, k}).contiguous();
}

at::Tensor finish(at::Tensor y, const std::optional<at::Tensor>& bias,
                  const std::vector<int64_t>& shape) {
    if (bias.has_value()) y.add_(*bias);
    return y.view(shape);
}

using linear_fn = void (*)(const float*, const void*, float*, int, int, int, int);

at::Tensor gemm_packed_f32(const at::Tensor& x, const at::Tensor& packed,
                           const std::optional<at::Tensor>& bias, const std::string& isa) {
    check_cpu(packed, at::kFloat, "packed");
    TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 32 && packed.is_contiguous(),
                "parallax_cpu: packed must be contiguous (N/32, K, 32) panels");
    int64_t n = packed.size(0) * 32, k = packed.size(1);
    std::vector<int64_t> shape;
    at::Tensor rows = rows_of(x, k, shape, n);
    at::Tensor y = at::empty({rows.size(0), n}, rows.options());
    entry<linear_fn>(isa, "parallax_gemm_packed_f32")(
        rows.const_data_ptr<float>(), packed.const_data_ptr(), y.mutable_data_ptr<float>(),
        rows.size(0), n, k, threads());
    return finish(y, bias, shape);
}

at::Tensor int8_linear_f32(const at::Tensor& x, const at::Tensor& qweight,
                           const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                           const std::string& isa) {
    check_cpu(qweight, at::kChar, "qweight");
    check_cpu(scales, at::kFloat, "scales");
    TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && scales.is_contiguous()
                && scales.numel() == qweight.size(0),
                "parallax_cpu: qweight must be a contiguous (N, K) int8 tensor, scales (N,)");
    int64_t n = qweight.size(0), k = qweight.size(1);
    std::vector<int64_t> shape;
    at::Tensor rows = rows_of(x, k, shape, n);
    at::Tensor y = at::empty({rows.size(0), n}, rows.options());
    using fn = void (*)(const float*, const int8_t*, const float*, float*, int, int, int, int);
    entry<fn>(isa, "parallax_int8_linear_f32")(
        rows.const_data_ptr<float>(), qweight.const_data_ptr<int8_t>(),
        scales.const_data_ptr<float>(), y.mutable_data_ptr<float>(), rows.size(0), n, k,
        threads());
    return finish(y, bias, shape);
}

// Any GGUF-style block format `kind`: qweight (N, K / block * block_bytes) uint8 rows of
// blocks; the kernel is parallax_<kind>_linear_<act>(x, w, y, M, N, K, threads), `act`
// "f32" (x as it is; returns nothing), "q8" (x rounded to 8-bit blocks first, integer dot
// products; returns non-zero when it could not allocate those codes) or "ggml" (q8 in
// llama.cpp's order of arithmetic; Q8_0 only).
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& qweight,
                        const std::optional<at::Tensor>& bias, const std::string& kind,
                        int64_t block, int64_t block_bytes, const std::string& isa,
                        const std::string& act) {
    check_cpu(qweight, at::kByte, "qweight");
    TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous()
                && qweight.size(1) % block_bytes == 0,
                "parallax_cpu: qweight must be contiguous (N, blocks * ", block_bytes,
                ") uint8 rows of ", kind, " blocks");
    int64_t n = qweight.size(0), k = qweight.size(1) / block_bytes * block;
    std::vector<int64_t> shape;
    at::Tensor rows = rows_of(x, k, shape, n);
    at::Tensor y = at::empty({rows.size(0), n}, rows.options());
    const std::string name = "parallax_" + kind + "_linear_" + act;
    const float* xp = rows.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    int m = rows.size(0);
    if (act != "f32") {
        using fn = int (*)(const float*, const void*, float*, int, int, int, int);
        int rc = entry<fn>(isa, name.c_str())(xp, qweight.const_data_ptr(), yp, m, n, k,
                                              threads());
        TORCH_CHECK_WITH(OutOfMemoryError, rc == 0, "parallax_cpu: ", kind, " matmul: no ",
                         "memory for ", m, " x ", k, " int8 activations");
    } else {
        entry<linear_fn>(isa, name.c_str())(xp, qweight.const_data_ptr(), yp, m, n, k,
                                            threads());
    }
    return finish(y, bias, shape);
}

at::Tensor block_linear_f32(const at::Tensor& x, const at::Tensor& qweight,
                            const std::optional<at::Tensor>& bias, const std::string& kind,
                            int64_t block, int64_t block_bytes, const std::string& isa) {
    return block_linear(x, qweight, bias, kind, block, block_bytes, isa, "f32");
}

at::Tensor block_linear_q8(const at::Tensor& x, const at::Tensor& qweight,
                           const std::optional<at::Tensor>& bias, const std::string& kind,
                           int64_t block, int64_t block_bytes, const std::string& isa) {
    return block_linear(x, qweight, bias, kind, block, block_bytes, isa, "q8");
}

at::Tensor block_linear_ggml(const at::Tensor& x, const at::Tensor& qweight,
                             const std::optional<at::Tensor>& bias, const std::string& kind,
                             int64_t block, int64_t block_bytes, const std::string& isa) {
    return block_linear(x, qweight, bias, kind, block, block_bytes, isa, "ggml");
}

// x (M, K) -> (codes (M, K) int8, scales, sums) float32: the activation blocks of `kind`
// ("q8_0", "q8_1", "q8_k": ggml's block_q8_0 / _q8_1 / _q8_K) the *_linear_q8 kernels
// make of x, by parallax_quantize_act_f32(x, act, q, d, s, M, K). Scales (M, K / 32), Q8_K
// (M, K / 256); sums (M, K / 32): Q8_0 the code sums, Q8_1 its fp16 s; Q8_K (M, K / 16).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act(const at::Tensor& x,
                                                            const std::string& kind,
                                                            const std::string& isa) {
    static const char* kinds[] = {"q8_0", "q8_1", "q8_k"};
    int act = static_cast<int>(std::find(kinds, kinds + 3, kind) - kinds);
    TORCH_CHECK(act < 3, "parallax_cpu: quantize_act kind must be q8_0, q8_1 or q8_k, not ", kind);
    int64_t block = act == 2 ? 256 : 32, sums = act == 2 ? 16 : 32;
    check_cpu(x, at::kFloat, "x");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % block == 0,
                "parallax_cpu: quantize_act needs contiguous x (M, K), K a multiple of ", block);
    at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
    at::Tensor d = at::empty({x.size(0), x.size(1) / block}, x.options());
    at::Tensor s = at::empty({x.size(0), x.size(1) / sums}, x.options());
    using fn = int (*)(const float*, int, int8_t*, float*, float*, int, int);
    int rc = entry<fn>(isa, "parallax_quantize_act_f32")(
        x.const_data_ptr<float>(), act, q.mutable_data_ptr<int8_t>(), d.mutable_data_ptr<float>(),
        s.mutable_data_ptr<float>(), x.size(0), x.size(1));
    TORCH_CHECK_WITH(OutOfMemoryError, rc == 0, "parallax_cpu: quantize_act: no memory for ",
                     x.size(0), " x ", x.size(1), " int8 activations");
    return {q, d, s};
}

// residual None: (rms_norm(x) * weight, an empty tensor).
std::tuple<at::Tensor, at::Tensor> add_rms_norm_f32(const at::Tensor& x,
                                                    const std::optional<at::Tensor>& residual,
                                                    const at::Tensor& weight, double eps,
                                                    const std::string& isa) {
    int64_t d = check_norm(x, weight, "add_rms_norm");
    at::Tensor out = at::empty_like(x);
    at::Tensor res = residual.has_value() ? at::empty_like(x) : at::empty({0}, x.options());
    if (residual.has_value()) {
        check_cpu(*residual, at::kFloat, "residual");
        TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes(),
                    "parallax_cpu: residual must be contiguous and shaped like x");
    }
    using fn = void (*)(const float*, const float*, const float*, float*, float*, int, int,
                        float);
    entry<fn>(isa, "parallax_add_rms_norm_f32")(
        x.const_data_ptr<float>(),
        residual.has_value() ? residual->const_data_ptr<float>() : nullptr,
        weight.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
        residual.has_value() ? res.mutable_data_ptr<float>() : nullptr, x.numel() / d, d,
        static_cast<float>(eps));
    return {out, res};
}

// x (..., 2N) = [gate | up] -> (..., N) by the kernel parallax_<op>_f32(x, out, rows, N).
at::Tensor gate_and_mul(const at::Tensor& x, const std::string& isa, const std::string& op) {
    check_cpu(x, at::kFloat, "x");
    TORCH_CHECK(x.is_contiguous() && x.size(-1) % 2 == 0,
                "parallax_cpu: ", op, " needs contiguous x (..., 2N)");
    int64_t n = x.size(-1) / 2;
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
    shape.push_back(n);
    at::Tensor out = at::empty(shape, x.options());
    using fn = void (*)(const float*, float*, int, int);
    const std::string name = "parallax_" + op + "_f32";
    entry<fn>(isa, name.c_str())(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                                 x.numel() / (2 * n), n);
    return out;
}

at::Tensor silu_and_mul_f32(const at::Tensor& x, const std::string& isa) {
    return gate_and_mul(x, isa, "silu_and_mul");
}

// llama.cpp's CPU arithmetic (PARALLAX_NUMERICS=ggml; csrc/cpu/ggml_pointwise.c,
// ggml_attention.c): RMS_NORM then MUL by weight, x (..., D) -> (..., D).
at::Tensor ggml_rms_norm_f32(const at::Tensor& x, const at::Tensor& weight, double eps,
                             const std::string& isa) {
    int64_t d = check_norm(x, weight, "ggml_rms_norm");
    at::Tensor out = at::empty_like(x);
    using fn = void (*)(const float*, const float*, float*, int, int, float);
    entry<fn>(isa, "parallax_ggml_rms_norm_f32")(x.const_data_ptr<float>(),
                                                 weight.const_data_ptr<float>(),
                                                 out.mutable_data_ptr<float>(), x.numel() / d, d,
                                                 static_cast<float>(eps));
    return out;
}

// SWIGLU of x (..., 2N) = [gate | up] -> (..., N).
at::Tensor ggml_swiglu_f32(const at::Tensor& x, const std::string& isa) {
    return gate_and_mul(x, isa, "ggml_swiglu");
}

// ROPE of x (T, H, D) at positions (T,) int32 -> a new (T, H, D); neox: pairs (i, i + D/2).
at::Tensor ggml_rope_f32(const at::Tensor& x, const at::Tensor& positions, double freq_base,
                         bool neox, const std::string& isa) {
    check_cpu(x, at::kFloat, "x");
    check_cpu(positions, at::kInt, "positions");
    TORCH_CHECK(x.dim() == 3 && positions.dim() == 1 && positions.size(0) == x.size(0)
                && x.size(2) % 2 == 0 && positions.is_contiguous(),
                "parallax_cpu: ggml_rope needs x (T, H, D), D even, and positions (T,)");
    at::Tensor out = x.contiguous().clone();
    using fn = void (*)(float*, const int32_t*, int, int, int, float, int);
    entry<fn>(isa, "parallax_ggml_rope_f32")(out.mutable_data_ptr<float>(),
                                             positions.const_data_ptr<int32_t>(), x.size(0),
                                             x.size(1), x.size(2),
                                             static_cast<float>(freq_base), neox ? 1 : 0);
    return out;
}

// One sequence's attention over an fp16-valued cache: q (T, Hq, D), k, v (S, Hk, D) ->
// (T, Hq, D); positions (T,) int32; step_rows: the query rows of llama.cpp's call; n_kv,
// n_threads: its padded KV length and thread count (its split-KV decode; n_kv 0: none).
at::Tensor ggml_attention_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& positions, double scale, int64_t step_rows,
                              int64_t n_kv, int64_t n_threads, const std::string& isa) {
    for (auto* t : {&q, &k, &v}) check_cpu(*t, at::kFloat, "q, k, v");
    check_cpu(positions, at::kInt, "positions");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && q.is_contiguous()
                && k.is_contiguous() && v.is_contiguous() && q.size(2) == k.size(2)
                && k.size(1) > 0 && q.size(1) % k.size(1) == 0
                && positions.size(0) == q.size(0) && positions.is_contiguous(),
                "parallax_cpu: ggml_attention needs contiguous q (T, Hq, D), k, v (S, Hk, D) "
                "with Hk dividing Hq, and positions (T,)");
    at::Tensor out = at::empty_like(q);
    using fn = int (*)(const float*, const float*, const float*, float*, const int32_t*, int,
                       int, int, int, int, float, int, int, int);
    int rc = entry<fn>(isa, "parallax_ggml_attention_kv_f32")(
        q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(),
        out.mutable_data_ptr<float>(), positions.const_data_ptr<int32_t>(), q.size(0),
        k.size(0), q.size(1), k.size(1), q.size(2), static_cast<float>(scale),
        static_cast<int>(step_rows), static_cast<int>(n_kv), static_cast<int>(n_threads));
    TORCH_CHECK(rc == 0, "parallax_cpu: ggml_attention: head dim ", q.size(2), " (1..1024), ",
                "n_kv ", n_kv, " (0 or >= ", k.size(0), "), threads ", n_threads,
                " (>= 1), or out of memory");
    return out;
}

// (M,) int64: the first index of each row's largest value of x (M, N), as torch.argmax.
at::Tensor argmax_rows_f32(const at::Tensor& x, const std::string& isa) {
    check_cpu(x, at::kFloat, "x");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) >= 1,
                "parallax_cpu: argmax_rows needs contiguous x (M, N) with N >= 1");
    at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
    using fn = void (*)(const float*, int64_t*, int, int, int);
    entry<fn>(isa, "parallax_argmax_rows_f32")(x.const_data_ptr<float>(),
                                               out.mutable_data_ptr<int64_t>(), x.size(0),
                                               x.size(1), threads());
    return out;
}

// The attention kernels refuse bad metadata with a code (writing nothing); it travels up as
// a ValueError "parallax_cpu error <code>" that ops/cpu.py turns into KernelInputError.
at::Tensor decode_attention_kv_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   at::Tensor& k_cache, at::Tensor& v_cache,
                                   const at::Tensor& cos, const at::Tensor& sin,
                                   const at::Tensor& context_lens, double scale,
                                   const std::string& isa) {
    int64_t b = q.size(0), hq = q.size(1), d = q.size(2);
    at::Tensor out = at::empty({b, hq, d}, q.options());
    using fn = int (*)(const float*, long, const float*, long, const float*, long, const float*,
                       const float*, float*, float*, long, long, int, const int32_t*, float*,
                       int, int, int, int, float, int);
    int bad = entry<fn>(isa, "parallax_decode_attention_kv_f32")(
        q.const_data_ptr<float>(), q.stride(0), k.const_data_ptr<float>(), k.stride(0),
        v.const_data_ptr<float>(), v.stride(0), cos.const_data_ptr<float>(),
        sin.const_data_ptr<float>(), k_cache.mutable_data_ptr<float>(),
        v_cache.mutable_data_ptr<float>(), k_cache.stride(0), k_cache.stride(1),
        k_cache.size(2), context_lens.const_data_ptr<int32_t>(), out.mutable_data_ptr<float>(),
        b, hq, k.size(1), d, static_cast<float>(scale), threads());
    TORCH_CHECK_VALUE(bad == 0, "parallax_cpu error ", bad);
    return out;
}

at::Tensor paged_attention_kv_f32(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cos,
                                  const at::Tensor& sin, const at::Tensor& slot_mapping,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  const at::Tensor& query_start_loc, double scale,
                                  int64_t window, double softcap, const std::string& isa) {
    int64_t t = q.size(0), hq = q.size(1), d = q.size(2);
    at::Tensor out = at::empty({t, hq, d}, q.options());
    using fn = int (*)(const float*, long, const float*, long, const float*, long, const float*,
                       const float*, float*, float*, const int64_t*, const int32_t*, int,
                       const int32_t*, const int32_t*, float*, int, int, int, int, int, int,
                       int, float, int, float, int);
    int err = entry<fn>(isa, "parallax_paged_attention_kv_f32")(
        q.const_data_ptr<float>(), q.stride(0), k.const_data_ptr<float>(), k.stride(0),
        v.const_data_ptr<float>(), v.stride(0), cos.const_data_ptr<float>(),
        sin.const_data_ptr<float>(), k_cache.mutable_data_ptr<float>(),
        v_cache.mutable_data_ptr<float>(), slot_mapping.const_data_ptr<int64_t>(),
        block_tables.const_data_ptr<int32_t>(), block_tables.size(1),
        context_lens.const_data_ptr<int32_t>(), query_start_loc.const_data_ptr<int32_t>(),
        out.mutable_data_ptr<float>(), t, context_lens.size(0), hq, k.size(1), d,
        k_cache.size(0), k_cache.size(2), static_cast<float>(scale), static_cast<int>(window),
        static_cast<float>(softcap), threads());
    TORCH_CHECK_VALUE(err == 0, "parallax_cpu error ", err);
    return out;
}

// ---- The halves of a Llama decoder layer (csrc/cpu/layer_f32.c), one op each.

struct WeightKind {
    const char* name;   // as ops/cpu.py's choose() names the weight kind
    int code;           // layer_f32.c's LINEAR_*
    int block, block_bytes;   // 0, 0: packed fp32 panels
};
const WeightKind kWeightKinds[] = {
    {"f32", 0, 0, 0},         {"q8_0", 1, 32, 34},      {"q4_0", 2, 32, 18},
    {"q8_0*q8", 3, 32, 34},   {"q4_0*q8", 4, 32, 18},   {"q4_1*q8", 5, 32, 20},
    {"q4_k*q8", 6, 256, 144}, {"q6_k*q8", 7, 256, 210},
};

// The layer_f32.c code of weight kind `kind` after checking that `w` is an (n, k) weight of
// that kind (packed panels (n/32, k, 32) float, or (n, k/block * bytes) uint8 blocks).
int weight_code(const at::Tensor& w, const std::string& kind, int64_t n, int64_t k,
                const char* what) {
    for (const auto& wk : kWeightKinds) {
        if (kind != wk.name) continue;
        if (wk.block == 0) {
            check_cpu(w, at::kFloat, what);
            TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && w.size(0) * 32 == n
                        && w.size(1) == k && w.size(2) == 32,
                        "parallax_cpu: ", what, " must be contiguous (", n / 32, ", ", k,
                        ", 32) panels, got ", w.sizes());
        } else {
            check_cpu(w, at::kByte, what);
            TORCH_CHECK(k % wk.block == 0 && w.dim() == 2 && w.is_contiguous()
                        && w.size(0) == n && w.size(1) == k / wk.block * wk.block_bytes,
                        "parallax_cpu: ", what, " must be contiguous (", n, ", ",
                        k / wk.block * wk.block_bytes, ") uint8 ", kind, " blocks, got ",
                        w.sizes());
        }
        return wk.code;
    }
    TORCH_CHECK(false, "parallax_cpu: no fused matmul for weight kind '", kind, "'");
}

void check_rows(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                const at::Tensor& norm_weight) {
    check_cpu(x, at::kFloat, "x");
    check_cpu(norm_weight, at::kFloat, "norm_weight");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && norm_weight.is_contiguous()
                && norm_weight.numel() == x.size(1),
                "parallax_cpu: a fused layer half needs contiguous x (T, H) and norm_weight (H,)");
    if (residual.has_value()) {
        check_cpu(*residual, at::kFloat, "residual");
        TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes(),
                    "parallax_cpu: residual must be contiguous and shaped like x");
    }
}

// Codes of layer_f32.c that are not the paged kernel's metadata codes.
void check_layer_rc(int rc, int64_t t, int64_t k) {
    TORCH_CHECK_WITH(OutOfMemoryError, rc != -100, "parallax_cpu: fused layer: no memory for ",
                     t, " x ", k, " int8 activations");
    TORCH_CHECK(rc != -101, "parallax_cpu: fused layer: unknown weight kind");
    TORCH_CHECK_VALUE(rc == 0, "parallax_cpu error ", rc);
}

// (out (T, H), residual_out (T, H)); see layer_f32.c. Metadata errors as paged_attention_kv_f32.
std::tuple<at::Tensor, at::Tensor> attention_half_f32(
        const at::Tensor& x, const std::optional<at::Tensor>& residual,
        const at::Tensor& norm_weight, double eps, const at::Tensor& w_qkv,
        const std::string& qkv_kind, const std::optional<at::Tensor>& b_qkv,
        const at::Tensor& w_o, const std::string& o_kind, at::Tensor& k_cache,
        at::Tensor& v_cache, const at::Tensor& cos, const at::Tensor& sin,
        const at::Tensor& slot_mapping, const at::Tensor& block_tables,
        const at::Tensor& context_lens, const at::Tensor& query_start_loc, int64_t num_heads,
        int64_t num_kv_heads, double scale, int64_t window, double softcap,
        const std::string& isa) {
    check_rows(x, residual, norm_weight);
    int64_t t = x.size(0), h = x.size(1), d = k_cache.size(-1);
    int64_t n_qkv = (num_heads + 2 * num_kv_heads) * d;
    int qkv_code = weight_code(w_qkv, qkv_kind, n_qkv, h, "w_qkv");
    int o_code = weight_code(w_o, o_kind, h, num_heads * d, "w_o");
    if (b_qkv.has_value()) {
        check_cpu(*b_qkv, at::kFloat, "b_qkv");
        TORCH_CHECK(b_qkv->is_contiguous() && b_qkv->numel() == n_qkv,
                    "parallax_cpu: b_qkv must be contiguous (", n_qkv, ",)");
    }
    for (const at::Tensor* c : {&k_cache, &v_cache}) check_cpu(*c, at::kFloat, "the KV cache");
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous()
                && k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == num_kv_heads,
                "parallax_cpu: k_cache, v_cache must be contiguous (blocks, ", num_kv_heads,
                ", block_size, D)");
    check_cpu(cos, at::kFloat, "cos");
    check_cpu(sin, at::kFloat, "sin");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == t * (d / 2)
                && sin.numel() == t * (d / 2), "parallax_cpu: cos, sin must be contiguous (T, D/2)");
    check_cpu(slot_mapping, at::kLong, "slot_mapping");
    for (const at::Tensor* m : {&block_tables, &context_lens, &query_start_loc})
        check_cpu(*m, at::kInt, "block_tables, context_lens and query_start_loc");
    TORCH_CHECK(slot_mapping.is_contiguous() && slot_mapping.numel() == t
                && block_tables.dim() == 2 && block_tables.is_contiguous()
                && context_lens.is_contiguous() && query_start_loc.is_contiguous()
                && context_lens.numel() == block_tables.size(0)
                && query_start_loc.numel() == context_lens.numel() + 1,
                "parallax_cpu: attention metadata shapes do not match (T = ", t, ")");
    at::Tensor out = at::empty({t, h}, x.options());
    at::Tensor res = at::empty({t, h}, x.options());
    // One scratch allocation: h (T, H) | qkv (T, n_qkv) | attn (T, Hq D).
    at::Tensor scratch = at::empty({t * (h + n_qkv + num_heads * d)}, x.options());
    float* sp = scratch.mutable_data_ptr<float>();
    using fn = int (*)(const float*, const float*, const float*, float, int, const void*,
                       const float*, int, const void*, float*, float*, const float*,
                       const float*, const int64_t*, const int32_t*, int, const int32_t*,
                       const int32_t*, float*, float*, float*, float*, float*, int, int, int,
                       int, int, int, int, int, float, int, float, int);
    int rc = entry<fn>(isa, "parallax_attention_half_f32")(
        x.const_data_ptr<float>(), residual.has_value() ? residual->const_data_ptr<float>() : nullptr,
        norm_weight.const_data_ptr<float>(), static_cast<float>(eps), qkv_code,
        w_qkv.const_data_ptr(), b_qkv.has_value() ? b_qkv->const_data_ptr<float>() : nullptr,
        o_code, w_o.const_data_ptr(), k_cache.mutable_data_ptr<float>(),
        v_cache.mutable_data_ptr<float>(), cos.const_data_ptr<float>(),
        sin.const_data_ptr<float>(), slot_mapping.const_data_ptr<int64_t>(),
        block_tables.const_data_ptr<int32_t>(), block_tables.size(1),
        context_lens.const_data_ptr<int32_t>(), query_start_loc.const_data_ptr<int32_t>(), sp,
        sp + t * h, sp + t * (h + n_qkv), out.mutable_data_ptr<float>(),
        res.mutable_data_ptr<float>(), t, context_lens.size(0), h, num_heads, num_kv_heads, d,
        k_cache.size(0), k_cache.size(2), static_cast<float>(scale), static_cast<int>(window),
        static_cast<float>(softcap), threads());
    check_layer_rc(rc, t, h);
    return {out, res};
}

// (out (T, H), residual_out (T, H)); see layer_f32.c.
std::tuple<at::Tensor, at::Tensor> mlp_half_f32(
        const at::Tensor& x, const std::optional<at::Tensor>& residual,
        const at::Tensor& norm_weight, double eps, const at::Tensor& w_gate_up,
        const std::string& gate_up_kind, const at::Tensor& w_down,
        const std::string& down_kind, int64_t intermediate, const std::string& isa) {
    check_rows(x, residual, norm_weight);
    int64_t t = x.size(0), h = x.size(1), f = intermediate;
    int gu_code = weight_code(w_gate_up, gate_up_kind, 2 * f, h, "w_gate_up");
    int down_code = weight_code(w_down, down_kind, h, f, "w_down");
    at::Tensor out = at::empty({t, h}, x.options());
    at::Tensor res = at::empty({t, h}, x.options());
    // h (T, H) | gate_up (T, 2F) | act (T, F)
    at::Tensor scratch = at::empty({t * (h + 3 * f)}, x.options());
    float* sp = scratch.mutable_data_ptr<float>();
    using fn = int (*)(const float*, const float*, const float*, float, int, const void*, int,
                       const void*, float*, float*, float*, float*, float*, int, int, int, int);
    int rc = entry<fn>(isa, "parallax_mlp_half_f32")(
        x.const_data_ptr<float>(), residual.has_value() ? residual->const_data_ptr<float>() : nullptr,
        norm_weight.const_data_ptr<float>(), static_cast<float>(eps), gu_code,
        w_gate_up.const_data_ptr(), down_code, w_down.const_data_ptr(), sp, sp + t * h,
        sp + t * (h + 2 * f), out.mutable_data_ptr<float>(), res.mutable_data_ptr<float>(), t,
        h, f, threads());
    check_layer_rc(rc, t, std::max(h, f));
    return {out, res};
}

}  // namespace

TORCH_LIBRARY(parallax_cpu, m) {
    m.def("load_variant(str isa, str path) -> str", &load_variant);
    m.def("flush_cache(Tensor t) -> bool", &flush_cache);
    m.def("gemm_packed_f32(Tensor x, Tensor packed, Tensor? bias, str isa) -> Tensor");
    m.def("int8_linear_f32(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, str isa)"
          " -> Tensor");
    m.def("block_linear_f32(Tensor x, Tensor qweight, Tensor? bias, str kind, int block, "
          "int block_bytes, str isa) -> Tensor");
    m.def("block_linear_q8(Tensor x, Tensor qweight, Tensor? bias, str kind, int block, "
          "int block_bytes, str isa) -> Tensor");
    m.def("block_linear_ggml(Tensor x, Tensor qweight, Tensor? bias, str kind, int block, "
          "int block_bytes, str isa) -> Tensor");
    m.def("quantize_act(Tensor x, str kind, str isa) -> (Tensor, Tensor, Tensor)");
    m.def("add_rms_norm_f32(Tensor x, Tensor? residual, Tensor weight, float eps, str isa)"
          " -> (Tensor, Tensor)");
    m.def("silu_and_mul_f32(Tensor x, str isa) -> Tensor");
    m.def("argmax_rows_f32(Tensor x, str isa) -> Tensor");
    m.def("ggml_rms_norm_f32(Tensor x, Tensor weight, float eps, str isa) -> Tensor");
    m.def("ggml_swiglu_f32(Tensor x, str isa) -> Tensor");
    m.def("ggml_rope_f32(Tensor x, Tensor positions, float freq_base, bool neox, str isa)"
          " -> Tensor");
    m.def("ggml_attention_f32(Tensor q, Tensor k, Tensor v, Tensor positions, float scale, "
          "int step_rows, int n_kv, int n_threads, str isa) -> Tensor");
    m.def("decode_attention_kv_f32(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, "
          "Tensor(b!) v_cache, Tensor cos, Tensor sin, Tensor context_lens, float scale, "
          "str isa) -> Tensor");
    m.def("paged_attention_kv_f32(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, "
          "Tensor(b!) v_cache, Tensor cos, Tensor sin, Tensor slot_mapping, "
          "Tensor block_tables, Tensor context_lens, Tensor query_start_loc, float scale, "
          "int window, float softcap, str isa) -> Tensor");
    m.def("attention_half_f32(Tensor x, Tensor? residual, Tensor norm_weight, float eps, "
          "Tensor w_qkv, str qkv_kind, Tensor? b_qkv, Tensor w_o, str o_kind, "
          "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cos, Tensor sin, "
          "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, "
          "Tensor query_start_loc, int num_heads, int num_kv_heads, float scale, int window, "
          "float softcap, str isa) -> (Tensor, Tensor)");
    m.def("mlp_half_f32(Tensor x, Tensor? residual, Tensor norm_weight, float eps, "
          "Tensor w_gate_up, str gate_up_kind, Tensor w_down, str down_kind, int intermediate, "
          "str isa) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(parallax_cpu, CPU, m) {
    m.impl("gemm_packed_f32", &gemm_packed_f32);
    m.impl("int8_linear_f32", &int8_linear_f32);
    m.impl("block_linear_f32", &block_linear_f32);
    m.impl("block_linear_q8", &block_linear_q8);
    m.impl("block_linear_ggml", &block_linear_ggml);
    m.impl("quantize_act", &quantize_act);
    m.impl("add_rms_norm_f32", &add_rms_norm_f32);
    m.impl("silu_and_mul_f32", &silu_and_mul_f32);
    m.impl("argmax_rows_f32", &argmax_rows_f32);
    m.impl("ggml_rms_norm_f32", &ggml_rms_norm_f32);
    m.impl("ggml_swiglu_f32", &ggml_swiglu_f32);
    m.impl("ggml_rope_f32", &ggml_rope_f32);
    m.impl("ggml_attention_f32", &ggml_attention_f32);
    m.impl("decode_attention_kv_f32", &decode_attention_kv_f32);
    m.impl("paged_attention_kv_f32", &paged_attention_kv_f32);
    m.impl("attention_half_f32", &attention_half_f32);
    m.impl("mlp_half_f32", &mlp_half_f32);
}
