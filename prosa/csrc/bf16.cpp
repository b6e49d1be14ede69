// y = x @ W^T + b with W in bfloat16 (N, K) and few rows of x: the decode step of a quantize="bf16" model on a CPU.
//
// Decoding reads every weight once per step, so a bf16 weight costs half the bytes of a float32 one. PyTorch's bf16
// GEMV (oneDNN brg_matmul) did not turn that into speed on an Intel Xeon VM with AVX-512 BF16 but no AMX: decoding
// in bf16 ran at 0.60x float32 (bench/regimes.py). This kernel streams W once: a bf16 value is the top half of a
// float32, so 32 weights (one 64-byte load) become two float32 vectors with one shift and one mask (the even and
// the odd elements), multiplied by x's even and odd elements (split once per call) and summed in float32. Every
// product of two bf16 numbers is exact in float32, so the result is the float32 sum of exact products: what
// oneDNN's bf16 matmul computes (float32 accumulation), up to summation order. Only AVX-512F is needed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PROSA_BF16_X86 1
#define TGT_BF16 __attribute__((target("avx512f")))
#else
#define PROSA_BF16_X86 0
#endif

namespace {

constexpr int RB = 4;   // weight rows per pass: RB x MB accumulators
constexpr int MB = 4;   // rows of x per pass

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Bf16Args {
  const uint16_t* w;      // (N, K) bf16 bits
  const float* x;         // (M, K) float32
  const float* xs;        // (M, K) x split per 32: 16 even elements, then 16 odd ones (vector path)
  const float* bias;      // (N,) or nullptr
  float* out;             // (M, N)
  int64_t M, N, K;
};

// rows [r0, r1) of the output, every row of x, portable C++ (and the tail of K in the vector path)
void rows_scalar(const Bf16Args& a, int64_t r0, int64_t r1, int64_t k0) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f;
      for (int64_t k = k0; k < a.K; ++k) acc += bf16_to_float(a.w[r * a.K + k]) * a.x[m * a.K + k];
      a.out[m * a.N + r] += acc;
    }
}

#if PROSA_BF16_X86
// rows [r0, r0 + R) against rows [m0, m0 + MBn) of x over the first K32 = K / 32 * 32 columns; adds into out
template <int R, int MBn>
TGT_BF16 void block_avx512(const Bf16Args& a, int64_t r0, int64_t m0, int64_t K32) {
  __m512 acc[R][MBn];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < MBn; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t k = 0; k < K32; k += 32) {
    __m512 xe[MBn], xo[MBn];
    for (int j = 0; j < MBn; ++j) {
      xe[j] = _mm512_loadu_ps(a.xs + (m0 + j) * a.K + k);
      xo[j] = _mm512_loadu_ps(a.xs + (m0 + j) * a.K + k + 16);
    }
    for (int i = 0; i < R; ++i) {
      const __m512i v = _mm512_loadu_si512(a.w + (r0 + i) * a.K + k);   // 32 bf16: element 2e low, 2e+1 high half
      const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
      for (int j = 0; j < MBn; ++j) {
        acc[i][j] = _mm512_fmadd_ps(we, xe[j], acc[i][j]);
        acc[i][j] = _mm512_fmadd_ps(wo, xo[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < MBn; ++j) a.out[(m0 + j) * a.N + r0 + i] += _mm512_reduce_add_ps(acc[i][j]);
}

template <int R>
TGT_BF16 void rows_avx512_m(const Bf16Args& a, int64_t r0, int64_t K32) {
  int64_t m = 0;
  for (; m + MB <= a.M; m += MB) block_avx512<R, MB>(a, r0, m, K32);
  switch (a.M - m) {
    case 3: block_avx512<R, 3>(a, r0, m, K32); break;
    case 2: block_avx512<R, 2>(a, r0, m, K32); break;
    case 1: block_avx512<R, 1>(a, r0, m, K32); break;
    default: break;
  }
}

TGT_BF16 void rows_avx512(const Bf16Args& a, int64_t r0, int64_t r1) {
  const int64_t K32 = a.K / 32 * 32;
  int64_t r = r0;
  for (; r + RB <= r1; r += RB) rows_avx512_m<RB>(a, r, K32);
  for (; r < r1; ++r) rows_avx512_m<1>(a, r, K32);
  if (K32 < a.K) rows_scalar(a, r0, r1, K32);
}
#endif

bool avx512f() {
#if PROSA_BF16_X86
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

}  // namespace

bool g_bf16_force_scalar = false;   // tests: the portable path where AVX-512 is available

// x (M, K) float32 or bfloat16, w (N, K) bfloat16 contiguous, bias (N,) or None -> (M, N) in x's dtype
torch::Tensor linear_bf16(const torch::Tensor& x_in, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.device().is_cpu(),
              "linear_bf16: w must be a contiguous CPU bfloat16 (N, K) tensor");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == w.size(1), "linear_bf16: x must be (M, K) with K = ", w.size(1));
  const int64_t M = x_in.size(0), N = w.size(0), K = w.size(1);
  const torch::Tensor x = x_in.to(torch::kFloat32).contiguous();
  torch::Tensor out = torch::zeros({M, N}, x.options());
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(b.numel() == N, "linear_bf16: bias must have ", N, " values");
  }
  if (M > 0 && N > 0) {
    const float* xp = x.data_ptr<float>();
    const bool avx = avx512f() && !g_bf16_force_scalar;
    std::vector<float> xs;
    if (avx) {   // per 32 columns: the 16 even elements, then the 16 odd ones (the order the weights unpack in)
      xs.resize(M * K);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k + 32 <= K; k += 32)
          for (int e = 0; e < 16; ++e) {
            xs[m * K + k + e] = xp[m * K + k + 2 * e];
            xs[m * K + k + 16 + e] = xp[m * K + k + 2 * e + 1];
          }
    }
    Bf16Args a{reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), xp, xs.data(), nullptr,
               out.data_ptr<float>(), M, N, K};
    // at least ~16 KB of weights per task (a small layer does not wake threads it cannot feed), whole RB-row groups
    const int64_t grain = std::max<int64_t>(RB, (16384 / (2 * K) + RB - 1) / RB * RB);
    auto run = [&](int64_t r0, int64_t r1) {
#if PROSA_BF16_X86
      if (avx) { rows_avx512(a, r0, r1); return; }
#endif
      rows_scalar(a, r0, r1, 0);
    };
    if (N <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
      run(0, N);
    } else {
      const int64_t groups = (N + RB - 1) / RB, ggrain = grain / RB;
      at::parallel_for(0, groups, ggrain, [&](int64_t g0, int64_t g1) { run(g0 * RB, std::min(N, g1 * RB)); });
    }
  }
  if (b.defined()) out.add_(b);
  return out.scalar_type() == x_in.scalar_type() ? out : out.to(x_in.scalar_type());
}

void bf16_force_scalar(bool on) { g_bf16_force_scalar = on; }
