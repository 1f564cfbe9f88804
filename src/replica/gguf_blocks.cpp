// Matrix products with llama.cpp block-quantized weights (Q4_1, Q8_0) and float32 activations.
// Built by gridserve.replica.gguf_blocks with g++ (its CXXFLAGS: -O3 -march=native) for the CPU it runs on, and
// used only where that CPU has AVX-512. Every product is the float32 weight gguf's dequantize gives
// (d * q + m, exact in float32) times the float32 activation, summed in float32 in a fixed order per
// output, so a row's result does not depend on the other rows of the batch.
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#if !defined(__AVX512F__)
#error "gguf_blocks needs AVX-512 (AVX512F)"
#endif
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

const int QK = 32;   // weights per block

// Block scales and minimums stay fp16, as in the file; F16C widens them exactly.
inline float f16(uint16_t h) { return _cvtsh_ss(h); }
// Sixteen float16 numbers from memory as float32 (exact).
inline __m512 load16_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
// n float32 numbers stored as float16, each rounded to nearest (as torch's .half() rounds).
inline void store_f16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t j = 0; j < n; j++) out[j] = _cvtss_sh(x[j], _MM_FROUND_TO_NEAREST_INT);
}
// The first n of 16 lanes (all of them from n = 16 on): a vector's live part at the end of a row.
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

// e^x for 16 floats (Cephes' expf polynomial: within a few ulps of expf), x clamped to where e^x is
// a normal float, so a far-negative x gives the smallest normal float (~1e-38), never a denormal.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(88.37626f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// A Q4_1 block's 16 possible weights d * q + m (q = 0..15) are one vector; each weight is a lookup in it
// (vpermps reads the low 4 bits of each index: the low nibble needs no mask). Same values as computing
// d * q + m for each weight, in fewer instructions.
inline __m512 q4_1_table(__m512 vd, __m512 vm) {
  return _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), vd, vm);
}

inline void q4_1_lookup(const uint8_t* qs, __m512 table, __m512& w0, __m512& w1) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));
  w0 = _mm512_permutexvar_ps(bytes, table);
  w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
}

inline void q4_1_block(const uint8_t* qs, float d, float m, __m512& w0, __m512& w1) {
  q4_1_lookup(qs, q4_1_table(_mm512_set1_ps(d), _mm512_set1_ps(m)), w0, w1);
}

inline void q8_0_block(const int8_t* qs, float d, __m512& w0, __m512& w1) {
  __m512 vd = _mm512_set1_ps(d);
  w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)qs))), vd);
  w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qs + 16)))), vd);
}

// out[k] = _mm512_reduce_add_ps(v[k]) for eight vectors at once, bit for bit: the same tree of sums
// (lanes i + i+8, then i + i+4, then i + i+2, then the last two), the eight vectors side by side, in
// 21 shuffles and adds instead of eight reductions of about nine each.
inline void reduce8(const __m512 v[8], float out[8]) {
  __m512 h[4];  // h[p]: the 8 sums of lanes i and i+8 of v[2p], then those of v[2p+1]
  for (int p = 0; p < 4; p++)
    h[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  __m512 q[2];  // q[p]: 4 sums (i + i+4) each of v[4p], v[4p+1], v[4p+2], v[4p+3], one per 128-bit lane
  for (int p = 0; p < 2; p++)
    q[p] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * p], h[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(h[2 * p], h[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane k: the 2 sums (i + i+2) of v[k], then of v[4 + k]
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(q[0], q[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(q[0], q[1], _MM_SHUFFLE(3, 2, 3, 2)));
  // lane k, element 0: the sum of v[k]; element 1: that of v[4 + k]
  const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e, e, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(e, e, _MM_SHUFFLE(3, 1, 3, 1)));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, f);
  for (int k = 0; k < 4; k++) {
    out[k] = lanes[4 * k];
    out[4 + k] = lanes[4 * k + 1];
  }
}

// y[i * ldy + j] = x[i] . W[j] for the R rows of x and the NT weight rows at `at(j)`. Every (row, weight
// row) pair is summed the same way whatever R and NT are (one accumulator: the block's first 16
// products, then its second 16, block after block; then one reduction), so a row's result never
// depends on the batch around it. A tile holds R * NT <= 16 accumulators: several weight rows for
// few activation rows keep the FMA chains independent, several activation rows share each widened
// block, and a square tile loads the fewest vectors per FMA (loads, not FMAs, bound these loops).
template <int R, int NT, typename Block>
inline void tile_dot(const float* x, int64_t K, int64_t nb, const Block& block, float* y, int64_t ldy) {
  __m512 acc[R][NT];
  for (int i = 0; i < R; i++)
    for (int j = 0; j < NT; j++) acc[i][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; b++) {
    __m512 w0[NT], w1[NT];
    for (int j = 0; j < NT; j++) block(j, b, w0[j], w1[j]);
    for (int i = 0; i < R; i++) {
      const __m512 x0 = _mm512_loadu_ps(x + i * K + b * QK), x1 = _mm512_loadu_ps(x + i * K + b * QK + 16);
      for (int j = 0; j < NT; j++) acc[i][j] = _mm512_fmadd_ps(w1[j], x1, _mm512_fmadd_ps(w0[j], x0, acc[i][j]));
    }
  }
  if constexpr (R * NT % 8 == 0) {
    for (int k0 = 0; k0 < R * NT; k0 += 8) {
      __m512 v[8];
      float sums[8];
      for (int k = 0; k < 8; k++) v[k] = acc[(k0 + k) / NT][(k0 + k) % NT];
      reduce8(v, sums);
      for (int k = 0; k < 8; k++) y[(k0 + k) / NT * ldy + (k0 + k) % NT] = sums[k];
    }
  } else {
    for (int i = 0; i < R; i++)
      for (int j = 0; j < NT; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

const int PANEL = 16;               // weight rows a thread widens at once (16 x K floats: 96 KiB for K = 1536)
const int64_t PANEL_FROM_ROWS = 4;  // from this many activation rows on, widening once per panel wins

// Few activation rows (1 to PANEL_FROM_ROWS - 1: decoding one to three streams): each block is
// widened in registers right where it is used, tiles of up to 4 weight rows so several FMA chains
// run at once.
template <typename Block>
void matmul_in_registers(const float* x, int64_t M, int64_t K, int64_t N, float* y, const Block& block) {
  const int64_t nb = K / QK;
  const int64_t tiles = (N + 3) / 4;  // 4 weight rows each
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; t++) {
    const int64_t end = 4 * t + 4 < N ? 4 * t + 4 : N;
    for (int64_t n = 4 * t; n < end;) {
      auto at = [&](int j, int64_t b, __m512& w0, __m512& w1) { block(n + j, b, w0, w1); };
      if (M == 1 && end - n >= 4) {
        tile_dot<1, 4>(x, K, nb, at, y + n, N);
        n += 4;
      } else if (end - n >= 2) {
        switch (M) {
          case 1: tile_dot<1, 2>(x, K, nb, at, y + n, N); break;
          case 2: tile_dot<2, 2>(x, K, nb, at, y + n, N); break;
          default: tile_dot<3, 2>(x, K, nb, at, y + n, N); break;
        }
        n += 2;
      } else {
        switch (M) {
          case 1: tile_dot<1, 1>(x, K, nb, at, y + n, N); break;
          case 2: tile_dot<2, 1>(x, K, nb, at, y + n, N); break;
          default: tile_dot<3, 1>(x, K, nb, at, y + n, N); break;
        }
        n += 1;
      }
    }
  }
}

// tile_dot over widened weights: NT rows of w, K floats apart, 64-byte aligned.
template <int R, int NT>
inline void panel_tile(const float* x, int64_t K, int64_t nb, const float* w, float* y, int64_t ldy) {
  tile_dot<R, NT>(x, K, nb, [w, K](int j, int64_t b, __m512& w0, __m512& w1) {
    w0 = _mm512_load_ps(w + j * K + b * QK);
    w1 = _mm512_load_ps(w + j * K + b * QK + 16);
  }, y, ldy);
}

// Many activation rows: a thread widens a panel of weight rows into its own buffer once, then every
// activation row reads it there (4 x 4 tiles: 16 FMA chains, the weights loaded from L1/L2). The
// widened values and the order of the sums are those of matmul_in_registers, so the two agree bit
// for bit and a row's result still does not depend on how many rows came with it.
template <typename Block>
void matmul_in_panels(const float* x, int64_t M, int64_t K, int64_t N, float* y, const Block& block) {
  const int64_t nb = K / QK, panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel
  {
    float* panel = static_cast<float*>(aligned_alloc(64, PANEL * K * sizeof(float)));
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; p++) {
      const int64_t n0 = p * PANEL, rows = N - n0 < PANEL ? N - n0 : PANEL;
      for (int64_t j = 0; j < rows; j++)
        for (int64_t b = 0; b < nb; b++) {
          __m512 w0, w1;
          block(n0 + j, b, w0, w1);
          _mm512_store_ps(panel + j * K + b * QK, w0);
          _mm512_store_ps(panel + j * K + b * QK + 16, w1);
        }
      for (int64_t i0 = 0; i0 < M; i0 += 4) {
        const int r = (int)(M - i0 < 4 ? M - i0 : 4);
        const float* xs = x + i0 * K;
        float* ys = y + i0 * N + n0;
        int64_t j = 0;
        for (; j + 4 <= rows; j += 4) {
          switch (r) {
            case 1: panel_tile<1, 4>(xs, K, nb, panel + j * K, ys + j, N); break;
            case 2: panel_tile<2, 4>(xs, K, nb, panel + j * K, ys + j, N); break;
            case 3: panel_tile<3, 4>(xs, K, nb, panel + j * K, ys + j, N); break;
            default: panel_tile<4, 4>(xs, K, nb, panel + j * K, ys + j, N); break;
          }
        }
        for (; j < rows; j++) {
          switch (r) {
            case 1: panel_tile<1, 1>(xs, K, nb, panel + j * K, ys + j, N); break;
            case 2: panel_tile<2, 1>(xs, K, nb, panel + j * K, ys + j, N); break;
            case 3: panel_tile<3, 1>(xs, K, nb, panel + j * K, ys + j, N); break;
            default: panel_tile<4, 1>(xs, K, nb, panel + j * K, ys + j, N); break;
          }
        }
      }
    }
    free(panel);
  }
}

// y[M, N] = x[M, K] . W[N, K]^T.
template <typename Block>
void matmul(const float* x, int64_t M, int64_t K, int64_t N, float* y, const Block& block) {
  if (M <= 0) return;
  if (M >= PANEL_FROM_ROWS)
    matmul_in_panels(x, M, K, N, y, block);
  else
    matmul_in_registers(x, M, K, N, y, block);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define GS_AMX 1
// ---- Products on AMX (Intel's tile units), float32 split into bfloat16 pairs -------------------------
// Each float32 f is split into hi = bfloat16(f) and lo = bfloat16(f - hi) (about 16 bits of f), the
// weight as gguf widens it and the activation alike, and x . w is summed by the tile unit in float32
// as hi.hi + hi.lo + lo.hi per chunk of 32: within about 2^-16 of the float32 product, where one
// bfloat16 product would be 2^-8 off (that costs SmolLM2 4 of 22 greedy answers). C tiles hold 16
// weight rows x 16 activation rows; each output is the tile unit's sum over its own weight row and
// activation row, chunk after chunk in order, so a row's result never depends on the rows beside it.

const int AMX_ROWS = 32;  // weight rows a thread widens at once: two tiles of 16

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0, 1: C (weight rows 0-15, 16-31 of the panel x 16 activation rows); 2, 3: the weights' hi
// parts and 4, 5 their lo parts (16 weight rows x 32 bfloat16); 6, 7: the activations' hi and lo
// parts (16 pairs of k x 16 activation rows). All 16 rows of 64 bytes.
inline void amx_configure() {
  TileConfig cfg = {};
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// 32 float32 numbers (a, then b) as 32 bfloat16 hi parts and 32 lo parts.
inline void split_bf16(__m512 a, __m512 b, __m512i& hi, __m512i& lo) {
  hi = (__m512i)_mm512_cvtne2ps_pbh(b, a);
  const __m512 a_hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi)), 16));
  const __m512 b_hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi, 1)), 16));
  lo = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(b, b_hi), _mm512_sub_ps(a, a_hi));
}

// x [M, K] float32 into tiles: for activation tile g and chunk c, xb + (g * chunks + c) * 512 holds
// the hi parts then the lo parts, each as 16 rows (pairs of k) of 16 activation rows: unit kk * 16 + m
// is (x[16g + m][32c + 2kk], x[16g + m][32c + 2kk + 1]). Rows past M are zeros.
inline void amx_pack_activations(const float* x, int64_t M, int64_t K, uint32_t* xb) {
  const int64_t chunks = K / QK, groups = (M + 15) / 16;
#pragma omp parallel for schedule(static) if (M * K >= (1 << 15))
  for (int64_t gc = 0; gc < groups * chunks; gc++) {
    const int64_t g = gc / chunks, c = gc % chunks;
    uint32_t* out = xb + gc * 512;
    for (int64_t m = 0; m < 16; m++) {
      alignas(64) uint32_t hi[16], lo[16];
      __m512i vhi = _mm512_setzero_si512(), vlo = _mm512_setzero_si512();
      if (16 * g + m < M) {
        const float* row = x + (16 * g + m) * K + c * QK;
        split_bf16(_mm512_loadu_ps(row), _mm512_loadu_ps(row + 16), vhi, vlo);
      }
      _mm512_store_si512(hi, vhi);
      _mm512_store_si512(lo, vlo);
      for (int kk = 0; kk < 16; kk++) {
        out[kk * 16 + m] = hi[kk];
        out[256 + kk * 16 + m] = lo[kk];
      }
    }
  }
}

// C tile t (panel rows 16t..16t+15 x activation tile g) into y: c is [weight row][activation row], so
// each activation row's 16 outputs are one run of y.
inline void amx_store(int t, int64_t g, int64_t n0, int64_t rows, int64_t M, int64_t N, float* y) {
  alignas(64) float c[16 * 16];
  if (t == 0)
    _tile_stored(0, c, 64);
  else
    _tile_stored(1, c, 64);
  const int64_t live = rows - 16 * t < 16 ? rows - 16 * t : 16;
  if (live <= 0) return;  // the panel's last weight rows are past N
  const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  for (int64_t m = 0; m < 16 && 16 * g + m < M; m++)
    _mm512_mask_storeu_ps(y + (16 * g + m) * N + n0 + 16 * t, first_lanes(live), _mm512_i32gather_ps(column, c + m, 4));
}

// y[M, N] = x[M, K] . W[N, K]^T: a thread widens a panel of AMX_ROWS weight rows into hi and lo
// bfloat16 parts once, then runs every activation tile over it.
template <typename Block>
void matmul_amx(const float* x, int64_t M, int64_t K, int64_t N, float* y, const Block& block) {
  const int64_t nb = K / QK, groups = (M + 15) / 16, panels = (N + AMX_ROWS - 1) / AMX_ROWS;
  uint32_t* xb = static_cast<uint32_t*>(aligned_alloc(64, groups * nb * 512 * sizeof(uint32_t)));
  amx_pack_activations(x, M, K, xb);
#pragma omp parallel
  {
    amx_configure();
    // hi parts [AMX_ROWS][K], then lo parts [AMX_ROWS][K]
    uint16_t* panel = static_cast<uint16_t*>(aligned_alloc(64, 2 * AMX_ROWS * K * sizeof(uint16_t)));
    uint16_t* panel_lo = panel + AMX_ROWS * K;
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; p++) {
      const int64_t n0 = p * AMX_ROWS, rows = N - n0 < AMX_ROWS ? N - n0 : AMX_ROWS;
      for (int64_t j = 0; j < AMX_ROWS; j++)
        for (int64_t b = 0; b < nb; b++) {
          __m512 w0 = _mm512_setzero_ps(), w1 = _mm512_setzero_ps();
          if (j < rows) block(n0 + j, b, w0, w1);
          __m512i hi, lo;
          split_bf16(w0, w1, hi, lo);
          _mm512_store_si512(panel + j * K + b * QK, hi);
          _mm512_store_si512(panel_lo + j * K + b * QK, lo);
        }
      for (int64_t g = 0; g < groups; g++) {
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t b = 0; b < nb; b++) {
          const uint32_t* xg = xb + (g * nb + b) * 512;
          _tile_loadd(2, panel + b * QK, K * 2);
          _tile_loadd(3, panel + 16 * K + b * QK, K * 2);
          _tile_loadd(4, panel_lo + b * QK, K * 2);
          _tile_loadd(5, panel_lo + 16 * K + b * QK, K * 2);
          _tile_loadd(6, xg, 64);
          _tile_loadd(7, xg + 256, 64);
          _tile_dpbf16ps(0, 2, 6);  // hi . hi
          _tile_dpbf16ps(1, 3, 6);
          _tile_dpbf16ps(0, 2, 7);  // + hi . lo
          _tile_dpbf16ps(1, 3, 7);
          _tile_dpbf16ps(0, 4, 6);  // + lo . hi
          _tile_dpbf16ps(1, 5, 6);
        }
        amx_store(0, g, n0, rows, M, N, y);
        amx_store(1, g, n0, rows, M, N, y);
      }
    }
    free(panel);
    _tile_release();
  }
  free(xb);
}

#endif  // AMX

// Block b of weight row n, widened: the `block` argument of the products, per format.
inline auto q4_1_weights(const uint8_t* qs, const uint16_t* d, const uint16_t* m, int64_t nb) {
  return [=](int64_t n, int64_t b, __m512& w0, __m512& w1) {
    q4_1_block(qs + (n * nb + b) * 16, f16(d[n * nb + b]), f16(m[n * nb + b]), w0, w1);
  };
}

inline auto q8_0_weights(const int8_t* qs, const uint16_t* d, int64_t nb) {
  return [=](int64_t n, int64_t b, __m512& w0, __m512& w1) { q8_0_block(qs + (n * nb + b) * QK, f16(d[n * nb + b]), w0, w1); };
}

}  // namespace

extern "C" {

// y[M, N] = x[M, K] . W[N, K]^T, W in Q4_1: qs [N, K/32, 16] (low nibble weight j, high weight j + 16),
// d, m [N, K/32] fp16.
void gs_q4_1_matmul(const float* x, int64_t M, int64_t K, const uint8_t* qs, const uint16_t* d, const uint16_t* m,
                    int64_t N, float* y) {
  matmul(x, M, K, N, y, q4_1_weights(qs, d, m, K / QK));
}

// The same with W in Q8_0: qs [N, K/32, 32] int8, d [N, K/32] fp16.
void gs_q8_0_matmul(const float* x, int64_t M, int64_t K, const int8_t* qs, const uint16_t* d, int64_t N, float* y) {
  matmul(x, M, K, N, y, q8_0_weights(qs, d, K / QK));
}

// Attention of decoding rows over their slots of a layer's KV cache, one query token per row:
// q, out [n, kv_heads, group, D]; K, V [slots, kv_heads, max_len, D] float16; row r reads slot slots[r],
// its first lengths[r] positions. Float32 arithmetic (each key and value widened exactly), each
// (row, head) alone, so batched equals solo.
// D is a multiple of 16 (checked by the caller). Each key and value row is read once for the whole
// group of query heads that share it.
void gs_decode_attention(const float* q, const uint16_t* K, const uint16_t* V, const int64_t* slots,
                         const int64_t* lengths,
                         int64_t n, int64_t kv_heads, int64_t group, int64_t D, int64_t max_len, float scale,
                         float* out) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t rh = 0; rh < n * kv_heads; rh++) {
    const int64_t r = rh / kv_heads, h = rh % kv_heads, len = lengths[r], stride = (len + 15) / 16 * 16;
    const uint16_t* k = K + (slots[r] * kv_heads + h) * max_len * D;
    const uint16_t* v = V + (slots[r] * kv_heads + h) * max_len * D;
    const float* qh = q + rh * group * D;
    float* scores = static_cast<float*>(aligned_alloc(64, group * stride * sizeof(float)));
    // scores[g][t] = q_g . k_t * scale; eight positions' sums reduced at once
    for (int64_t g = 0; g < group; g++) {
      const float* qg = qh + g * D;
      float* sg = scores + g * stride;
      int64_t t = 0;
      for (; t + 8 <= len; t += 8) {
        __m512 acc[8];
        for (int u = 0; u < 8; u++) {
          acc[u] = _mm512_setzero_ps();
          for (int64_t j = 0; j < D; j += 16)
            acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(qg + j), load16_f16(k + (t + u) * D + j), acc[u]);
        }
        reduce8(acc, sg + t);
      }
      for (; t < len; t++) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < D; j += 16)
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + j), load16_f16(k + t * D + j), acc);
        sg[t] = _mm512_reduce_add_ps(acc);
      }
      // softmax over the len scores, 16 at a time (the padding past len stays out of the sum)
      float best = -INFINITY;
      for (t = 0; t < len; t++) {
        sg[t] *= scale;
        best = sg[t] > best ? sg[t] : best;
      }
      __m512 total = _mm512_setzero_ps();
      for (t = 0; t < len; t += 16) {
        const __mmask16 live = first_lanes(len - t);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, sg + t), _mm512_set1_ps(best)));
        _mm512_mask_storeu_ps(sg + t, live, e);
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(live, e));
      }
      const float inv = 1.f / _mm512_reduce_add_ps(total);
      for (t = 0; t < len; t++) sg[t] *= inv;
    }
    // out_g = sum_t p[g][t] v_t, position by position
    for (int64_t j = 0; j < D; j += 16) {
      for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const int64_t gs = group - g0 < 4 ? group - g0 : 4;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t t = 0; t < len; t++) {
          const __m512 vt = load16_f16(v + t * D + j);
          for (int64_t g = 0; g < gs; g++)
            acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(g0 + g) * stride + t]), vt, acc[g]);
        }
        for (int64_t g = 0; g < gs; g++) _mm512_storeu_ps(out + (rh * group + g0 + g) * D + j, acc[g]);
      }
    }
    free(scores);
  }
}

// RMSNorm of each row of x [rows, D]: out = w * (x / sqrt(mean(x^2) + eps)), float32, each row alone.
// With h (not null), the residual add comes first and stays in x: x += h, then the norm of the sum.
// Serial: a few rows of a few hundred numbers cost less than waking the thread team.
void gs_rms_norm(float* x, const float* h, const float* w, int64_t rows, int64_t D, float eps, float* out) {
  for (int64_t r = 0; r < rows; r++) {
    float* xr = x + r * D;
    if (h != nullptr)
      for (int64_t j = 0; j < D; j++) xr[j] += h[r * D + j];
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= D; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(xr + j), _mm512_loadu_ps(xr + j), acc);
    float sum = _mm512_reduce_add_ps(acc);
    for (; j < D; j++) sum += xr[j] * xr[j];
    const float inv = 1.0f / sqrtf(sum / (float)D + eps);
    const __m512 vinv = _mm512_set1_ps(inv);
    for (j = 0; j + 16 <= D; j += 16)
      _mm512_storeu_ps(out + r * D + j, _mm512_mul_ps(_mm512_loadu_ps(w + j), _mm512_mul_ps(_mm512_loadu_ps(xr + j), vinv)));
    for (; j < D; j++) out[r * D + j] = w[j] * (xr[j] * inv);
  }
}

// The MLP's activation from the joined gate/up product gu [T, 2F]: out [T, F] = silu(gate) * up, with
// silu(g) = g / (1 + e^-g) as torch computes it (e^x from exp16: within a few ulps of torch's).
void gs_silu_mul(const float* gu, int64_t T, int64_t F, float* out) {
  const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp parallel for schedule(static) if (T * F >= (1 << 16))
  for (int64_t t = 0; t < T; t++) {
    const float* g = gu + t * 2 * F;
    const float* u = g + F;
    float* o = out + t * F;
    for (int64_t j = 0; j < F; j += 16) {
      const __mmask16 live = first_lanes(F - j);
      const __m512 vg = _mm512_maskz_loadu_ps(live, g + j), vu = _mm512_maskz_loadu_ps(live, u + j);
      const __m512 silu = _mm512_div_ps(vg, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), vg))));
      _mm512_mask_storeu_ps(o + j, live, _mm512_mul_ps(silu, vu));
    }
  }
}

// RoPE on one head of D (transformers' rotate_half form): out = x * c + rotate_half(x) * s.
static void rope_head(const float* x, const float* c, const float* s, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t j = 0; j < half; j++) out[j] = x[j] * c[j] - x[j + half] * s[j];
  for (int64_t j = half; j < D; j++) out[j] = x[j] * c[j] + x[j - half] * s[j];
}

// The joined q/k/v product of T tokens, qkv [T, (H + 2 * KVH) * D], made ready for attention: RoPE
// (cos, sin [T, D]) on each query head into q [T, H, D] and on each key head into its cache row, the
// values copied to theirs. K and V are a layer's float16 caches viewed as rows of D; at[t * KVH + h]
// is token t's row for kv head h; keys and values are rounded to nearest as they are stored. Built
// with -ffp-contract=off, so each product and sum rounds as torch's separate mul and add do.
void gs_rope_kv(const float* qkv, int64_t T, int64_t H, int64_t KVH, int64_t D, const float* cos, const float* sin,
                float* q, uint16_t* K, uint16_t* V, const int64_t* at) {
  const int64_t width = (H + 2 * KVH) * D;
  float* key = static_cast<float*>(malloc(D * sizeof(float)));
  for (int64_t t = 0; t < T; t++) {
    const float* row = qkv + t * width;
    const float* c = cos + t * D;
    const float* s = sin + t * D;
    for (int64_t h = 0; h < H; h++) rope_head(row + h * D, c, s, D, q + (t * H + h) * D);
    for (int64_t h = 0; h < KVH; h++) {
      rope_head(row + (H + h) * D, c, s, D, key);
      store_f16(key, D, K + at[t * KVH + h] * D);
      store_f16(row + (H + KVH + h) * D, D, V + at[t * KVH + h] * D);
    }
  }
  free(key);
}

// Asks Linux for the AMX tile state (once per process): 1 where this build has the AMX products and
// the tile state was granted, 0 otherwise (the gs_*_amx functions exist only in a build that has them).
int gs_amx_init() {
#ifdef GS_AMX
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
#else
  return 0;
#endif
}

#ifdef GS_AMX
// gs_q4_1_matmul and gs_q8_0_matmul on AMX, each float32 split into two bfloat16 parts (matmul_amx).
void gs_q4_1_matmul_amx(const float* x, int64_t M, int64_t K, const uint8_t* qs, const uint16_t* d,
                        const uint16_t* m, int64_t N, float* y) {
  if (M > 0) matmul_amx(x, M, K, N, y, q4_1_weights(qs, d, m, K / QK));
}

void gs_q8_0_matmul_amx(const float* x, int64_t M, int64_t K, const int8_t* qs, const uint16_t* d, int64_t N,
                        float* y) {
  if (M > 0) matmul_amx(x, M, K, N, y, q8_0_weights(qs, d, K / QK));
}
#endif

}  // extern "C"
