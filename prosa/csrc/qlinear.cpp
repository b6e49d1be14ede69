// prosa quantized linear kernels (CPU): y = x @ W^T (+ bias) with W stored as group-wise int8 or int4.
//
// Weight layout ("row-interleaved", made by prosa/quant.py `_pack_int8` / `_pack_int4`): output rows are taken
// 16 at a time (a tile; N is padded to a multiple of 16 with zero rows). Within a tile, K is walked in chunks:
//   int8: chunk = 4 k  -> 64 bytes: byte [r*4 + j] = W[row r, k + j] + 128   (stored unsigned)
//   int4: chunk = 8 k  -> 64 bytes: byte [r*4 + j] = Q[row r, k + j] | Q[row r, k + 4 + j] << 4   (Q in 0..15)
// so one 512-bit load holds a 16-row x 4-k block and VPDPBUSD (u8 x s8 -> s32, 4 products per lane) makes one
// lane per output row: no horizontal reductions anywhere. Scales (and int4 mins) are fp16, [tile][K/G][16].
//   int8: W = d * (stored - 128), or with mins (asymmetric int8) W = d * stored + m          int4: W = d * Q + m
// Activations are quantized on the fly to int8 in blocks of 32 along K (like llama.cpp's Q8_0 / Q8_1): x ~= dx * xq.
// The result is the exact dot product of the dequantized weight with the block-quantized activation, accumulated
// in int32 per block and float32 across blocks.
//
// Code paths: AVX-512 VNNI (chosen at run time with __builtin_cpu_supports; the file is compiled without -march so
// the module loads on any x86-64) and a portable scalar path computing the same quantities.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PROSA_X86 1
#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#else
#define PROSA_X86 0
#endif

namespace {

constexpr int TILE = 16;   // output rows per tile
constexpr int XB = 32;     // activation quantization block along K

// ------------------------------------------------------------------------------------------ fp16 helpers (scalar)
inline float half_to_float(uint16_t h) {
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// ------------------------------------------------------------------------------------- activation quantization
// x (M, K) float -> xq (M, K) int8, dx (M, K/32) scale, isum (M, K/32) sum of xq, gsum (M, K/G) sum of dx*isum
// over each weight group.
struct QuantX {
  std::vector<int8_t> xq;
  std::vector<float> dx, gsum;
  std::vector<int32_t> isum;
};

void quantize_rows_scalar(const float* x, int64_t K, int8_t* xq, float* dx, int32_t* isum) {
  for (int64_t b = 0; b < K / XB; ++b) {
    const float* xb = x + b * XB;
    float amax = 0.f;
    for (int j = 0; j < XB; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float d = amax / 127.f;
    const float id = d > 0.f ? 1.f / d : 0.f;
    int32_t s = 0;
    for (int j = 0; j < XB; ++j) {
      const int v = static_cast<int>(std::nearbyint(xb[j] * id));
      xq[b * XB + j] = static_cast<int8_t>(v);
      s += v;
    }
    dx[b] = d;
    isum[b] = s;
  }
}

#if PROSA_X86
TGT void quantize_rows_avx512(const float* x, int64_t K, int8_t* xq, float* dx, int32_t* isum) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t b = 0; b < K / XB; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + b * XB), v1 = _mm512_loadu_ps(x + b * XB + 16);
    const __m512 a = _mm512_max_ps(_mm512_and_ps(v0, absmask), _mm512_and_ps(v1, absmask));
    const float amax = _mm512_reduce_max_ps(a);
    const float d = amax / 127.f;
    const float id = d > 0.f ? 1.f / d : 0.f;
    const __m512 vid = _mm512_set1_ps(id);
    // round to nearest even, like std::nearbyint in the scalar path
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + b * XB), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + b * XB + 16), _mm512_cvtepi32_epi8(q1));
    dx[b] = d;
    isum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  }
}
#endif

bool use_avx512() {
#if PROSA_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

bool g_force_scalar = false;

void quantize_x(const float* x, int64_t M, int64_t K, int64_t G, bool avx512, QuantX& q) {
  const int64_t nb = K / XB, ng = K / G, bpg = G / XB;
  q.xq.resize(M * K);
  q.dx.resize(M * nb);
  q.isum.resize(M * nb);
  q.gsum.resize(M * ng);
  const auto rows = [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
#if PROSA_X86
      if (avx512)
        quantize_rows_avx512(x + m * K, K, q.xq.data() + m * K, q.dx.data() + m * nb, q.isum.data() + m * nb);
      else
#endif
        quantize_rows_scalar(x + m * K, K, q.xq.data() + m * K, q.dx.data() + m * nb, q.isum.data() + m * nb);
      for (int64_t g = 0; g < ng; ++g) {
        float s = 0.f;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) s += q.dx[m * nb + b] * static_cast<float>(q.isum[m * nb + b]);
        q.gsum[m * ng + g] = s;
      }
    }
  };
  if (M < 16) rows(0, M); else at::parallel_for(0, M, 4, rows);
}

// ------------------------------------------------------------------------------------------------- kernels
// One tile (16 rows) x MB activation rows. `w` points at the tile's packed bytes, `d`/`mn` at its [K/G][16] fp16
// scales/mins. Writes out[i * ldo + r] for r < valid.
struct Args {
  const uint8_t* w;
  const uint16_t* d;
  const uint16_t* mn;     // int4 only
  const int8_t* xq;       // (M, K)
  const float* dx;        // (M, K/32)
  const int32_t* isum;    // (M, K/32)
  const float* gsum;      // (M, K/G)
  const float* bias;      // (Npad) or null
  float* out;
  int64_t K, G, ldo;
};

#if PROSA_X86
// Software prefetch of the weight stream, this many bytes ahead of the chunk being read. At one token per step every
// kernel below streams its weights from DRAM once; the hardware prefetchers alone left the TinyLlama-1.1B-shaped
// Q4_0 linears at ~22 GB/s on 2 EPYC cores (29.7 ms per pass over its 647 MB), 4-8 KB ahead gave ~29 GB/s (21-22
// ms; 2 KB: 21.9 ms; torch.sum reads ~40 GB/s there). A prefetch past the end of a buffer never faults.
constexpr int64_t PF_DIST = 4096;
// MB activation rows x NT consecutive tiles (16 output rows each). Each 64-byte weight chunk is unpacked once and
// used for MB rows; each broadcast activation word is used for NT tiles. NACC independent int32 accumulators per
// (row, tile): VPDPBUSD has ~5 cycles of latency, so with one or two of them in flight a single accumulator
// chain, not memory, would bound the speed at M=1.
template <int MB, int NT, bool INT4>
TGT void tile_avx512(const Args& a, int64_t tile0, int64_t m0) {
  constexpr int NACC = MB * NT == 1 ? 4 : (MB * NT == 2 ? 2 : 1);
  const int64_t K = a.K, G = a.G, N = a.ldo, nb = K / XB, ng = K / G, bpg = G / XB;
  const int64_t chunk_k = INT4 ? 8 : 4;  // k per 64-byte chunk
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const uint8_t* w[NT];
  const uint16_t* dt[NT];
  const uint16_t* mt[NT];
  __mmask16 mask[NT];
  __m512 acc[MB][NT];
  for (int j = 0; j < NT; ++j) {
    const int64_t t = tile0 + j;
    w[j] = a.w + t * (K / chunk_k) * 64;
    dt[j] = a.d + t * ng * TILE;
    mt[j] = a.mn ? a.mn + t * ng * TILE : nullptr;
    const int64_t valid = std::min<int64_t>(TILE, N - t * TILE);
    mask[j] = valid >= TILE ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
    const __m512 b0 = a.bias ? _mm512_maskz_loadu_ps(mask[j], a.bias + t * TILE) : _mm512_setzero_ps();
    for (int i = 0; i < MB; ++i) acc[i][j] = b0;
  }
  const int8_t* xq[MB];
  for (int i = 0; i < MB; ++i) xq[i] = a.xq + (m0 + i) * K;

  for (int64_t g = 0; g < ng; ++g) {
    __m512 dv[NT];
    for (int j = 0; j < NT; ++j)
      dv[j] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dt[j] + g * TILE)));
    for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
      __m512i idot[MB][NT][NACC];
      for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NT; ++j)
          for (int u = 0; u < NACC; ++u) idot[i][j][u] = _mm512_setzero_si512();
      if (INT4) {
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {  // 4 chunks of 8 k
          __m512i lo[NT], hi[NT];
          for (int j = 0; j < NT; ++j) {
            _mm_prefetch(reinterpret_cast<const char*>(w[j] + (b * 4 + c) * 64 + PF_DIST), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(w[j] + (b * 4 + c) * 64);
            lo[j] = _mm512_and_si512(v, nib);
            hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
          }
          const int u0 = (2 * c) % NACC, u1 = (2 * c + 1) % NACC;
          for (int i = 0; i < MB; ++i) {
            int32_t x0, x1;
            std::memcpy(&x0, xq[i] + b * XB + c * 8, 4);
            std::memcpy(&x1, xq[i] + b * XB + c * 8 + 4, 4);
            const __m512i b0 = _mm512_set1_epi32(x0), b1 = _mm512_set1_epi32(x1);
            for (int j = 0; j < NT; ++j) {
              idot[i][j][u0] = _mm512_dpbusd_epi32(idot[i][j][u0], lo[j], b0);
              idot[i][j][u1] = _mm512_dpbusd_epi32(idot[i][j][u1], hi[j], b1);
            }
          }
        }
      } else {
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {  // 8 chunks of 4 k
          __m512i v[NT];
          for (int j = 0; j < NT; ++j) {
            _mm_prefetch(reinterpret_cast<const char*>(w[j] + (b * 8 + c) * 64 + PF_DIST), _MM_HINT_T0);
            v[j] = _mm512_loadu_si512(w[j] + (b * 8 + c) * 64);
          }
          for (int i = 0; i < MB; ++i) {
            int32_t x0;
            std::memcpy(&x0, xq[i] + b * XB + c * 4, 4);
            const __m512i b0 = _mm512_set1_epi32(x0);
            for (int j = 0; j < NT; ++j)
              idot[i][j][c % NACC] = _mm512_dpbusd_epi32(idot[i][j][c % NACC], v[j], b0);
          }
        }
      }
      for (int i = 0; i < MB; ++i) {
        const __m512 sx = _mm512_set1_ps(a.dx[(m0 + i) * nb + b]);
        // int8 is stored + 128: remove 128 * sum(xq) of the block
        const __m512i corr = _mm512_set1_epi32(INT4 || a.mn ? 0 : 128 * a.isum[(m0 + i) * nb + b]);
        for (int j = 0; j < NT; ++j) {
          __m512i sum = idot[i][j][0];
          for (int u = 1; u < NACC; ++u) sum = _mm512_add_epi32(sum, idot[i][j][u]);
          if (!INT4 && !a.mn) sum = _mm512_sub_epi32(sum, corr);
          acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dv[j], sx), acc[i][j]);
        }
      }
    }
    if (INT4 || a.mn) {  // int4 and asymmetric int8: + min * sum(x) of the group (symmetric int4: min = -8 d)
      for (int j = 0; j < NT; ++j) {
        const __m512 mv = a.mn ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mt[j] + g * TILE)))
                               : _mm512_mul_ps(dv[j], _mm512_set1_ps(-8.0f));
        for (int i = 0; i < MB; ++i)
          acc[i][j] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a.gsum[(m0 + i) * ng + g]), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NT; ++j)
      _mm512_mask_storeu_ps(a.out + (m0 + i) * a.ldo + (tile0 + j) * TILE, mask[j], acc[i][j]);
}

// Rows m0.. of tiles [t, t + NT): blocks of MB_MAX rows, then the remainder.
template <int NT, int MB_MAX, bool INT4>
TGT void rows_avx512(const Args& a, int64_t t, int64_t M) {
  int64_t m = 0;
  for (; m + MB_MAX <= M; m += MB_MAX) tile_avx512<MB_MAX, NT, INT4>(a, t, m);
  switch (M - m) {
    case 7: if constexpr (MB_MAX > 7) tile_avx512<7, NT, INT4>(a, t, m); break;
    case 6: if constexpr (MB_MAX > 6) tile_avx512<6, NT, INT4>(a, t, m); break;
    case 5: if constexpr (MB_MAX > 5) tile_avx512<5, NT, INT4>(a, t, m); break;
    case 4: if constexpr (MB_MAX > 4) tile_avx512<4, NT, INT4>(a, t, m); break;
    case 3: tile_avx512<3, NT, INT4>(a, t, m); break;
    case 2: tile_avx512<2, NT, INT4>(a, t, m); break;
    case 1: tile_avx512<1, NT, INT4>(a, t, m); break;
    default: break;
  }
}

// Tiles [t0, t1) for all M rows: pairs of tiles x 4 rows when there are several rows (each broadcast activation
// word then feeds two tiles), single tiles x up to 8 rows otherwise.
template <bool INT4>
TGT void tiles_avx512(const Args& a, int64_t t0, int64_t t1, int64_t M) {
  int64_t t = t0;
  if (M >= 4)
    for (; t + 2 <= t1; t += 2) rows_avx512<2, 4, INT4>(a, t, M);
  for (; t < t1; ++t) rows_avx512<1, 8, INT4>(a, t, M);
}
#endif

template <bool INT4>
void tile_rows_scalar(const Args& a, int64_t tile, int64_t M, int valid) {
  const int64_t K = a.K, G = a.G, nb = K / XB, ng = K / G, bpg = G / XB;
  const int64_t chunk_k = INT4 ? 8 : 4;
  const uint8_t* w = a.w + tile * (K / chunk_k) * 64;
  const uint16_t* dt = a.d + tile * ng * TILE;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xq = a.xq + m * K;
    for (int r = 0; r < valid; ++r) {
      float acc = a.bias ? a.bias[tile * TILE + r] : 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        float accg = 0.f;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
          int32_t idot = 0;
          for (int64_t k = b * XB; k < (b + 1) * XB; ++k) {
            int q;
            if (INT4) {
              const uint8_t byte = w[(k / 8) * 64 + r * 4 + (k % 4)];
              q = (k % 8) < 4 ? (byte & 0x0F) : (byte >> 4);
            } else {
              q = static_cast<int>(w[(k / 4) * 64 + r * 4 + (k % 4)]) - (a.mn ? 0 : 128);
            }
            idot += q * static_cast<int32_t>(xq[k]);
          }
          accg += static_cast<float>(idot) * a.dx[m * nb + b];
        }
        acc += accg * half_to_float(dt[g * TILE + r]);
        if (a.mn) acc += half_to_float(a.mn[tile * ng * TILE + g * TILE + r]) * a.gsum[m * ng + g];
        else if (INT4) acc += -8.0f * half_to_float(dt[g * TILE + r]) * a.gsum[m * ng + g];
      }
      a.out[m * a.ldo + tile * TILE + r] = acc;
    }
  }
}

// The arguments both kernel families take, checked once: x as contiguous float32 (M, K), the output tensor
// (x's leading dims, N), the mins (int4; int8 with mins is asymmetric, stored 0..255) and bias pointers.
struct Call {
  torch::Tensor x, out;
  int64_t M = 0, K = 0, T = 0;
  const uint16_t* mn = nullptr;
  const float* bias = nullptr;
};

template <bool INT4>
Call prepare(const torch::Tensor& x_in, const torch::Tensor& w, const torch::Tensor& d,
             const c10::optional<torch::Tensor>& mn, const c10::optional<torch::Tensor>& bias, int64_t N, int64_t G,
             int64_t k_multiple) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.is_floating_point() && x_in.device().is_cpu(), "x must be a float CPU tensor (..., K)");
  Call c;
  c.K = x_in.size(-1);
  c.x = (x_in.dim() == 2 && x_in.scalar_type() == torch::kFloat && x_in.is_contiguous())
            ? x_in : x_in.reshape({-1, c.K}).to(torch::kFloat).contiguous();
  c.M = c.x.size(0);
  c.T = (N + TILE - 1) / TILE;
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous(), "packed weight must be contiguous uint8");
  TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous(), "scales must be contiguous float16");
  TORCH_CHECK(G > 0 && c.K % G == 0 && G % k_multiple == 0, "K must be a multiple of the group size, which must be "
              "a multiple of ", k_multiple);
  TORCH_CHECK(w.numel() == c.T * TILE * c.K / (INT4 ? 2 : 1), "packed weight has the wrong size for N, K");
  TORCH_CHECK(d.numel() == c.T * (c.K / G) * TILE, "scales have the wrong size");
  // mins: int4 (none: symmetric, W = d (q - 8), a GGUF Q4_0 file's blocks) and asymmetric int8
  if (mn.has_value() && mn->defined()) {
    TORCH_CHECK(mn->scalar_type() == torch::kHalf && mn->is_contiguous() && mn->numel() == d.numel(),
                "mins must be float16 shaped like the scales");
    c.mn = reinterpret_cast<const uint16_t*>(mn->data_ptr<at::Half>());
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == torch::kFloat && bias->is_contiguous(),
                "bias must be contiguous float32 with N elements");
    c.bias = bias->data_ptr<float>();
  }
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  c.out = torch::empty(out_shape, c.x.options());
  return c;
}

// Run tiles(t0, t1) over [0, T): ~16 KB of weights per task at least, so that small layers do not pay for waking
// threads they cannot feed, and no OpenMP region at all (at::parallel_for enters one even for one task) when there
// is nothing to share. Threads take chunks from a shared counter (guided: each chunk is 1/(2 threads) of what is
// left, down to the grain) rather than one equal share each: on a VM the cores do not stream memory at equal speeds,
// and with equal shares the thread that finished first waited at the region's barrier for 18% of a TinyLlama-1.1B
// decode step (perf, 2 Xeon vCPUs); with shrinking chunks the last ones, and so the wait, are a few microseconds.
// A tile's numbers do not depend on which thread runs it or on the chunk it is in.
template <typename F>
void for_tiles(int64_t T, int64_t M, int64_t K, bool int4, const uint8_t* w, const F& tiles) {
  const int64_t tile_bytes = TILE * K / (int4 ? 2 : 1);
  const int64_t grain = std::max<int64_t>(1, (16384 / std::max<int64_t>(1, M)) / tile_bytes);
  const int64_t nt = at::get_num_threads();
  if (T <= grain || nt == 1 || at::in_parallel_region()) { tiles(0, T); return; }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(nt, (T + grain - 1) / grain), 1, [&](int64_t, int64_t) {
    int64_t t0 = next.load(std::memory_order_relaxed);
    while (t0 < T) {
      int64_t size = std::max(grain, (T - t0) / (2 * nt));
      size += size & 1;   // even: tiles_avx512 pairs tiles when there are several rows
      const int64_t t1 = std::min(T, t0 + size);
      if (!next.compare_exchange_weak(t0, t1, std::memory_order_relaxed)) continue;   // t0 now holds the new start
#if PROSA_X86
      // a chunk starts a new stream: ask for its first PF_DIST bytes at once (the kernels prefetch PF_DIST ahead of
      // what they read, so without this the start of every chunk is read at the latency of one miss after another)
      for (int64_t o = 0; o < std::min(PF_DIST, (t1 - t0) * tile_bytes); o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w + t0 * tile_bytes + o), _MM_HINT_T0);
#endif
      tiles(t0, t1);
      t0 = next.load(std::memory_order_relaxed);
    }
  });
}

inline torch::Tensor in_dtype_of(const torch::Tensor& out, const torch::Tensor& x_in) {
  return out.scalar_type() == x_in.scalar_type() ? out : out.to(x_in.scalar_type());
}

template <bool INT4>
torch::Tensor qlinear(const torch::Tensor& x_in, const torch::Tensor& w, const torch::Tensor& d,
                      const c10::optional<torch::Tensor>& mn, const c10::optional<torch::Tensor>& bias, int64_t N,
                      int64_t G) {
  Call c = prepare<INT4>(x_in, w, d, mn, bias, N, G, XB);
  const int64_t M = c.M, K = c.K;
  if (M == 0 || N == 0) return in_dtype_of(c.out, x_in);
  const bool avx = use_avx512() && !g_force_scalar;
  thread_local QuantX q;
  quantize_x(c.x.data_ptr<float>(), M, K, G, avx, q);
  Args a{w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()), c.mn, q.xq.data(),
         q.dx.data(), q.isum.data(), q.gsum.data(), c.bias, c.out.data_ptr<float>(), K, G, N};
  for_tiles(c.T, M, K, INT4, w.data_ptr<uint8_t>(), [&](int64_t t0, int64_t t1) {
#if PROSA_X86
    if (avx) { tiles_avx512<INT4>(a, t0, t1, M); return; }
#endif
    for (int64_t t = t0; t < t1; ++t)
      tile_rows_scalar<INT4>(a, t, M, static_cast<int>(std::min<int64_t>(TILE, N - t * TILE)));
  });
  return in_dtype_of(c.out, x_in);
}


// ============================================================================ float-activation kernels
// y = x @ W^T with W dequantized in registers and x kept in float32: the result is F.linear(x, W_dequantized) up
// to float summation order (no rounding of the activations, unlike the kernels above). At small M it streams the
// same bytes as the VNNI path; it is the default (prosa/quant.py), the VNNI path an opt-in for throughput.
struct FArgs {
  const uint8_t* w;
  const uint16_t* d;
  const uint16_t* mn;   // int4 only
  const float* x;       // (M, K)
  const float* xsum;    // (M, K/G): sum of x over each group
  const float* bias;    // (N) or null
  float* out;           // (M, N)
  int64_t K, G, N;
};

#if PROSA_X86
// MB activation rows x one tile (16 output rows). Two partial sums per row hide the FMA latency at MB = 1.
template <int MB, bool INT4, bool ASYM>
TGT void ftile_avx512(const FArgs& a, int64_t t, int64_t m0) {
  const int64_t K = a.K, G = a.G, ng = K / G;
  constexpr int64_t CK = INT4 ? 8 : 4;  // k per 64-byte chunk
  const uint8_t* w = a.w + t * (K / CK) * 64;
  const uint16_t* dt = a.d + t * ng * TILE;
  const int64_t valid = std::min<int64_t>(TILE, a.N - t * TILE);
  const __mmask16 mask = valid >= TILE ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
  const __m512i bytes = _mm512_set1_epi32(0xFF);
  // int4: a nibble -> float by a permute of this table (vpermps reads only the low 4 bits of each index lane), one
  // instruction where masking and converting took two: the float path is bound by instructions, not bandwidth
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[MB];
  const __m512 b0 = a.bias ? _mm512_maskz_loadu_ps(mask, a.bias + t * TILE) : _mm512_setzero_ps();
  for (int i = 0; i < MB; ++i) acc[i] = b0;
  for (int64_t g = 0; g < ng; ++g) {
    __m512 s0[MB], s1[MB];
    for (int i = 0; i < MB; ++i) s0[i] = s1[i] = _mm512_setzero_ps();
    for (int64_t c = g * (G / CK); c < (g + 1) * (G / CK); ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c * 64 + PF_DIST), _MM_HINT_T0);
      const __m512i raw = _mm512_loadu_si512(w + c * 64);
      // int8: undo the +128 of the layout (xor) and sign-extend each byte; int4: each nibble as is
      const __m512i v = INT4 || ASYM ? raw : _mm512_xor_si512(raw, _mm512_set1_epi32(static_cast<int>(0x80808080u)));
      const int64_t k = c * CK;
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m512 wl = INT4 ? _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * j), lut)
                          : _mm512_cvtepi32_ps(ASYM ? _mm512_and_si512(_mm512_srli_epi32(v, 8 * j), bytes)
                                                    : _mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * j), 24));
        for (int i = 0; i < MB; ++i) s0[i] = _mm512_fmadd_ps(wl, _mm512_set1_ps(a.x[(m0 + i) * K + k + j]), s0[i]);
        if (INT4) {
          const __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * j + 4), lut);
          for (int i = 0; i < MB; ++i)
            s1[i] = _mm512_fmadd_ps(wh, _mm512_set1_ps(a.x[(m0 + i) * K + k + 4 + j]), s1[i]);
        }
      }
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dt + g * TILE)));
    if (INT4 || ASYM) {
      const __m512 mv = a.mn ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.mn + t * ng * TILE + g * TILE)))
                             : _mm512_mul_ps(dv, _mm512_set1_ps(-8.0f));  // symmetric int4
      for (int i = 0; i < MB; ++i) {
        acc[i] = _mm512_fmadd_ps(dv, _mm512_add_ps(s0[i], s1[i]), acc[i]);
        acc[i] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a.xsum[(m0 + i) * ng + g]), acc[i]);
      }
    } else {
      for (int i = 0; i < MB; ++i) acc[i] = _mm512_fmadd_ps(dv, s0[i], acc[i]);
    }
  }
  for (int i = 0; i < MB; ++i) _mm512_mask_storeu_ps(a.out + (m0 + i) * a.N + t * TILE, mask, acc[i]);
}

template <bool INT4, bool ASYM>
TGT void ftiles_avx512_(const FArgs& a, int64_t t0, int64_t t1, int64_t M) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) ftile_avx512<8, INT4, ASYM>(a, t, m);   // each row's sums alike for any MB
    for (; m + 4 <= M; m += 4) ftile_avx512<4, INT4, ASYM>(a, t, m);
    switch (M - m) {
      case 3: ftile_avx512<3, INT4, ASYM>(a, t, m); break;
      case 2: ftile_avx512<2, INT4, ASYM>(a, t, m); break;
      case 1: ftile_avx512<1, INT4, ASYM>(a, t, m); break;
      default: break;
    }
  }
}

template <bool INT4>
TGT void ftiles_avx512(const FArgs& a, int64_t t0, int64_t t1, int64_t M) {
  if (INT4) ftiles_avx512_<true, false>(a, t0, t1, M);
  else if (a.mn) ftiles_avx512_<false, true>(a, t0, t1, M);
  else ftiles_avx512_<false, false>(a, t0, t1, M);
}
#endif

template <bool INT4>
void ftile_scalar(const FArgs& a, int64_t t, int64_t M) {
  const int64_t K = a.K, G = a.G, ng = K / G;
  const int64_t CK = INT4 ? 8 : 4;
  const uint8_t* w = a.w + t * (K / CK) * 64;
  const uint16_t* dt = a.d + t * ng * TILE;
  const int valid = static_cast<int>(std::min<int64_t>(TILE, a.N - t * TILE));
  for (int64_t m = 0; m < M; ++m)
    for (int r = 0; r < valid; ++r) {
      float acc = a.bias ? a.bias[t * TILE + r] : 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        float s = 0.f;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          const uint8_t byte = w[(k / CK) * 64 + r * 4 + (k % 4)];
          const int q = INT4 ? ((k % 8) < 4 ? (byte & 0x0F) : (byte >> 4)) : static_cast<int>(byte) - (a.mn ? 0 : 128);
          s += static_cast<float>(q) * a.x[m * K + k];
        }
        const float xs = a.xsum[m * ng + g];
        acc += half_to_float(dt[g * TILE + r]) * s;
        if (a.mn) acc += half_to_float(a.mn[t * ng * TILE + g * TILE + r]) * xs;
        else if (INT4) acc += -8.0f * half_to_float(dt[g * TILE + r]) * xs;
      }
      a.out[m * a.N + t * TILE + r] = acc;
    }
}

template <bool INT4>
torch::Tensor qlinear_f32(const torch::Tensor& x_in, const torch::Tensor& w, const torch::Tensor& d,
                          const c10::optional<torch::Tensor>& mn, const c10::optional<torch::Tensor>& bias, int64_t N,
                          int64_t G) {
  Call c = prepare<INT4>(x_in, w, d, mn, bias, N, G, INT4 ? 8 : 4);
  const int64_t M = c.M, K = c.K, ng = K / G;
  if (M == 0 || N == 0) return in_dtype_of(c.out, x_in);
  const float* xp = c.x.data_ptr<float>();
  std::vector<float> xsum(M * ng);   // sum of x over each group: the mins' term
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      float s = 0.f;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) s += xp[m * K + k];
      xsum[m * ng + g] = s;
    }
  FArgs a{w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()), c.mn, xp, xsum.data(),
          c.bias, c.out.data_ptr<float>(), K, G, N};
  const bool avx = use_avx512() && !g_force_scalar;
  for_tiles(c.T, M, K, INT4, w.data_ptr<uint8_t>(), [&](int64_t t0, int64_t t1) {
#if PROSA_X86
    if (avx) { ftiles_avx512<INT4>(a, t0, t1, M); return; }
#endif
    for (int64_t t = t0; t < t1; ++t) ftile_scalar<INT4>(a, t, M);
  });
  return in_dtype_of(c.out, x_in);
}

// ============================================================================ fused decode step (Llama family)
// One transformer block for one new token per sequence (T = 1), in a single call: RMSNorm, fused q/k/v
// projection, RoPE (rotate-half layout, first `rot` channels of each head), K/V written into the cache at slot
// `slot`, grouped-query attention over the cache (padding slots and, with a sliding window, old slots skipped),
// output projection, residual, RMSNorm, fused gate/up projection, SiLU(gate) * up, down projection, residual.
// It computes what prosa/models/llama.py computes, minus ~40 PyTorch operator calls per block (the Python and
// dispatch overhead that dominates decoding small models on a CPU).

// A linear layer: prosa-packed int8/int4 (see the top of this file) or a float32 weight (N, K).
struct Lin {
  torch::Tensor w, d, mn, bias, fw;  // fw: float weight (float layers); else w/d/(mn) packed
  int64_t n = 0, g = 0, bits = 0;    // bits 0 = float
  bool act8 = false;                 // quantize activations to int8 (VNNI kernels) instead of keeping float

  torch::Tensor operator()(const torch::Tensor& x) const {  // x (B, K) float32 contiguous -> (B, N)
    if (bits == 0) return bias.defined() ? at::addmm(bias, x, fw.t()) : at::mm(x, fw.t());
    const c10::optional<torch::Tensor> b = bias.defined() ? c10::optional<torch::Tensor>(bias) : c10::nullopt;
    const c10::optional<torch::Tensor> m = mn.defined() ? c10::optional<torch::Tensor>(mn) : c10::nullopt;
    if (act8) return bits == 4 ? qlinear<true>(x, w, d, m, b, n, g) : qlinear<false>(x, w, d, m, b, n, g);
    return bits == 4 ? qlinear_f32<true>(x, w, d, m, b, n, g) : qlinear_f32<false>(x, w, d, m, b, n, g);
  }
};

inline void rmsnorm(const float* x, const float* w, float* out, int64_t c, float eps) {
  double ss = 0.0;  // double: the reference sums float32 squares with pairwise reduction; this stays closer
  for (int64_t i = 0; i < c; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(static_cast<float>(ss / c) + eps);
  for (int64_t i = 0; i < c; ++i) out[i] = w[i] * (x[i] * r);
}

inline void rope_half(float* x, const float* cos, const float* sin, int64_t rot) {
  const int64_t h = rot / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = x[i], x2 = x[i + h];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + h] = x2 * cos[i + h] + x1 * sin[i + h];
  }
}

// The paged KV cache of one layer (prosa/engine/blocks.py): keys and values are (slots, KV, D) float32; position
// `pos` of sequence b lives in slot table[b][pos / bs] * bs + pos % bs. Sequences have their own lengths.
struct Paged {
  float* k;
  float* v;
  const int32_t* table;   // (B, tstride) block ids
  int64_t tstride, bs, KV, D;
  int64_t slot(int64_t b, int64_t pos) const { return static_cast<int64_t>(table[b * tstride + pos / bs]) * bs + pos % bs; }
};

// Attention of one new query per sequence over its own keys 0..pos[b] (inclusive; with a sliding window only the
// last `window`): q (B, H, D) -> out (B, H, D). Grouped-query heads share K/V head h / (H / KV). One (sequence, head)
// per task; every row is computed the same way whatever else is in the batch (no padding, no batch-wide length),
// so a sequence's numbers do not depend on its neighbours. Keys are walked block by block (one table lookup per
// block); the dot products and the weighted sum of values use AVX-512 where the CPU has it.
struct Attn {
  const float* q;
  int64_t qstride;
  float* out;
  const Paged* c;
  const int64_t* pos;
  int64_t H, window;
  float scale;
};

// Calls f(s, k_row, v_row) for every key position s of task t's window, in order.
template <typename F>
inline void for_keys(const Attn& a, int64_t b, int64_t kvh, int64_t lo, int64_t last, const F& f) {
  const Paged& c = *a.c;
  const int64_t step = c.KV * c.D;
  for (int64_t j = lo / c.bs; j <= last / c.bs; ++j) {
    const int64_t first = std::max(lo, j * c.bs), end = std::min(last, j * c.bs + c.bs - 1);
    const int64_t base = (static_cast<int64_t>(c.table[b * c.tstride + j]) * c.bs + (first - j * c.bs)) * step + kvh * c.D;
    const float* kb = c.k + base;
    const float* vb = c.v + base;
    for (int64_t s = first; s <= end; ++s, kb += step, vb += step) f(s, kb, vb);
  }
}

template <typename Dot, typename Axpy>
inline void attend_task(const Attn& a, int64_t t, float* p, const Dot& dot, const Axpy& axpy) {
  const int64_t H = a.H, D = a.c->D;
  const int64_t b = t / H, hh = t % H, kvh = hh / (H / a.c->KV), last = a.pos[b];
  const int64_t lo = a.window > 0 ? std::max<int64_t>(0, last - a.window + 1) : 0;
  const float* q = a.q + b * a.qstride + hh * D;
  float mx = -INFINITY;
  for_keys(a, b, kvh, lo, last, [&](int64_t s, const float* k, const float*) {
    p[s] = dot(q, k, D) * a.scale;
    mx = std::max(mx, p[s]);
  });
  float sum = 0.f;
  for (int64_t s = lo; s <= last; ++s) { p[s] = std::exp(p[s] - mx); sum += p[s]; }
  float* out = a.out + (b * H + hh) * D;
  for (int64_t i = 0; i < D; ++i) out[i] = 0.f;
  const float inv = 1.0f / sum;
  for_keys(a, b, kvh, lo, last, [&](int64_t s, const float*, const float* v) {
    const float w = p[s] * inv;
    if (w != 0.f) axpy(w, v, out, D);
  });
}

void attend_tasks_scalar(const Attn& a, int64_t t0, int64_t t1, float* p) {
  const auto dot = [](const float* x, const float* y, int64_t n) {
    float acc = 0.f;
    for (int64_t i = 0; i < n; ++i) acc += x[i] * y[i];
    return acc;
  };
  const auto axpy = [](float w, const float* v, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] += w * v[i];
  };
  for (int64_t t = t0; t < t1; ++t) attend_task(a, t, p, dot, axpy);
}

#if PROSA_X86
struct DotAvx512 {
  TGT float operator()(const float* x, const float* y, int64_t n) const {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), acc);
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
  }
};

struct AxpyAvx512 {
  TGT void operator()(float w, const float* v, float* out, int64_t n) const {
    const __m512 wv = _mm512_set1_ps(w);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(out + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(out + i)));
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(out + i, m, _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, v + i),
                                                        _mm512_maskz_loadu_ps(m, out + i)));
    }
  }
};

void attend_tasks_avx512(const Attn& a, int64_t t0, int64_t t1, float* p) {
  for (int64_t t = t0; t < t1; ++t) attend_task(a, t, p, DotAvx512{}, AxpyAvx512{});
}
#endif

void attend_paged(const float* qp, int64_t qstride, float* ap, const Paged& c, const int64_t* pos, int64_t B,
                  int64_t H, int64_t window, float scale) {
  int64_t longest = 0, work = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = window > 0 ? std::max<int64_t>(0, pos[b] - window + 1) : 0;
    longest = std::max(longest, pos[b] + 1);
    work += H * (pos[b] + 1 - lo) * c.D;
  }
  const Attn a{qp, qstride, ap, &c, pos, H, window, scale};
  const bool avx = use_avx512() && !g_force_scalar;
  const auto tasks = [&](int64_t t0, int64_t t1) {
    std::vector<float> p(longest);
#if PROSA_X86
    if (avx) { attend_tasks_avx512(a, t0, t1, p.data()); return; }
#endif
    attend_tasks_scalar(a, t0, t1, p.data());
  };
  if (work < (1 << 16) || at::get_num_threads() == 1) tasks(0, B * H); else at::parallel_for(0, B * H, 1, tasks);
}

Paged paged_of(torch::Tensor& k_pool, torch::Tensor& v_pool, const torch::Tensor& table, int64_t bs) {
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.is_contiguous() && v_pool.is_contiguous() && v_pool.sizes() == k_pool.sizes()
              && k_pool.scalar_type() == torch::kFloat && v_pool.scalar_type() == torch::kFloat,
              "K/V pools must be contiguous float32 (slots, KV, D)");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == torch::kInt && table.is_contiguous(),
              "block table must be contiguous int32 (B, blocks)");
  TORCH_CHECK(bs > 0 && k_pool.size(0) % bs == 0, "pool slots must be a multiple of the block size");
  return Paged{k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), table.data_ptr<int32_t>(), table.size(1), bs,
               k_pool.size(1), k_pool.size(2)};
}

// Every position a sequence touches must lie in a block of the pool (a bad table would read or write elsewhere).
void check_positions(const Paged& c, const torch::Tensor& pos, int64_t B, int64_t slots) {
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == B && pos.scalar_type() == torch::kLong && pos.is_contiguous(),
              "positions must be contiguous int64 (B)");
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(pp[b] >= 0 && pp[b] / c.bs < c.tstride, "position outside the block table");
    for (int64_t j = 0; j <= pp[b] / c.bs; ++j) {
      const int64_t blk = c.table[b * c.tstride + j];
      TORCH_CHECK(blk >= 0 && (blk + 1) * c.bs <= slots, "block id outside the pool");
    }
  }
}

#if PROSA_X86
// e^x for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes' expf
// coefficients), then scaled by 2^n. Within ~2 ulp of expf; every lane computes the same way, so an element's
// value does not depend on its place in the vector (the tail goes through the same code, masked).
TGT inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

TGT void silu_mul_avx512(const float* gu, float* act, int64_t B, int64_t inter) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t b = 0; b < B; ++b) {
    const float* g = gu + b * 2 * inter;
    const float* u = g + inter;
    float* out = act + b * inter;
    for (int64_t i = 0; i < inter; i += 16) {
      const __mmask16 m = inter - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                          : static_cast<__mmask16>((1u << (inter - i)) - 1);
      const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
      const __m512 sig = _mm512_div_ps(gv, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
      _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(sig, _mm512_maskz_loadu_ps(m, u + i)));
    }
  }
}
#endif

// act (B, inter) = SiLU(gate) * up, gate and up the halves of each row of gu (B, 2 inter).
void silu_mul(const float* gu, float* act, int64_t B, int64_t inter) {
#if PROSA_X86
  if (use_avx512() && !g_force_scalar) { silu_mul_avx512(gu, act, B, inter); return; }
#endif
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < inter; ++i) {
      const float gv = gu[b * 2 * inter + i];
      act[b * inter + i] = gv / (1.0f + std::exp(-gv)) * gu[b * 2 * inter + inter + i];
    }
}

struct LlamaBlock {
  torch::Tensor in_norm, post_norm;  // (C) float32
  Lin qkv, o, gate_up, down;
  int64_t n_heads = 0, n_kv = 0, head_dim = 0, rot = 0, window = 0, inter = 0;
  double eps = 1e-6;

  // x (B, C) float32, updated in place and returned. k_pool/v_pool (slots, H_kv, D) float32, this layer's paged
  // cache; table (B, blocks) int32 and pos (B) int64: each sequence's block table and the position of its new token
  // (its K/V are written there); cos/sin (B, rot) float32.
  torch::Tensor forward(torch::Tensor x, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor table,
                        torch::Tensor pos, int64_t block_size, torch::Tensor cos, torch::Tensor sin) const {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be (B, C) float32");
    const int64_t B = x.size(0), C = x.size(1), H = n_heads, KV = n_kv, D = head_dim;
    const Paged c = paged_of(k_pool, v_pool, table, block_size);
    TORCH_CHECK(c.KV == KV && c.D == D && table.size(0) == B, "cache shape does not match the block");
    check_positions(c, pos, B, k_pool.size(0));
    const int64_t* pp = pos.data_ptr<int64_t>();
    const float fe = static_cast<float>(eps);
    float* xp = x.data_ptr<float>();
    auto h = torch::empty({B, C}, x.options());
    float* hp = h.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) rmsnorm(xp + b * C, in_norm.data_ptr<float>(), hp + b * C, C, fe);
    auto qkv_out = qkv(h);  // (B, (H + 2 KV) D)
    float* qp = qkv_out.data_ptr<float>();
    const int64_t row = (H + 2 * KV) * D;
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      float* r = qp + b * row;
      for (int64_t j = 0; j < H + KV; ++j) rope_half(r + j * D, cp + b * rot, sp + b * rot, rot);
      const int64_t s = c.slot(b, pp[b]);
      std::memcpy(c.k + s * KV * D, r + H * D, KV * D * sizeof(float));
      std::memcpy(c.v + s * KV * D, r + (H + KV) * D, KV * D * sizeof(float));
    }
    auto att = torch::empty({B, H * D}, x.options());
    attend_paged(qp, row, att.data_ptr<float>(), c, pp, B, H, window, 1.0f / std::sqrt(static_cast<float>(D)));
    x.add_(o(att));
    for (int64_t b = 0; b < B; ++b) rmsnorm(xp + b * C, post_norm.data_ptr<float>(), hp + b * C, C, fe);
    auto gu = gate_up(h);  // (B, 2 I)
    auto act = torch::empty({B, inter}, x.options());
    silu_mul(gu.data_ptr<float>(), act.data_ptr<float>(), B, inter);
    x.add_(down(act));
    return x;
  }
};


// LayerNorm of one row: (x - mean) / sqrt(var + eps) * w + b, the mean and variance summed in double (the
// reference reduces float32 pairwise; double keeps this within rounding of it). b may be null.
inline void layernorm(const float* x, const float* w, const float* b, float* out, int64_t c, float eps) {
  double s = 0.0, ss = 0.0;
  for (int64_t i = 0; i < c; ++i) s += x[i];
  const double mean = s / c;
  for (int64_t i = 0; i < c; ++i) { const double d = x[i] - mean; ss += d * d; }
  const float r = 1.0f / std::sqrt(static_cast<float>(ss / c) + eps);
  const float m = static_cast<float>(mean);
  for (int64_t i = 0; i < c; ++i) out[i] = (x[i] - m) * r * w[i] + (b ? b[i] : 0.f);
}

// GPT-J's rotary embedding: channel pairs (0,1), (2,3)... of the first `rot` channels rotate together; cos/sin are
// laid out per channel (each value twice, as RoPE.cos_sin makes them for interleaved rotation).
inline void rope_pairs(float* x, const float* cos, const float* sin, int64_t rot) {
  for (int64_t i = 0; i + 1 < rot; i += 2) {
    const float x1 = x[i], x2 = x[i + 1];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + 1] = x2 * cos[i + 1] + x1 * sin[i + 1];
  }
}

// One block of the GPT-2 family (GPT-2, GPT-Neo, GPT-J, GPT-NeoX) for one new token per sequence: LayerNorms with
// biases, q/k/v from one fused projection ([q | k | v], or per head [q_h | k_h | v_h] for NeoX) or three, optional
// rotary embedding (halves or pairs, on the first `rot` channels of each head), paged attention with its own scale
// and window, an MLP fc_in -> activation -> fc_out, and a sequential (x + attn, then + mlp of its norm) or parallel
// (x + attn(ln1 x) + mlp(ln2 x), ln2 = ln1 when the model has one norm: GPT-J) residual.
struct GptBlock {
  torch::Tensor ln1_w, ln1_b, ln2_w, ln2_b;  // (C) float32; ln2 undefined: the MLP reads ln1's output
  std::vector<Lin> qkv;                      // 1 fused or 3 (q, k, v)
  Lin o, fc_in, fc_out;
  int64_t n_heads = 0, head_dim = 0, rot = 0, window = 0;
  int64_t rope = 0;       // 0 none, 1 halves (NeoX), 2 pairs (GPT-J)
  int64_t act = 0;        // 0 GELU tanh, 1 GELU erf, 2 ReLU, 3 SiLU
  bool per_head = false;  // the fused q/k/v output laid out per head (NeoX)
  bool parallel = false;
  double eps = 1e-5, scale = 1.0;

  void norm(const torch::Tensor& w, const torch::Tensor& b, const float* x, float* out, int64_t B, int64_t C) const {
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    for (int64_t r = 0; r < B; ++r) layernorm(x + r * C, w.data_ptr<float>(), bp, out + r * C, C, static_cast<float>(eps));
  }

  torch::Tensor mlp(const torch::Tensor& h) const {  // (B, C) -> (B, C)
    auto u = fc_in(h);  // (B, I), activated in place by ATen's vectorised kernels (the model's own functions)
    if (act == 0) at::gelu_(u, "tanh"); else if (act == 1) at::gelu_(u); else if (act == 2) at::relu_(u); else at::silu_(u);
    return fc_out(u);
  }

  // As LlamaBlock::forward: x (B, C) float32 updated in place; this layer's paged K/V pools, block tables, the
  // position of each row's new token, cos/sin (B, rot) float32 (empty without rotary embedding).
  torch::Tensor forward(torch::Tensor x, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor table,
                        torch::Tensor pos, int64_t block_size, torch::Tensor cos, torch::Tensor sin) const {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be (B, C) float32");
    const int64_t B = x.size(0), C = x.size(1), H = n_heads, D = head_dim, HD = H * D;
    const Paged c = paged_of(k_pool, v_pool, table, block_size);
    TORCH_CHECK(c.KV == H && c.D == D && table.size(0) == B, "cache shape does not match the block");
    TORCH_CHECK(rope == 0 || (cos.size(0) == B && cos.size(1) == rot && cos.is_contiguous() && sin.is_contiguous()),
                "cos/sin must be (B, rot) float32");
    check_positions(c, pos, B, k_pool.size(0));
    const int64_t* pp = pos.data_ptr<int64_t>();
    float* xp = x.data_ptr<float>();
    auto h = torch::empty({B, C}, x.options());
    norm(ln1_w, ln1_b, xp, h.data_ptr<float>(), B, C);
    // q/k/v as one (B, 3 HD) row each: [q | k | v]
    torch::Tensor qkv_out;
    if (qkv.size() == 1) {
      qkv_out = qkv[0](h);
      if (per_head) qkv_out = qkv_out.view({B, H, 3, D}).transpose(1, 2).contiguous().view({B, 3 * HD});
    } else {
      qkv_out = torch::cat({qkv[0](h), qkv[1](h), qkv[2](h)}, 1);
    }
    float* qp = qkv_out.data_ptr<float>();
    const int64_t row = 3 * HD;
    for (int64_t b = 0; b < B; ++b) {
      float* r = qp + b * row;
      if (rope != 0) {
        const float* cb = cos.data_ptr<float>() + b * rot;
        const float* sb = sin.data_ptr<float>() + b * rot;
        for (int64_t j = 0; j < 2 * H; ++j)
          (rope == 1 ? rope_half : rope_pairs)(r + j * D, cb, sb, rot);
      }
      const int64_t s = c.slot(b, pp[b]);
      std::memcpy(c.k + s * HD, r + HD, HD * sizeof(float));
      std::memcpy(c.v + s * HD, r + 2 * HD, HD * sizeof(float));
    }
    auto att = torch::empty({B, HD}, x.options());
    attend_paged(qp, row, att.data_ptr<float>(), c, pp, B, H, window, static_cast<float>(scale));
    const auto a = o(att);
    if (parallel) {
      torch::Tensor h2 = h;
      if (ln2_w.defined()) {
        h2 = torch::empty({B, C}, x.options());
        norm(ln2_w, ln2_b, xp, h2.data_ptr<float>(), B, C);
      }
      const auto m = mlp(h2);
      x.add_(a);  // (x + a) + m: the model's order of additions
      x.add_(m);
    } else {
      x.add_(a);
      norm(ln2_w, ln2_b, xp, h.data_ptr<float>(), B, C);
      x.add_(mlp(h));
    }
    return x;
  }
};

}  // namespace

torch::Tensor linear_int8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& d,
                          const c10::optional<torch::Tensor>& bias, int64_t N, int64_t G) {
  return qlinear<false>(x, w, d, c10::nullopt, bias, N, G);
}

torch::Tensor linear_int4(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& d,
                          const c10::optional<torch::Tensor>& mn, const c10::optional<torch::Tensor>& bias, int64_t N,
                          int64_t G) {
  return qlinear<true>(x, w, d, mn, bias, N, G);
}

torch::Tensor linear_int8_f32(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& d,
                              const c10::optional<torch::Tensor>& bias, int64_t N, int64_t G) {
  return qlinear_f32<false>(x, w, d, c10::nullopt, bias, N, G);
}

torch::Tensor linear_int4_f32(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& d,
                              const c10::optional<torch::Tensor>& mn, const c10::optional<torch::Tensor>& bias, int64_t N,
                              int64_t G) {
  return qlinear_f32<true>(x, w, d, mn, bias, N, G);
}

torch::Tensor linear_uint8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& d,
                           const torch::Tensor& mn, const c10::optional<torch::Tensor>& bias, int64_t N, int64_t G) {
  return qlinear<false>(x, w, d, mn, bias, N, G);
}

torch::Tensor linear_uint8_f32(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& d,
                               const torch::Tensor& mn, const c10::optional<torch::Tensor>& bias, int64_t N, int64_t G) {
  return qlinear_f32<false>(x, w, d, mn, bias, N, G);
}

// One new query per sequence against its paged keys/values (the decode step of models without a fused block):
// q (B, H, D) float32 -> (B, H, D); keys 0..pos[b] of sequence b, the last `window` only when window > 0.
torch::Tensor paged_attention(const torch::Tensor& q_in, torch::Tensor k_pool, torch::Tensor v_pool,
                              const torch::Tensor& table, const torch::Tensor& pos, int64_t block_size, int64_t window,
                              double scale) {
  TORCH_CHECK(q_in.dim() == 3 && q_in.scalar_type() == torch::kFloat, "q must be (B, H, D) float32");
  const torch::Tensor q = q_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1);
  const Paged c = paged_of(k_pool, v_pool, table, block_size);
  TORCH_CHECK(c.D == q.size(2) && H % c.KV == 0 && table.size(0) == B, "q does not match the cache");
  check_positions(c, pos, B, k_pool.size(0));
  auto out = torch::empty_like(q);
  attend_paged(q.data_ptr<float>(), H * c.D, out.data_ptr<float>(), c, pos.data_ptr<int64_t>(), B, H, window,
               static_cast<float>(scale));
  return out;
}

// Inverse-CDF sampling with one uniform number per row (prosa/sampling.py `draw`): the first token whose running
// sum of probabilities, in double and in index order, exceeds u * (the row's sum); never a token of probability 0
// (when rounding leaves the target unreached, the last token with a positive probability). probs (B, V) float32,
// u (B) float64 in [0, 1) -> (B) int64. Two sequential passes per row instead of a cumsum tensor and a search.
torch::Tensor sample_rows(const torch::Tensor& probs_in, const torch::Tensor& u_in) {
  TORCH_CHECK(probs_in.dim() == 2 && probs_in.scalar_type() == torch::kFloat && probs_in.device().is_cpu(),
              "probs must be (B, V) float32 on the CPU");
  const torch::Tensor probs = probs_in.contiguous(), u = u_in.to(torch::kDouble).contiguous();
  const int64_t B = probs.size(0), V = probs.size(1);
  TORCH_CHECK(u.numel() == B, "one uniform number per row");
  auto out = torch::empty({B}, torch::dtype(torch::kLong));
  const float* pp = probs.data_ptr<float>();
  const double* up = u.data_ptr<double>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* p = pp + b * V;
      double total = 0.0;
      int64_t last = 0;
      for (int64_t i = 0; i < V; ++i) {
        total += p[i];
        if (p[i] > 0.f) last = i;
      }
      const double target = up[b] * total;
      double run = 0.0;
      int64_t pick = last;
      for (int64_t i = 0; i < V; ++i) {
        run += p[i];
        if (run > target) { pick = std::min(i, last); break; }
      }
      op[b] = pick;
    }
  });
  return out;
}

std::string isa() { return (use_avx512() && !g_force_scalar) ? "avx512_vnni" : "scalar"; }
void force_scalar(bool on) { g_force_scalar = on; }

// repack.cpp
torch::Tensor gguf_rows(const torch::Tensor& blocks, const torch::Tensor& ids, int64_t kind, int64_t k);
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias);
void bf16_force_scalar(bool on);
std::vector<torch::Tensor> gguf_repack(const std::vector<torch::Tensor>& parts, const std::vector<torch::Tensor>& orders,
                                       int64_t kind, int64_t k);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_int8", &linear_int8, "y = x @ W^T + b, W row-interleaved int8 (stored +128) with fp16 group scales",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_int4", &linear_int4, "y = x @ W^T + b, W row-interleaved int4 with fp16 group scales and mins (None: W = d (q - 8))",
        py::call_guard<py::gil_scoped_release>());
  py::class_<Lin>(m, "Lin", "a linear layer for the fused decode step: packed int8/int4 or float32")
      .def(py::init([](torch::Tensor w, torch::Tensor d, c10::optional<torch::Tensor> mn,
                       c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> fw, int64_t n, int64_t g,
                       int64_t bits, bool act8) {
             Lin l;
             l.act8 = act8;
             l.w = w; l.d = d; l.mn = mn.value_or(torch::Tensor()); l.bias = bias.value_or(torch::Tensor());
             l.fw = fw.value_or(torch::Tensor()); l.n = n; l.g = g; l.bits = bits;
             return l;
           }),
           py::arg("w"), py::arg("d"), py::arg("mn"), py::arg("bias"), py::arg("fw"), py::arg("n"), py::arg("g"),
           py::arg("bits"), py::arg("act8") = false)
      .def("__call__", &Lin::operator(), py::call_guard<py::gil_scoped_release>());
  py::class_<LlamaBlock>(m, "LlamaBlock", "one Llama-family block for one token per sequence (see qlinear.cpp)")
      .def(py::init([](torch::Tensor in_norm, torch::Tensor post_norm, Lin qkv, Lin o, Lin gate_up, Lin down,
                       int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t rot, int64_t window, int64_t inter,
                       double eps) {
             LlamaBlock b;
             b.in_norm = in_norm; b.post_norm = post_norm; b.qkv = qkv; b.o = o; b.gate_up = gate_up; b.down = down;
             b.n_heads = n_heads; b.n_kv = n_kv; b.head_dim = head_dim; b.rot = rot; b.window = window;
             b.inter = inter; b.eps = eps;
             return b;
           }))
      .def("forward", &LlamaBlock::forward, py::call_guard<py::gil_scoped_release>());
  py::class_<GptBlock>(m, "GptBlock", "one GPT-2/Neo/J/NeoX block for one token per sequence (see qlinear.cpp)")
      .def(py::init([](torch::Tensor ln1_w, c10::optional<torch::Tensor> ln1_b, c10::optional<torch::Tensor> ln2_w,
                       c10::optional<torch::Tensor> ln2_b, std::vector<Lin> qkv, Lin o, Lin fc_in, Lin fc_out,
                       int64_t n_heads, int64_t head_dim, int64_t rot, int64_t rope, int64_t window, double scale,
                       int64_t act, bool per_head, bool parallel, double eps) {
             TORCH_CHECK(qkv.size() == 1 || qkv.size() == 3, "q/k/v: one fused projection or three");
             TORCH_CHECK(ln2_w.has_value() || parallel, "a sequential block needs its second norm");
             TORCH_CHECK(rope >= 0 && rope <= 2 && act >= 0 && act <= 3, "unknown rotary or activation kind");
             GptBlock b;
             b.ln1_w = ln1_w; b.ln1_b = ln1_b.value_or(torch::Tensor());
             b.ln2_w = ln2_w.value_or(torch::Tensor()); b.ln2_b = ln2_b.value_or(torch::Tensor());
             b.qkv = qkv; b.o = o; b.fc_in = fc_in; b.fc_out = fc_out;
             b.n_heads = n_heads; b.head_dim = head_dim; b.rot = rot; b.rope = rope; b.window = window;
             b.scale = scale; b.act = act; b.per_head = per_head; b.parallel = parallel; b.eps = eps;
             return b;
           }))
      .def("forward", &GptBlock::forward, py::call_guard<py::gil_scoped_release>());
  m.def("linear_int8_f32", &linear_int8_f32, "as linear_int8, with float32 activations (no activation rounding)",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_int4_f32", &linear_int4_f32, "as linear_int4, with float32 activations (no activation rounding)",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_uint8", &linear_uint8, "asymmetric int8 (stored 0..255, W = d q + m): as linear_int4's arguments",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_uint8_f32", &linear_uint8_f32, "asymmetric int8 with float32 activations",
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_attention", &paged_attention, "attention of one query per sequence over its paged K/V cache",
        py::call_guard<py::gil_scoped_release>());
  m.def("sample_rows", &sample_rows, "inverse-CDF sampling, one uniform number per row",
        py::call_guard<py::gil_scoped_release>());
  m.def("gguf_repack", &gguf_repack, "GGUF Q8_0/Q4_0/Q4_1 blocks (row parts, optional row orders) -> the prosa "
        "layout: [qweight, scales(, mins)]", py::arg("parts"), py::arg("orders"), py::arg("kind"), py::arg("k"),
        // other Python threads (a server's engine, a UI) run while a model loads
        py::call_guard<py::gil_scoped_release>());
  m.def("gguf_rows", &gguf_rows, "rows of a GGUF Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 table -> float32 (an embedding lookup)",
        py::arg("blocks"), py::arg("ids"), py::arg("kind"), py::arg("k"));
  m.def("linear_bf16", &linear_bf16, "y = x @ W^T + b, W bfloat16 (N, K), float32 sums (bf16.cpp): few rows of x",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("bf16_force_scalar", &bf16_force_scalar, "linear_bf16's portable path even where AVX-512 is available (tests)");
  m.def("isa", &isa, "the code path in use: avx512_vnni or scalar");
  m.def("force_scalar", &force_scalar, "use the portable path even where AVX-512 VNNI is available (tests)");
}
