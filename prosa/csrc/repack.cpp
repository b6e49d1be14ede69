// GGUF Q8_0 / Q4_0 / Q4_1 blocks -> the prosa kernels' weight layout, in one pass.
//
// Loading a GGUF file exactly (prosa.weights.assemble) turns each quantized weight into the layout qlinear.cpp's
// kernels read (see prosa/quant/layout.py): rows interleaved 16 at a time, int8 as (T, K/4, 16, 4) bytes stored
// q + 128, int4 as (T, K/8, 16, 4) bytes (byte j of a group of 8 = q[8c + j] | q[8c + 4 + j] << 4), fp16 scales
// and mins as (T, K/32, 16). The Python path does the same through whole-tensor temporaries (codes, nibble
// splits, permutes): ~0.4 s of the bundled model's 1 s load. Here each file row is read once, straight from the
// memory map, and written to its place; nothing but the result is allocated.
#include <torch/extension.h>

#include <c10/util/Half.h>

#include <cstring>
#include <vector>

namespace {

constexpr int64_t TILE = 16;  // output rows per tile
constexpr int64_t QK = 32;    // weights per GGUF block (and per prosa group)

// GGML type ids (gguf.GGMLQuantizationType)
constexpr int64_t Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8;

inline uint16_t half_bits(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

inline float half_at(const uint8_t* p) { return static_cast<float>(c10::Half(half_bits(p), c10::Half::from_bits())); }

}  // namespace

// Args:
//   parts: the weight's row blocks in order (a fused projection's q, k, v), each uint8 (rows_i, K / 32 * block
//     bytes), contiguous; the rows of all parts make the N output rows.
//   orders: per part, an int64 (rows_i,) tensor (output row r of the part is its file row order[r]: llama.cpp's
//     Q/K row permutation undone) or an empty tensor (rows in order).
//   kind: the GGML type id of every part (8 Q8_0, 2 Q4_0, 3 Q4_1).
//   k: columns (K, a multiple of 32).
// Returns:
//   [qweight, scales] for Q8_0 and Q4_0 (symmetric: the kernels take its mins as -8 d), [qweight, scales, mins] for
//   Q4_1; rows past N in the last tile are zero (int8: stored 0 + 128).
std::vector<torch::Tensor> gguf_repack(const std::vector<torch::Tensor>& parts, const std::vector<torch::Tensor>& orders,
                                       int64_t kind, int64_t k) {
  TORCH_CHECK(kind == Q8_0 || kind == Q4_0 || kind == Q4_1, "gguf_repack: GGML type ", kind,
              " is not Q8_0, Q4_0 or Q4_1");
  TORCH_CHECK(k > 0 && k % QK == 0, "gguf_repack: K = ", k, " is not a multiple of 32");
  TORCH_CHECK(!parts.empty() && parts.size() == orders.size(), "gguf_repack: one order per part");
  const int64_t block = kind == Q8_0 ? 34 : (kind == Q4_0 ? 18 : 20);
  const int64_t nb = k / QK, row_bytes = nb * block;
  std::vector<const uint8_t*> rows;  // the file row behind each output row
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& p = parts[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == torch::kUInt8 && p.dim() == 2 && p.is_contiguous() &&
                    p.size(1) == row_bytes,
                "gguf_repack: part ", i, " is not a contiguous uint8 (rows, ", row_bytes, ") CPU tensor");
    const uint8_t* base = p.data_ptr<uint8_t>();
    const auto& o = orders[i];
    if (o.numel() == 0) {
      for (int64_t r = 0; r < p.size(0); ++r) rows.push_back(base + r * row_bytes);
    } else {
      TORCH_CHECK(o.scalar_type() == torch::kInt64 && o.dim() == 1 && o.size(0) == p.size(0) && o.is_contiguous(),
                  "gguf_repack: order ", i, " is not an int64 (", p.size(0), ",) tensor");
      const int64_t* op = o.data_ptr<int64_t>();
      for (int64_t r = 0; r < p.size(0); ++r) {
        TORCH_CHECK(op[r] >= 0 && op[r] < p.size(0), "gguf_repack: order ", i, " names row ", op[r]);
        rows.push_back(base + op[r] * row_bytes);
      }
    }
  }
  const int64_t n = static_cast<int64_t>(rows.size()), t_count = (n + TILE - 1) / TILE;
  const bool int8 = kind == Q8_0;
  auto u8 = torch::TensorOptions().dtype(torch::kUInt8);
  auto f16 = torch::TensorOptions().dtype(torch::kHalf);
  torch::Tensor qw = int8 ? torch::empty({t_count, k / 4, TILE, 4}, u8) : torch::empty({t_count, k / 8, TILE, 4}, u8);
  torch::Tensor sc = torch::empty({t_count, nb, TILE}, f16);
  // Q4_0 is symmetric (W = d (q - 8)): the kernels derive its mins from the scales, none are stored
  torch::Tensor mn = kind == Q4_1 ? torch::empty({t_count, nb, TILE}, f16) : torch::Tensor();
  uint8_t* q = qw.data_ptr<uint8_t>();
  uint16_t* s = reinterpret_cast<uint16_t*>(sc.data_ptr<at::Half>());
  uint16_t* m = kind == Q4_1 ? reinterpret_cast<uint16_t*>(mn.data_ptr<at::Half>()) : nullptr;
  const int64_t cols4 = int8 ? k / 4 : k / 8;  // 4-byte columns of a tile row

  for (int64_t t = 0; t < t_count; ++t) {
    uint8_t* qt = q + t * cols4 * TILE * 4;  // this tile: (cols4, 16, 4)
    uint16_t* st = s + t * nb * TILE;        // (nb, 16)
    uint16_t* mt = m ? m + t * nb * TILE : nullptr;
    for (int64_t r = 0; r < TILE; ++r) {
      const int64_t row = t * TILE + r;
      if (row >= n) {  // padding rows of the last tile
        for (int64_t c = 0; c < cols4; ++c) std::memset(qt + (c * TILE + r) * 4, int8 ? 0x80 : 0, 4);
        for (int64_t b = 0; b < nb; ++b) {
          st[b * TILE + r] = 0;
          if (mt) mt[b * TILE + r] = 0;
        }
        continue;
      }
      const uint8_t* src = rows[row];
      for (int64_t b = 0; b < nb; ++b, src += block) {
        st[b * TILE + r] = half_bits(src);
        if (int8) {
          // 32 int8 codes -> 8 columns of 4 bytes, each stored q + 128 (= q ^ 0x80)
          for (int64_t j = 0; j < 8; ++j) {
            uint32_t w;
            std::memcpy(&w, src + 2 + 4 * j, 4);
            w ^= 0x80808080u;
            std::memcpy(qt + ((b * 8 + j) * TILE + r) * 4, &w, 4);
          }
          continue;
        }
        const uint8_t* qs = src + (kind == Q4_0 ? 2 : 4);  // 16 bytes: element e < 16 low nibble of qs[e],
                                                            // element e >= 16 high nibble of qs[e - 16]
        if (mt) mt[b * TILE + r] = half_bits(src + 2);  // Q4_1's min
        uint8_t e[QK];
        for (int64_t i = 0; i < 16; ++i) {
          e[i] = qs[i] & 0x0F;
          e[i + 16] = qs[i] >> 4;
        }
        // 4 prosa columns per block: column c holds elements 8c..8c+3 (low nibbles) and 8c+4..8c+7 (high)
        for (int64_t c = 0; c < 4; ++c) {
          uint8_t* dst = qt + ((b * 4 + c) * TILE + r) * 4;
          for (int64_t j = 0; j < 4; ++j) dst[j] = e[8 * c + j] | (e[8 * c + 4 + j] << 4);
        }
      }
    }
  }
  if (!mn.defined()) return {qw, sc};
  return {qw, sc, mn};
}

// One row of GGUF blocks -> float32, as prosa.weights.gguf_dequant.dequantize computes it: every product of a
// float16 scale and a code is exact in float32, so w = d q + m rounds once however it is evaluated.
static void dequant_row(const uint8_t* src, float* out, int64_t kind, int64_t nb) {
  const int64_t block = kind == Q8_0 ? 34 : kind == Q4_0 ? 18 : kind == Q4_1 ? 20 : kind == Q5_0 ? 22 : 24;
  for (int64_t b = 0; b < nb; ++b, src += block, out += QK) {
    const float d = half_at(src);
    if (kind == Q8_0) {
      const int8_t* q = reinterpret_cast<const int8_t*>(src + 2);
      for (int64_t i = 0; i < QK; ++i) out[i] = d * static_cast<float>(q[i]);
      continue;
    }
    // Q4_x / Q5_x: element i < 16 is the low nibble of qs[i], element i + 16 its high nibble; Q5's fifth bit of
    // element i is bit i of the little-endian uint32 qh
    const bool five = kind == Q5_0 || kind == Q5_1, with_min = kind == Q4_1 || kind == Q5_1;
    const float m = with_min ? half_at(src + 2) : d * (five ? -16.0f : -8.0f);
    uint32_t qh = 0;
    if (five) std::memcpy(&qh, src + (with_min ? 4 : 2), 4);
    const uint8_t* qs = src + 2 + (with_min ? 2 : 0) + (five ? 4 : 0);
    for (int64_t i = 0; i < 16; ++i) {
      const int lo = (qs[i] & 0x0F) | (five ? ((qh >> i) & 1) << 4 : 0);
      const int hi = (qs[i] >> 4) | (five ? ((qh >> (i + 16)) & 1) << 4 : 0);
      out[i] = m + d * static_cast<float>(lo);
      out[i + 16] = m + d * static_cast<float>(hi);
    }
  }
}

// Rows of a GGUF table (a token embedding kept in its blocks) -> float32, the rows a lookup reads.
// Args:
//   blocks: uint8 (V, K / 32 * block bytes), contiguous; kind: 8 Q8_0, 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1.
//   ids: int64 (n,) rows to read, each in [0, V).
//   k: values per row (a multiple of 32).
// Returns:
//   float32 (n, k).
torch::Tensor gguf_rows(const torch::Tensor& blocks, const torch::Tensor& ids, int64_t kind, int64_t k) {
  TORCH_CHECK(kind == Q8_0 || kind == Q4_0 || kind == Q4_1 || kind == Q5_0 || kind == Q5_1, "gguf_rows: GGML type ",
              kind, " is not Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1");
  TORCH_CHECK(k > 0 && k % QK == 0, "gguf_rows: K = ", k, " is not a multiple of 32");
  const int64_t block = kind == Q8_0 ? 34 : kind == Q4_0 ? 18 : kind == Q4_1 ? 20 : kind == Q5_0 ? 22 : 24;
  const int64_t nb = k / QK;
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == torch::kUInt8 && blocks.dim() == 2 &&
                  blocks.is_contiguous() && blocks.size(1) == nb * block,
              "gguf_rows: blocks are not a contiguous uint8 (rows, ", nb * block, ") CPU tensor");
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == torch::kInt64 && ids.dim() == 1,
              "gguf_rows: ids are not an int64 (n,) CPU tensor");
  const torch::Tensor idc = ids.contiguous();
  const int64_t n = idc.size(0), rows = blocks.size(0);
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(id[i] >= 0 && id[i] < rows, "index ", id[i], " is out of range for ", rows, " embeddings");
  torch::Tensor out = torch::empty({n, k}, torch::TensorOptions().dtype(torch::kFloat32));
  const uint8_t* base = blocks.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) dequant_row(base + id[i] * nb * block, o + i * k, kind, nb);
  return out;
}
